"""``mechscope probe``: a linear probe at a site, beside its controls (and optionally the online
code and k-sparse probes).

Data: a built-in dataset (``steering_toy``: the concept bit; ``othello``: the 36 squares'
states) or a JSON-lines file of ``{"tokens": [ids], "label": int}`` rows, or, with a model
that has a tokenizer, ``{"text": "...", "label": int}`` rows (each text tokenised on its
own as [BOS] + tokens; the site is read at its last token, or with ``--read-at all`` at
every token but BOS, whose rows share the text's label and split). Position 0 / BOS is
never read. Optionally ``"type"``: the input type for the control task (by default the
token at the probed position). Every line is checked, token ids against the model's
vocabulary, before the model runs. When the classes are imbalanced the report adds the
balanced accuracy (mean recall over classes) next to accuracy. Models: a built-in one, a
pretrained one with its tokenizer (``--model``) or a random Hugging Face causal LM from a
config (``--hf-config``; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Literal

from mechscope.cli import UsageError
from mechscope.cli.model_source import ModelSource, check_inputs, load, resolve_site
from mechscope.core.config import add_config_arguments, config, config_from_args, param

DESCRIPTION = __doc__.split("\n\n", 1)[1]


@config
class ProbeConfig(ModelSource):
    """Options of ``mechscope probe``."""

    FIELD_HELP = {"model": "a built-in model (default: the dataset's own)"}

    data: str = param("steering_toy", metavar="NAME_OR_JSONL", help="steering_toy, othello, or a JSON-lines file")
    site: str = param("resid_post.1", help="site alias (resid_post.L, mlp_hidden.L, ...) or module path")
    coding: Literal["relative", "absolute"] = param("relative", help="othello: square states relative to the mover, or absolute")
    n: int = param(1000, ge=20, help="examples drawn from a built-in dataset")
    controls: bool = param(True, help="also fit the control task and shuffled labels")
    mdl: bool = param(False, help="also compute the online codelength (binary or multi-class, one task)")
    sparse_k: int = param(0, ge=0, metavar="K", help="also fit k-sparse probes with K neurons (binary labels)")
    read_at: Literal["last", "all"] = param("last", help="text data: read the site at each text's last token, "
                                            "or at every token but BOS")
    seed: int = param(0, help="seed for data and splits")
    json: bool = param(False, help="print JSON")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("probe", help="fit a linear probe at a site, with controls",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, ProbeConfig)
    return parser


def dataset(cfg: ProbeConfig, model: Any) -> tuple[Any, Any, Any, Any]:
    """(inputs, labels, types, positions) for the probe; positions None = each example's last token."""
    import torch

    if cfg.data == "steering_toy":
        from mechscope.tasks import steering_toy as st

        b = st.sample(cfg.n, seed=cfg.seed)
        return b.ids, b.concept.long(), b.symbols[:, -1], [st.QUERY_POS]
    if cfg.data == "othello":
        from mechscope.tasks import othello as oth

        games = oth.random_games(max(2, cfg.n // 8), seed=cfg.seed)
        game, pos = oth.probe_rows(games, 8, seed=cfg.seed)
        states = oth.relative_states(games) if cfg.coding == "relative" else oth.absolute_states(games)
        return games.tokens[game], states[game, pos], games.tokens[game, pos], pos[:, None]
    from mechscope.core.jsonl import integer, read_jsonl, token_batch, token_ids, vocab_size

    rows = read_jsonl(cfg.data, {"tokens": token_ids(vocab_size(model)), "label": integer()}, {"type": integer()})
    batch = token_batch(rows)
    last = batch["attention_mask"].sum(1) - 1
    types = torch.tensor([r["type"] for r in rows]) if all("type" in r for r in rows) else \
        batch["input_ids"][torch.arange(len(rows)), last]
    return batch, torch.tensor([r["label"] for r in rows]), types, None


def text_dataset(cfg: ProbeConfig, model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> tuple[Any, ...]:
    """(rows [n, d], labels, types, groups or None, where read) of text rows (already checked)."""
    import torch

    from mechscope.core.text import read_mask, text_batch, text_rows

    batch = text_batch([r["text"] for r in rows], tokenizer, cfg.data)
    check_inputs(model, batch, cfg.data)
    keep = read_mask(batch, cfg.read_at, getattr(tokenizer, "bos_token_id", None))
    site = resolve_site(model, cfg.site)
    x = text_rows(model, batch, site, keep)
    text = keep.nonzero()[:, 0]  # each row's text
    labels = torch.tensor([r["label"] for r in rows])[text]
    types = torch.tensor([r["type"] for r in rows])[text] if all("type" in r for r in rows) else \
        batch["input_ids"][keep]
    where = "each text's last token" if cfg.read_at == "last" else "every token of each text but BOS"
    return x, labels, types, text if cfg.read_at == "all" else None, f"{site} at {where}"


def token_dataset(cfg: ProbeConfig, model: Any) -> tuple[Any, Any, Any, Any, str]:
    """(rows [n, d], labels, types, None, site) of a built-in dataset or token-id rows at ``--site``."""
    import torch

    from mechscope.core.collect import activations

    inputs, labels, types, positions = dataset(cfg, model)
    check_inputs(model, inputs, cfg.data)
    site = resolve_site(model, cfg.site, positions=positions if isinstance(positions, list) else
                        (torch.as_tensor(positions) if positions is not None else "last"))
    return activations(model, inputs, site), labels, types, None, str(site)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(ProbeConfig, args)
    from mechscope.cli.model_source import has_tokenizer, uses_text
    from mechscope.core.jsonl import integer
    from mechscope.core.text import labelled_text
    from mechscope.probe.control import probe_with_controls
    from mechscope.probe.linear import ProbeError, train_probe

    default = "othello" if cfg.data == "othello" else "steering_toy"
    text = uses_text(cfg.data, has_tokenizer(cfg, default), ("steering_toy", "othello"))
    rows = labelled_text(cfg.data, integer(), {"type": integer()}) if text else None  # checked before loading
    model, tokenizer = load(cfg, default)
    x, labels, types, groups, site = text_dataset(cfg, model, tokenizer, rows) if rows else token_dataset(cfg, model)
    try:
        report: dict[str, Any] = {"site": site, "rows": int(x.shape[0]), "width": int(x.shape[1])}
        if cfg.controls:
            report.update(probe_with_controls(x, labels, types, seed=cfg.seed, groups=groups).summary())
        else:
            report.update(train_probe(x, labels, seed=cfg.seed, groups=groups).summary())
        if cfg.mdl:
            from mechscope.probe.mdl import online_codelength
            if labels.dim() != 1:
                raise UsageError("--mdl takes one task's labels; this dataset has several (othello squares)")
            report["mdl"] = online_codelength(x, labels, seed=cfg.seed).summary()
        if cfg.sparse_k:
            from mechscope.probe.sparse import RANKINGS, sparse_probe
            report["sparse"] = [sparse_probe(x, labels, cfg.sparse_k, m, seed=cfg.seed).summary() for m in RANKINGS]
    except ProbeError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(report, indent=2) if cfg.json else render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    lines = [f"probe at {report['site']}: {report['rows']} rows of width {report['width']}"]
    for key in ("accuracy", "test_accuracy", "balanced_accuracy", "control_accuracy", "selectivity",
                "shuffled_accuracy", "majority_accuracy"):
        if report.get(key) is not None:
            lines.append(f"  {key:18s} {report[key]:.4f}")
    if "mdl" in report:
        m = report["mdl"]
        lines.append(f"  online code        {m['codelength_bits']:.1f} bits (uniform {m['uniform_bits']:.1f}, "
                     f"compression {m['compression']:.3f})")
    for s in report.get("sparse", []):
        lines.append(f"  {s['k']}-sparse {s['method']:11s} F1 {s['f1']:.3f}  neurons {s['neurons']}")
    return "\n".join(lines)
