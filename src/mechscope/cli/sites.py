"""``mechscope sites``: the named sites and module paths of a model, to write sites with.

Builds the model (a built-in one by name, or a random one from a Hugging Face
``config.json``, with no download), finds its structure from the model itself and prints
every alias (``resid_post.3`` -> ``transformer.h.3``, output, element) and every module
path with its class and what it returned in the probe forward (a tensor or a tuple).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from mechscope.cli.model_source import ModelSource, load
from mechscope.core.config import add_config_arguments, config, config_from_args, param

DESCRIPTION = """\
List a model's named sites (embed, resid_pre.L, attn_out.L, head_out.L.H, mlp_hidden.L,
mlp_out.L, resid_post.L, unembed) with the module path, io and element each resolves to,
then every module path with its class and what it returns. Give exactly one of --model
(a built-in model) or --hf-config (a Hugging Face config.json, as a path or as JSON text;
a random model is built from it, nothing is downloaded)."""


@config
class SitesConfig(ModelSource):
    """Options of ``mechscope sites``."""

    model_required = True
    FIELD_HELP = {"hf_config": "a Hugging Face config.json path, or its JSON text, with model_type"}

    json: bool = param(False, help="print JSON instead of tables")
    modules: bool = param(True, help="also list every module path")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sites", help="list a model's named sites and module paths",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, SitesConfig)
    return parser


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(SitesConfig, args)
    model, _ = load(cfg)
    from mechscope.core.models import list_sites, structure

    s = structure(model)
    rows = list_sites(model)
    if not cfg.modules:
        rows = [r for r in rows if r["kind"] == "alias"]
    if cfg.json:
        print(json.dumps({"model": s.model_class, "structure": summary(s), "sites": rows}, indent=2))
    else:
        print(render(s, rows))
    return 0


def summary(s: Any) -> dict[str, Any]:
    """The structure's numbers and paths as plain JSON values."""
    keys = ("blocks_path", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_mlp",
            "embed", "final_norm", "unembed", "probe_error")
    out = {k: getattr(s, k) for k in keys}
    out["blocks"] = [dataclasses.asdict(b) for b in s.blocks]
    return out


def render(s: Any, rows: list[dict[str, Any]]) -> str:
    """Aligned tables: a one-line summary, the aliases, then the modules."""
    heads = f"{s.n_heads} heads x {s.head_dim}" + (f" ({s.n_kv_heads} kv)" if s.n_kv_heads != s.n_heads else "")
    lines = [f"{s.model_class}: {s.n_layers} block{'' if s.n_layers == 1 else 's'} at {s.blocks_path or '-'}, d_model {s.d_model or '?'}, "
             f"{heads if s.n_heads else 'heads ?'}, d_mlp {s.d_mlp or '?'}"]
    if s.probe_error:
        lines.append(f"(probe forward failed: {s.probe_error}; tuple/tensor outputs are unknown)")
    aliases = [r for r in rows if r["kind"] == "alias"]
    if aliases:
        lines += ["", table(["ALIAS", "PATH", "IO", "ELEMENT", "WIDTH", "NOTE"], [
            [r["name"], r["path"], r["io"], _text(r["element"]), _text(r["width"]), _note(r)] for r in aliases])]
    else:
        lines += ["", "no aliases apply (no block list was found); use the module paths below"]
    modules = [r for r in rows if r["kind"] == "module"]
    if modules:
        lines += ["", table(["MODULE", "CLASS", "RETURNS"], [
            [r["path"] or "<model>", r["class"], r["returns"] or "- (not run)"] for r in modules])]
    return "\n".join(lines)


def _note(row: dict[str, Any]) -> str:
    if row["heads"]:
        return f"h in 0..{row['heads'] - 1}"
    return f"returns {row['returns']}" if row["io"] == "output" and row["returns"] else ""


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces, the last one unpadded."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r[:-1], widths)) + "  " + str(r[-1])  # noqa: E731
    return "\n".join(fmt(r).rstrip() for r in [header, *rows])
