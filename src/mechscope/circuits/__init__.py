"""Circuit tools on any model with sites: activation patching, attribution patching,
head scores and ablation sweeps, direct logit attribution and the logit lens, and Fourier
tools (their reading of the modular-addition model is :mod:`mechscope.tasks.modular`)."""
