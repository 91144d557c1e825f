"""Keeping the Hugging Face Hub out of a model load unless a download was asked for.

``local_files_only=True`` covers the files transformers fetches, but not everything it may
reach for while it builds a model: an attention implementation named after a Hub kernel
repository (``"kernels-community/flash-attn"``), or ``flash_attention_2`` where the
``flash_attn`` package is missing (transformers then falls back to a Hub kernel), makes the
``kernels`` package call the Hub. Two guards, used by :func:`mechscope.core.load.load_model`
and :func:`mechscope.core.models.hf_model_from_config`:

- :func:`check_attn_implementation` refuses, before transformers sees the config, any
  attention implementation other than eager, sdpa, flex_attention or a flash attention
  whose package is installed here;
- :func:`hub_offline` puts ``huggingface_hub`` in offline mode for the duration of the
  load. It sets ``HF_HUB_OFFLINE=1`` *and* the module constant ``huggingface_hub`` read
  from it at import, so it holds where ``huggingface_hub`` was imported earlier (by the
  user, by ``datasets``), and restores both afterwards.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from typing import Any, Iterator

# implementations that run on code installed here; flash attention needs its own package
LOCAL_ATTENTION = ("eager", "sdpa", "flex_attention")
_FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
_ATTN_KEYS = ("attn_implementation", "_attn_implementation")


class HubAccessError(ValueError):
    """A model load that would reach the Hugging Face Hub without a download being asked for."""


def check_attn_implementation(name: Any, where: str) -> None:
    """Refuse an attention implementation that is not local (see the module docstring).

    ``None`` (transformers' default, eager or sdpa) passes; ``where`` names the config or
    option in the message."""
    if name is None or name in LOCAL_ATTENTION:
        return
    allowed = f"use one of {list(LOCAL_ATTENTION)}"
    if name in _FLASH_PACKAGES:
        package = _FLASH_PACKAGES[name]
        if importlib.util.find_spec(package) is not None:
            return
        raise HubAccessError(f"{where}: attn_implementation {name!r} needs the {package} package, which is not "
                             "installed (transformers would fetch a kernel from the Hub instead); install "
                             f"{package}, or {allowed}")
    if isinstance(name, str) and "/" in name:
        raise HubAccessError(f"{where}: attn_implementation {name!r} is a Hub kernel repository, which mechscope "
                             f"never fetches while it loads a model; {allowed}")
    raise HubAccessError(f"{where}: attn_implementation {name!r} is not an attention implementation mechscope "
                         f"allows; {allowed} (or flash_attention_2 / _3 with their package installed)")


def check_config_attention(config: Any, where: str) -> None:
    """:func:`check_attn_implementation` on every attention setting of a config dict,
    nested sub-configs (``text_config``) included."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key in _ATTN_KEYS:
                check_attn_implementation(value, where)
            else:
                check_config_attention(value, where)


def _hub_constants() -> Any:
    """``huggingface_hub.constants`` imported now (so it is not first read under the
    override), or None where huggingface_hub is not installed."""
    if importlib.util.find_spec("huggingface_hub") is None:
        return None
    import huggingface_hub.constants

    return huggingface_hub.constants


@contextmanager
def hub_offline(allow_download: bool = False) -> Iterator[None]:
    """Offline mode for ``huggingface_hub`` inside the block (nothing changes with ``allow_download``)."""
    if allow_download:
        yield
        return
    constants = _hub_constants()
    env = os.environ.get("HF_HUB_OFFLINE")
    flag = getattr(constants, "HF_HUB_OFFLINE", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env
        if constants is not None:
            constants.HF_HUB_OFFLINE = flag


__all__ = ["HubAccessError", "LOCAL_ATTENTION", "check_attn_implementation", "check_config_attention", "hub_offline"]
