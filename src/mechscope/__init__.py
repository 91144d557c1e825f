"""mechscope: mechanistic interpretability on one primitive, an intervention at a site.

Importing the package is cheap and side-effect free: submodules are loaded on first
attribute access, nothing is printed and nothing global is patched.
"""

from __future__ import annotations

from mechscope.core.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> submodule that defines it (loaded lazily, see __getattr__)
_EXPORTS = {
    **dict.fromkeys(["Site", "BatchInfo", "register_position_fn"], "mechscope.core.site"),
    **dict.fromkeys(["hooked", "run", "cache", "interchange"], "mechscope.core.run"),
    **dict.fromkeys(["Replace", "Zero", "Mean", "Resample", "Add", "ProjectOut", "Apply",
                     "FeatureInterchange"], "mechscope.core.intervene"),
    **dict.fromkeys(["Featurizer", "Identity", "LinearFeaturizer", "Subspace", "Rotation", "PCA"],
                    "mechscope.core.featurize"),
    "collate": "mechscope.core.batch",
    **dict.fromkeys(["structure"], "mechscope.core.structure"),
    **dict.fromkeys(["resolve", "list_sites"], "mechscope.core.aliases"),
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
