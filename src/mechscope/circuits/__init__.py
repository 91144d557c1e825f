"""Circuit tools on any model with sites: activation patching, attribution patching,
head scores and ablation sweeps, direct logit attribution and the logit lens, and the
Fourier analysis of modular arithmetic."""
