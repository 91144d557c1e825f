"""The SAELens on-disk layout: a directory with ``cfg.json`` and ``sae_weights.safetensors``.

Published dictionaries (downloaded by the user: mechscope never downloads) load from
such a directory, and mechscope's dictionaries save to it. The mapping (SAELens v6 names):

| ``architecture``         | mechscope                               | tensors                         |
|--------------------------|-----------------------------------------|---------------------------------|
| ``standard``             | relu, kind sae                          | W_enc, b_enc, W_dec, b_dec      |
| ``topk``                 | topk (``k``)                            | same                            |
| ``jumprelu``             | jumprelu (batchtopk/matryoshka converted)| + threshold                    |
| ``transcoder``           | relu, kind transcoder (``d_out``)       | same as standard                |
| ``skip_transcoder``      | relu, kind skip_transcoder              | + W_skip ``[d_out, d_in]``      |
| ``jumprelu_transcoder``  | jumprelu, kind transcoder               | + threshold                     |

Shapes are SAELens': ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``. Loading is exact
for what the layout can say: ``apply_b_dec_to_input: false`` is folded into ``b_enc``
(``b_enc + b_dec W_enc``), half-precision weights are read as fp32, and run-time
normalisation that the file alone cannot reproduce (``constant_norm_rescale``,
``layer_norm``; ``expected_average_only_in`` without its scaling factor) is an error that
says so rather than a silently different dictionary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from mechscope.core.checkpoint import CheckpointError, atomic_path, load_json, save_json_atomic
from mechscope.sae.arch import SAE, SAEConfig, SAEError, fold_scale, to_jumprelu

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
_TO_LENS = {("relu", "sae"): "standard", ("topk", "sae"): "topk", ("jumprelu", "sae"): "jumprelu",
            ("relu", "transcoder"): "transcoder", ("relu", "skip_transcoder"): "skip_transcoder",
            ("jumprelu", "transcoder"): "jumprelu_transcoder"}
_FROM_LENS = {v: k for k, v in _TO_LENS.items()}
_FETCH_AGAIN = "Download the SAE directory again, or re-save it with save_saelens"


def save_saelens(directory: str | Path, sae: SAE, hook_name: str | None = None, model_name: str | None = None,
                 metadata: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` as an SAELens inference directory; returns it.

    BatchTopK and Matryoshka dictionaries are written as JumpReLU with their global
    threshold. ``hook_name``/``model_name`` go to ``metadata`` (SAELens uses them to place
    the SAE); pass mechscope's site string if there is no TransformerLens hook name.
    """
    sae = to_jumprelu(sae)
    key = (sae.cfg.arch, sae.cfg.kind)
    if key not in _TO_LENS:
        raise SAEError(f"SAELens has no inference architecture for arch={key[0]!r} kind={key[1]!r}; "
                       f"it reads {sorted(_FROM_LENS)}; save with mechscope.sae.save_sae instead")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "architecture": _TO_LENS[key], "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": sae.cfg.kind == "sae", "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"hook_name": hook_name, "model_name": model_name, **(metadata or {})},
    }
    if sae.cfg.arch == "topk":
        cfg.update(k=sae.cfg.k, rescale_acts_by_decoder_norm=False)
    if sae.cfg.kind != "sae":
        cfg["d_out"] = sae.d_out
    tensors = {k: v.detach().float().contiguous() for k, v in sae.state_dict().items()}
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    save_json_atomic(directory / CFG, cfg)
    return directory


def _read_cfg(directory: Path) -> dict[str, Any]:
    path = directory / CFG
    if not path.exists():
        raise CheckpointError(f"{directory}: no {CFG}; an SAELens SAE directory holds {CFG} and {WEIGHTS} "
                              "(download it yourself, e.g. with huggingface-cli, then point here)")
    cfg = load_json(path, "SAELens cfg.json", _FETCH_AGAIN)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: a JSON {type(cfg).__name__}, not an object; is this an SAELens cfg.json?")
    for field in ("architecture", "d_in", "d_sae"):
        if field not in cfg:
            raise CheckpointError(f"{path}: missing field {field!r}; is this an SAELens cfg.json?")
    for field in ("d_in", "d_sae", "k", "d_out"):
        value = cfg.get(field)
        if (field in ("d_in", "d_sae") or value is not None) and not (
                isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise CheckpointError(f"{path}: {field}={json.dumps(value)[:40]}, expected a positive integer. "
                                  f"{_FETCH_AGAIN}")
    if not isinstance(cfg["architecture"], str):
        raise CheckpointError(f"{path}: architecture={json.dumps(cfg['architecture'])[:40]}, expected a string "
                              f"such as {sorted(_FROM_LENS)[0]!r}. {_FETCH_AGAIN}")
    return cfg


def _read_weights(directory: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The weights, ``W_enc`` checked against cfg.json's sizes before any dictionary is built
    (a damaged size must not allocate a huge one)."""
    if not (directory / WEIGHTS).exists():
        raise CheckpointError(f"{directory}: no {WEIGHTS} beside {CFG}")
    try:
        state = load_file(str(directory / WEIGHTS))
    except Exception as e:  # safetensors' own error type
        raise CheckpointError(f"{directory / WEIGHTS}: cannot be read as safetensors ({e}). {_FETCH_AGAIN}") from None
    w_enc = state.get("W_enc")
    if w_enc is None or list(w_enc.shape) != [cfg["d_in"], cfg["d_sae"]]:
        found = list(w_enc.shape) if w_enc is not None else "no W_enc"
        raise CheckpointError(f"{directory / WEIGHTS}: W_enc is {found}, which does not match its cfg.json "
                              f"(d_in={cfg['d_in']}, d_sae={cfg['d_sae']}). {_FETCH_AGAIN}")
    return state


def load_saelens(directory: str | Path, norm_scaling_factor: float | None = None) -> tuple[SAE, dict[str, Any]]:
    """Load an SAELens directory as an :class:`SAE` (fp32); returns ``(sae, cfg_dict)``.

    ``norm_scaling_factor`` is the factor a dictionary trained with
    ``normalize_activations="expected_average_only_in"`` expects its inputs multiplied by
    (SAELens lists it beside the release); it is folded into the weights.
    """
    directory = Path(directory)
    cfg = _read_cfg(directory)
    arch = cfg["architecture"]
    if arch not in _FROM_LENS:
        raise SAEError(f"{directory}: SAELens architecture {arch!r} is not supported; mechscope reads {sorted(_FROM_LENS)}")
    ours, kind = _FROM_LENS[arch]
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise SAEError(f"{directory}: normalize_activations={norm!r} rescales every input at run time, which "
                       "a fixed dictionary cannot reproduce; mechscope supports 'none' (and "
                       "'expected_average_only_in' with norm_scaling_factor=)")
    if norm == "expected_average_only_in" and norm_scaling_factor is None:
        raise SAEError(f"{directory}: trained on inputs scaled by a norm scaling factor that cfg.json does not "
                       "record; pass load_saelens(..., norm_scaling_factor=<the release's factor>)")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise SAEError(f"{directory}: rescale_acts_by_decoder_norm=true selects TopK latents by h·|W_dec|; save the "
                       "SAE for inference in SAELens (norms folded) and load that directory")
    state = _read_weights(directory, cfg)
    if "log_threshold" in state and "threshold" not in state:
        state["threshold"] = state.pop("log_threshold").float().exp()
    d_out = cfg.get("d_out") if kind != "sae" else None
    if ours == "topk" and cfg.get("k") is None:
        raise CheckpointError(f"{directory / CFG}: a topk SAE without k (its active latents per token); "
                              f"is this an SAELens cfg.json? {_FETCH_AGAIN}")
    sae = SAE(SAEConfig(d_in=cfg["d_in"], d_sae=cfg["d_sae"], arch=ours, kind=kind, d_out=d_out,
                        k=cfg["k"] if ours == "topk" else 32))
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = [f"{k}: file {list(state[k].shape)}, expected {list(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or wrong:
        raise CheckpointError(f"{directory / WEIGHTS}: does not match its cfg.json ({arch}, d_in={cfg['d_in']}, "
                              f"d_sae={cfg['d_sae']}): missing {missing}, shape mismatches {wrong}")
    state = {k: state[k].to(v.dtype) for k, v in expected.items()}
    if kind == "sae" and cfg.get("apply_b_dec_to_input") is False:
        state["b_enc"] = state["b_enc"] + state["b_dec"] @ state["W_enc"]  # same pre-activations, b_dec now subtracted
    sae.load_state_dict(state)
    if norm == "expected_average_only_in":
        sae = fold_scale(sae, float(norm_scaling_factor))
    return sae.eval(), cfg

