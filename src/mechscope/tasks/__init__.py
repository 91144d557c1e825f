"""Worlds: the built-in tasks with known ground truth. One file per task with its data,
causal model (where it has one), model recipe and checkpoint; files that combine a world
with a method (``modular``: the grokking model's Fourier algorithm; ``spd_targets`` and
``spd_assess``; ``sae_worlds`` and ``sae_synthetic``) live here too, above the methods they
use. :mod:`mechscope.tasks.registry` is the one registry of them all."""
