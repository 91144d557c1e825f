"""TopK SAE training steps: mechscope against SAELens and EleutherAI's sparsify.

The shape of ``bench_sae.py`` (d_in 512, 4096 latents, k 32, batch 4096, fp32), the same
batches (a synthetic stream with known features, drawn once by mechscope and fed to all
three), the same initial weights (mechscope's, copied into the others) and the same Adam
learning rate (sparsify's default for Adam, 2e-4 / sqrt(latents / 2^14), which mechscope's
benchmark uses too). Each runs its own full training step:

* mechscope: ``Trainer.step`` (normalisation, sparse TopK, AuxK bookkeeping, unit-norm
  decoder with gradient projection, Adam);
* SAELens: ``SAETrainer.step`` on a ``TopKTrainingSAE`` (its defaults: dense activations,
  AuxK, gradient clipping, constant lr schedule, dead-latent statistics);
* sparsify: the autoencoding part of its ``Trainer.fit`` step, written out because that
  loop runs a language model (decoder renormalised, ``SparseCoder`` forward with its fused
  encoder, FVU loss, gradient projection, Adam, the dead-latent counters; ``auxk_alpha``
  0, its default).
"""

from __future__ import annotations

import sys
from importlib.metadata import version

import torch
from _rows import fix_threads, interleaved, row
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer
from sparsify import SparseCoder, SparseCoderConfig

from mechscope.sae.arch import SAE, SAEConfig
from mechscope.sae.train import TrainConfig, Trainer
from mechscope.tasks.synthetic_features import SyntheticConfig, SyntheticFeatures

D, M, K, B = 512, 4096, 32, 4096
LR = 2e-4 / (M / 2 ** 14) ** 0.5


def saelens(init: SAE) -> SAETrainer:
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=M, k=K, dtype="float32", device="cpu"))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):  # same layout: W_enc [D, M], W_dec [M, D]
            getattr(sae, name).copy_(getattr(init, name))
    return SAETrainer(SAETrainerConfig(total_training_samples=10 ** 12, train_batch_size_samples=B, lr=LR,
                                       lr_end=LR), sae,
                      data_provider=iter(()))


class Sparsify:
    """sparsify's training step for one autoencoder (trainer.py, the non-CE branch)."""

    def __init__(self, init: SAE) -> None:
        self.sae = SparseCoder(D, SparseCoderConfig(num_latents=M, k=K), device="cpu", dtype=torch.float32)
        with torch.no_grad():
            self.sae.encoder.weight.copy_(init.W_enc.T), self.sae.encoder.bias.copy_(init.b_enc)
            self.sae.W_dec.copy_(init.W_dec), self.sae.b_dec.copy_(init.b_dec)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=LR)
        self.since_fired = torch.zeros(M, dtype=torch.long)
        self.did_fire = torch.zeros(M, dtype=torch.bool)

    def step(self, x: torch.Tensor) -> None:
        self.sae.set_decoder_norm_to_unit_norm()
        out = self.sae(x, dead_mask=None)
        self.did_fire[out.latent_indices.flatten()] = True
        out.fvu.backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        with torch.no_grad():
            self.since_fired += x.shape[0]
            self.since_fired[self.did_fire] = 0
            self.did_fire.zero_()


def main() -> int:
    threads = fix_threads()
    print(f"== TopK SAE training step (d_in {D}, latents {M}, k {K}, batch {B}, fp32): mechscope vs SAELens "
          f"{version('sae-lens')} vs sparsify {version('eai-sparsify')} (torch {torch.__version__}, threads={threads})")
    world = SyntheticFeatures(SyntheticConfig(d=D, n_features=M, expected_l0=32, decay=0.999, seed=0))
    gen = torch.Generator().manual_seed(1)
    pool = [world.sample(B, gen)[0] for _ in range(4)]  # the same batches for all three
    ours = Trainer(SAEConfig(d_in=D, d_sae=M, arch="topk", k=K), TrainConfig(steps=10 ** 6, batch_size=B, lr=LR,
                                                                             progress=False))
    init = SAE(ours.sae.cfg, seed=ours.cfg.seed)
    lens, sparse = saelens(init), Sparsify(init)
    with torch.no_grad():
        sparse.sae.b_dec.copy_(pool[0].mean(0))  # sparsify starts b_dec at the first batch's mean, as ours does
    i = {"n": 0}

    def batch() -> torch.Tensor:
        i["n"] += 1
        return pool[i["n"] % len(pool)]

    def lens_step() -> None:
        lens.step(batch())
        lens.n_training_steps += 1

    t = interleaved({"mechscope": lambda: ours.step(batch()), "saelens": lens_step,
                     "sparsify": lambda: sparse.step(batch())}, repeats=3 if "--quick" in sys.argv else 9)
    work = f"TopK SAE training step ({D}->{M}, k {K}, batch {B})"
    row(work, f"SAELens {version('sae-lens')}", t["saelens"], t["mechscope"], "steps/s")
    row(work, f"sparsify {version('eai-sparsify')}", t["sparsify"], t["mechscope"], "steps/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
