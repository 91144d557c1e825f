"""``mechscope steer``: find a direction at a site from inputs with and without a concept, then
add it, ablate it, or bake the ablation into the weights.

Data: the built-in ``steering_toy`` (concept = a marked token; the behaviour is emitting
R) or a JSON-lines file of ``{"tokens": [ids], "label": 0 or 1}`` rows (1 = the concept),
or, with a model that has a tokenizer, contrast sets of ``{"text": "...", "label": 0 or 1}``
rows (each text tokenised on its own as [BOS] + tokens; the direction is read at each
text's last token, or with ``--read-at all`` at every token but BOS; position 0 / BOS is
never read). Every result is reported with the coefficient, the effect on
``--target-token`` (its mean probability at the last position) and the KL divergence of
the next-token distributions on the concept-free inputs (the unrelated behaviour).

``--generate N`` also prints, per prompt, the model's continuation and the changed one
(each ``--coeffs`` value for ``add``, added at every position of every forward, prompt and
new tokens alike), greedy unless ``--sample`` (seeded by ``--seed``). Prompts: ``--prompts``
(a text file, one prompt per line; a .jsonl file with a "text" field; or the prompt itself),
by default the first three concept-free inputs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from mechscope.cli import UsageError
from mechscope.cli.model_source import ModelSource, check_inputs, load, resolve_site
from mechscope.core.config import add_config_arguments, config, config_from_args, param

DESCRIPTION = __doc__.split("\n\n", 1)[1]


@config
class SteerConfig(ModelSource):
    """Options of ``mechscope steer``."""

    FIELD_HELP = {"model": "a built-in model (default: steering_toy)"}

    data: str = param("steering_toy", metavar="NAME_OR_JSONL", help="steering_toy or a JSON-lines file")
    site: str = param("resid_post.1", help="site (alias or module path) whose last position gives the direction")
    method: Literal["diff_of_means", "pca", "actadd", "probe"] = param("diff_of_means", help="how to find the direction")
    action: Literal["add", "ablate", "orthogonalize"] = param("add", help="add at the site (every position), "
                                                            "ablate at every layer and position, or edit the weights")
    coeffs: tuple[float, ...] = param((0.5, 1.0, 2.0), help="coefficients for --action add (times the raw direction)")
    target_token: Optional[int] = param(None, metavar="ID", help="token whose probability measures the effect "
                                        "(steering_toy: R)")
    n: int = param(500, ge=2, help="examples per class from a built-in dataset")
    save_direction: Optional[Path] = param(None, metavar="FILE", help="write the direction (safetensors)")
    save_model: Optional[Path] = param(None, metavar="FILE", help="--action orthogonalize: write the edited weights")
    read_at: Literal["last", "all"] = param("last", help="text data: read the direction at each text's last "
                                            "token, or at every token but BOS")
    generate: int = param(0, ge=0, metavar="N", help="also print N-token continuations with and without the change")
    prompts: Optional[str] = param(None, metavar="FILE_OR_TEXT", help="--generate: a text file (one prompt per "
                                   "line), a .jsonl file (\"text\") or a prompt (default: 3 concept-free inputs)")
    sample: bool = param(False, help="--generate: sample (seeded by --seed) instead of greedy decoding")
    temperature: float = param(1.0, gt=0, help="--generate --sample: softmax temperature")
    top_k: Optional[int] = param(None, ge=1, metavar="K", help="--generate --sample: keep the K likeliest tokens")
    seed: int = param(0, help="seed for data and sampling")
    json: bool = param(False, help="print JSON")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("steer", help="find, add and ablate a steering direction",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, SteerConfig)
    return parser


@dataclass
class SteerData:
    """Concept and concept-free inputs, how to read them, and what to generate from."""

    pos: Any
    neg: Any
    positions: Any  # the read's positions; "text": the --read-at mask of text batches
    target: Optional[int]
    prompts: Any  # default --generate prompts: texts or token-id rows


def _data(cfg: SteerConfig, model: Any, tokenizer: Any, text_rows: Optional[list[dict[str, Any]]]) -> SteerData:
    """The data of ``--data``: the built-in world, checked text rows (``text_rows``) or token-id rows."""
    if cfg.data == "steering_toy":
        from mechscope.tasks import steering_toy as st

        neg = st.sample(cfg.n, cfg.seed + 1, concept=False).ids
        return SteerData(st.sample(cfg.n, cfg.seed, concept=True).ids, neg, [st.QUERY_POS], st.R, neg[:3])
    from mechscope.core.jsonl import integer, read_jsonl, token_batch, token_ids, vocab_size
    from mechscope.core.text import text_batch

    text = text_rows is not None
    rows = text_rows if text else \
        read_jsonl(cfg.data, {"tokens": token_ids(vocab_size(model)), "label": integer((0, 1))})
    pos = [r for r in rows if r["label"] == 1]
    neg = [r for r in rows if r["label"] == 0]
    if not pos or not neg:
        raise UsageError(f"{cfg.data}: need rows with label 1 (concept) and label 0 (no concept); "
                         f"got {len(pos)} and {len(neg)}")
    if text:
        return SteerData(text_batch([r["text"] for r in pos], tokenizer, cfg.data),
                         text_batch([r["text"] for r in neg], tokenizer, cfg.data), "text", None,
                         [r["text"] for r in neg[:3]])
    return SteerData(token_batch(pos), token_batch(neg), "last", None, [r["tokens"] for r in neg[:3]])


def direction(cfg: SteerConfig, model: Any, data: SteerData, bos: Optional[int] = None) -> tuple[Any, Any]:
    """The ``--method`` direction at ``--site`` (read at the data's positions), and the site."""
    from mechscope.core.collect import activations
    from mechscope.core.text import read_mask, text_rows
    from mechscope.probe.linear import probe_direction
    from mechscope.steer.directions import find_direction

    if data.positions == "text":
        site = resolve_site(model, cfg.site)
        a, b = (text_rows(model, x, site, read_mask(x, cfg.read_at, bos)) for x in (data.pos, data.neg))
    else:
        site = resolve_site(model, cfg.site, positions=data.positions)
        a, b = activations(model, data.pos, site), activations(model, data.neg, site)
    return find_direction(cfg.method, a, b, seed=cfg.seed, probe_fit=probe_direction), site


def generations(cfg: SteerConfig, model: Any, tokenizer: Any, data: SteerData, v: Any, site: Any,
                edited: Any) -> list[dict[str, Any]]:
    """Continuations of the prompts with and without ``--action`` (``--generate`` tokens)."""
    from mechscope.core.text import read_prompts
    from mechscope.steer import effects

    if cfg.prompts is not None and tokenizer is None:
        raise UsageError("--prompts takes text, but the model has no tokenizer; leave it out to continue "
                         "the first concept-free inputs")
    prompts = read_prompts(cfg.prompts) if cfg.prompts is not None else data.prompts
    variants = effects.action_variants(model, cfg.action, v, site, cfg.coeffs, edited)
    return effects.compare_generations(model, tokenizer, prompts, variants, cfg.generate, do_sample=cfg.sample,
                                       temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(SteerConfig, args)
    import torch

    from mechscope.cli.model_source import has_tokenizer, uses_text
    from mechscope.core.jsonl import integer
    from mechscope.core.text import labelled_text
    from mechscope.steer import effects
    from mechscope.steer.apply import SteeringError
    from mechscope.steer.directions import DirectionError

    if not cfg.generate and (cfg.prompts is not None or cfg.sample):
        raise UsageError("--prompts and --sample go with --generate N (the number of new tokens)")
    text = uses_text(cfg.data, has_tokenizer(cfg, "steering_toy"), ("steering_toy",))
    rows = labelled_text(cfg.data, integer((0, 1))) if text else None  # checked before the model loads
    model, tokenizer = load(cfg, "steering_toy")
    data = _data(cfg, model, tokenizer, rows)
    pos_in, neg_in = data.pos, data.neg
    check_inputs(model, pos_in, cfg.data)
    check_inputs(model, neg_in, cfg.data)
    target = cfg.target_token if cfg.target_token is not None else data.target
    if target is not None:
        from mechscope.core.jsonl import check_token_ids, vocab_size

        check_token_ids(torch.tensor([target]), vocab_size(model), "--target-token")
    try:
        v, site = direction(cfg, model, data, getattr(tokenizer, "bos_token_id", None))
        edited = None
        report: dict[str, Any] = {"site": str(site), "method": cfg.method, "norm": float(v.norm()), "action": cfg.action}
        if cfg.action == "add":
            report["results"] = effects.steering_effects(model, neg_in, v, site.replace(positions=None), cfg.coeffs,
                                                         target)
        elif cfg.action == "ablate":
            report["concept_inputs"] = effects.ablation_effect(model, pos_in, v, target)
            report["concept_free_inputs"] = effects.ablation_effect(model, neg_in, v, target)
        else:
            measured, edited = effects.weight_edit_effect(model, pos_in, v, target)
            report.update(measured)
            if cfg.save_model:
                from mechscope.core.checkpoint import save_module
                save_module(cfg.save_model, edited, {"orthogonalized_against": cfg.site, "method": cfg.method})
                report["saved_model"] = str(cfg.save_model)
        if cfg.generate:
            report["generation"] = {"new_tokens": cfg.generate, "decoding": "sampled" if cfg.sample else "greedy",
                                    "prompts": generations(cfg, model, tokenizer, data, v, site, edited)}
    except (SteeringError, DirectionError) as e:
        raise UsageError(str(e)) from None
    if cfg.save_direction:
        from mechscope.core.checkpoint import save_tensors
        save_tensors(cfg.save_direction, {"direction": v.contiguous()}, {"site": str(site), "method": cfg.method})
    print(json.dumps(report, indent=2) if cfg.json else render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    lines = [f"{report['method']} direction at {report['site']} (norm {report['norm']:.3g}), action {report['action']}"]

    def fmt(m: dict[str, float]) -> str:
        effect = f"P(target) {m['p_target_before']:.3f} -> {m['p_target_after']:.3f}, " if "p_target_after" in m else ""
        return f"{effect}KL {m['kl']:.4f}"
    for r in report.get("results", []):
        lines.append(f"  coeff {r['coeff']:g}: concept-free inputs: {fmt(r)}")
    for key in ("concept_inputs", "concept_free_inputs"):
        if key in report:
            lines.append(f"  {key.replace('_', ' ')}: {fmt(report[key])}")
    if "max_abs_diff_vs_hooks" in report:
        lines.append(f"  weight edit vs hooks: max |logit difference| {report['max_abs_diff_vs_hooks']:.2e}")
    if "generation" in report:
        lines += render_generation(report["generation"], report["action"])
    return "\n".join(lines)


def render_generation(gen: dict[str, Any], action: str) -> list[str]:
    """Each prompt, then its continuation without and with the change, one labelled line each."""
    where = {"add": "added at every position", "ablate": "ablated at every layer",
             "orthogonalize": "ablated by the weight edit"}[action]
    lines = [f"continuations ({gen['decoding']}, {gen['new_tokens']} new tokens; the direction {where}):"]
    for i, p in enumerate(gen["prompts"], 1):
        names = [k for k in p if k != "prompt"]
        width = max(len(k) for k in names)
        lines.append(f"  prompt {i}: {json.dumps(p['prompt'], ensure_ascii=False)}")
        lines += [f"    {k:{width}s} | {json.dumps(p[k], ensure_ascii=False)}" for k in names]
    return lines
