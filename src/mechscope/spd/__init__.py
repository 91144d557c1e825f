"""Stochastic parameter decomposition (SPD): decompose a network's weights into the
mechanisms it uses (Bushnaq, Braun, Sharkey 2025; ``/work/shared/specs/spd.md``).

Every decomposed weight matrix becomes ``C`` rank-one subcomponents ``U_c V_c``; a learned
causal importance ``g_c(x)`` says which of them input ``x`` needs; training makes the
model, run with its subcomponents under random masks that keep the important ones, match
the frozen target while as few subcomponents as possible are important. Runs on any
``nn.Module`` by site path (linear, Conv1D, embedding layers, inserted identities)
through the core's hooks.

::

    from mechscope.spd import SPDConfig, train_spd
    run = train_spd(model, data, SPDConfig(sites=("encoder", "decoder"), tied=("decoder=encoder",)))
    run.decomposition.subcomponent_norms()

Modules: ``config`` (SPDConfig), ``components``, ``importance``, ``masks`` (hard sigmoids
and stochastic masks), ``losses``, ``decomposition``, ``passes`` (the hooked forwards),
``objective`` (one step's losses), ``train``, ``checkpoint``, ``evals``, ``surgery``,
``figures`` (the built-in targets, their recipes and their assessment are worlds:
:mod:`mechscope.tasks.spd_targets`, :mod:`mechscope.tasks.spd_assess`); data parallelism is
:mod:`mechscope.core.distributed`.
Names below are imported lazily, so ``import mechscope.spd`` does not import torch.
"""

from __future__ import annotations

from mechscope.core.lazy import lazy_exports

_EXPORTS = {
    "SPDConfig": "mechscope.spd.config",
    "SPDError": "mechscope.spd.components",
    "Decomposition": "mechscope.spd.decomposition",
    "SPDObjective": "mechscope.spd.objective",
    "train_spd": "mechscope.spd.train",
    "SPDRun": "mechscope.spd.train",
    "save_decomposition": "mechscope.spd.checkpoint",
    "load_decomposition": "mechscope.spd.checkpoint",
    "importance_matrix": "mechscope.spd.evals",
    "identity_report": "mechscope.spd.evals",
    "dense_report": "mechscope.spd.evals",
    "ablation_effects": "mechscope.spd.evals",
    "mmcs_ml2r": "mechscope.spd.evals",
    "live_counts": "mechscope.spd.evals",
    "reconstruction_losses": "mechscope.spd.evals",
    "lm_metrics": "mechscope.spd.evals",
    "ablate_weights": "mechscope.spd.surgery",
    "AblateSubcomponents": "mechscope.spd.surgery",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
