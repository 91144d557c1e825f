"""Speed of DAS: precomputed activations before the site vs full forwards every step.

1. Whole fit: low-rank DAS on hierarchical equality (both variables, 8 dims each, hidden
   layer 0; the training mixture of WX, YZ and both; the default FitConfig), wall time and
   peak memory, then its IIA on unseen vectors. Target: under 30 s to IIA >= 0.95.
2. Steps per second at batch 6400 of the *same* training (``das.fit``: same data, same
   start, same optimiser and batch order) run two ways, timed interleaved: the tail
   engine (the activations before the site computed once; each step runs only the
   network after it) against full forwards of the whole model for the base and for
   every source in every step (as pyvene does). Both must end at the same basis.
   Target (issue 22): a tail step (parametrisation, mixing, forward, backward, optimiser)
   costs <= 1.2x a plain forward + backward of the layers after the site (``P`` of
   :func:`ratio_ceiling`, timed interleaved with the fits). The old target of 10x the
   full-forward step is retired (its ceiling, printed, is ~2.2x here) and its ratio is
   information, as are full forwards whose sources stop at the site and the step's cost
   in plain forward + backward passes of the whole MLP. Also printed, beside the target:
   the floor under any tail step (:func:`tail_floor`: ``P`` plus gathering the batch's
   precomputed rows at its shuffled indices, the cheapest Adam step and keeping the basis
   orthonormal, each timed in the same run), which says whether the target can be met here.

The process keeps freed memory as the ``mechscope`` command does
(:func:`mechscope.core.alloc.retain_freed_memory`), for every contender alike; the load
average is printed with the timings.

For scale (quoted from the issue, not measured here): pyvene 0.1.8 runs this DAS at about
41 steps/s on a machine like this one (one thread), 11x the cost of a plain forward and
backward of the MLP, and reaches IIA 0.94 after 95 epochs.

Run: ``make bench-perf`` or ``.venv/bin/python benchmarks/bench_das.py [--quick]``.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time

import torch

from _timing import fix_threads, header, interleaved, verdict
from mechscope.core.alloc import retain_freed_memory
from mechscope.causal.das import FitConfig, SubspaceAlignment, das, fit, frozen, widths_of
from mechscope.causal.engine import FullEngine, TailEngine
from mechscope.causal.iia import iia
from mechscope.tasks import hierarchical_equality as task

BATCH, TAIL_TARGET, OLD_RATIO_TARGET, FIT_SECONDS, IIA_TARGET = 6400, 1.2, 10.0, 30.0, 0.95


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def whole_fit(quick: bool) -> bool:
    model = task.load_model()
    n_each = 5000 if quick else 20_000
    tests = {w: task.counterfactuals(2000, 100 + i, w) for i, w in enumerate(task.INTERVENTIONS)}
    before = peak_rss_mb()
    t0 = time.perf_counter()
    train = task.training_counterfactuals(n_each, seed=0)
    alignment, fit = das(model, train, task.site(0), 8, cfg=FitConfig())
    seconds = time.perf_counter() - t0
    scores = {w: iia(model, d, alignment.restrict(task.INTERVENTIONS[w])).value for w, d in tests.items()}
    reached = min(scores.values()) >= IIA_TARGET
    ok = seconds < FIT_SECONDS and reached
    print(f"whole DAS fit (data + precompute + {fit.steps} steps, {len(train)} examples): {seconds:.1f} s, "
          f"peak RSS {peak_rss_mb():.0f} MB ({peak_rss_mb() - before:+.0f} MB over the process before), "
          f"{fit.steps_per_second:.0f} steps/s at batch {FitConfig().batch_size}")
    print("  IIA on unseen vectors: " + ", ".join(f"{w} {v:.3f}" for w, v in scores.items()) +
          f" (target: every one >= {IIA_TARGET} in < {FIT_SECONDS:.0f} s) {verdict(ok)}"
          + ("" if reached else "  [IIA target not reached: the time is for the default fit]"))
    return ok


def steps_per_second(quick: bool) -> bool:
    model = task.load_model()
    train = task.training_counterfactuals(6400 if quick else 19_200, seed=0)  # 3 or 9 full batches per epoch
    site = task.site(0)
    places = {v: site for v in train.variables}
    cfg = FitConfig(batch_size=BATCH, epochs=1 if quick else 2)
    with frozen(model):
        engines = {"tail": TailEngine(model, train, places),
                   "full": FullEngine(model, train, places, full_sources=True),
                   "full_stop": FullEngine(model, train, places, full_sources=False)}
        widths = widths_of(engines["tail"], [site])
    per_step: dict[str, list[float]] = {k: [] for k in engines}
    cpu_step: dict[str, list[float]] = {k: [] for k in (*engines, "after_site")}
    finals: dict[str, torch.Tensor] = {}

    def train_once(kind: str) -> None:  # the real training loop (das.fit), from the same start, on one engine
        trainable = SubspaceAlignment(places, {"WX": 8, "YZ": 8}, widths, seed=0)
        result = fit(model, train, trainable, cfg=cfg, engine=engines[kind])
        per_step[kind].append(result.seconds / result.steps)
        cpu_step[kind].append(result.cpu_seconds / result.steps)
        finals[kind] = trainable.featurizers[0].basis().detach().clone()

    after_site, _ = plain_passes(model, train)
    per_step["after_site"] = []

    def time_after_site() -> None:  # P, the plain forward + backward of the layers after the site, in the same rounds
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(20):
            after_site()
        per_step["after_site"].append((time.perf_counter() - t0) / 20)
        cpu_step["after_site"].append((time.process_time() - c0) / 20)

    with frozen(model):
        for _ in range(5):
            after_site()
    for kind in engines:  # warm-up
        train_once(kind)
    for _ in range(7 if quick else 15):  # interleaved: tail, P, full, full_stop, tail, ...
        for kind in engines:
            train_once(kind)
            if kind == "tail":
                with frozen(model):
                    time_after_site()
    load = os.getloadavg()[0]
    t = {k: statistics.median(v) for k, v in per_step.items()}
    cpu = {k: statistics.median(v) for k, v in cpu_step.items()}
    # same work, same result: every engine ends at the same basis
    gap = max(float((finals[k] - finals["tail"]).abs().max()) for k in finals)
    with frozen(model):
        x = train.base[:BATCH].clone().requires_grad_(True)
        plain = interleaved({"plain": lambda: model(x).sum().backward()}, repeats=7 if quick else 15, inner=5)["plain"]
    ratio, ratio_stop = t["full"] / t["tail"], t["full_stop"] / t["tail"]
    tail_cost = cpu["tail"] / cpu["after_site"]  # the verdict: CPU time, which other processes do not inflate
    ok = tail_cost <= TAIL_TARGET and gap < 1e-3
    print(f"DAS training (das.fit, batch {BATCH}, WX + YZ, 8 dims each, hidden layer 0, {cfg.epochs} epoch(s) of "
          f"{len(train)} examples per fit): CPU time per tail step {cpu['tail'] * 1e3:.2f} ms, per plain forward + "
          f"backward of the layers after the site {cpu['after_site'] * 1e3:.2f} ms: a tail step costs {tail_cost:.2f}x "
          f"that (target <= {TAIL_TARGET}x) {verdict(ok)} (load average {load:.2f}); wall clock: tail "
          f"{1 / t['tail']:.0f} steps/s ({t['tail'] * 1e3:.2f} ms), after the site {t['after_site'] * 1e3:.2f} ms, "
          f"{t['tail'] / t['after_site']:.2f}x")
    print(f"  same result: the learnt bases differ by at most {gap:.1e} between engines")
    print(f"  for information: full forwards {1 / t['full']:.0f} steps/s ({t['full'] * 1e3:.2f} ms), ratio {ratio:.2f}x "
          f"(the retired target was >= {OLD_RATIO_TARGET:.0f}x); full forwards with sources stopped at the site "
          f"{1 / t['full_stop']:.0f} steps/s (ratio {ratio_stop:.2f}x); a plain forward + backward of the whole MLP "
          f"{plain * 1e3:.2f} ms (a tail step costs {t['tail'] / plain:.1f}x that, a full-forward step "
          f"{t['full'] / plain:.1f}x); pyvene 0.1.8 (quoted): ~41 steps/s, 11x a plain forward + backward")
    ceiling, p, e = ratio_ceiling(model, train, repeats=7 if quick else 15)
    print(f"  ceiling of the ratio for any tail implementation: {ceiling:.2f}x = (P + E) / P, with P "
          f"{p * 1e3:.2f} ms the plain forward + backward of the layers after the site and E {e * 1e3:.2f} ms "
          f"plain forwards of the whole MLP on the base and the {len(train.variables)} sources (all a "
          f"full-forward step computes beyond a tail step){'' if ceiling >= OLD_RATIO_TARGET else '; the retired 10x target is out of reach here'}")
    floor, parts = tail_floor(model, train, widths, repeats=7 if quick else 15)
    print(f"  floor of the tail step for any tail implementation (CPU time): {floor:.2f}x P = (P + G + A + R) / P, "
          f"with P {parts['P'] * 1e3:.2f} ms, G {parts['G'] * 1e3:.2f} ms to gather the batch's {BATCH} rows of the "
          f"base's and sources' activations at the site ([{len(train)}, {parts['width']}] float32) at the step's "
          f"random indices, A {parts['A'] * 1e3:.2f} ms for torch's fastest Adam step (fused) on the basis, R "
          f"{parts['R'] * 1e3:.2f} ms to keep it orthonormal (tangent projection and one QR); not counted: the "
          f"interchange itself, autograd's bookkeeping"
          + ("" if floor <= TAIL_TARGET else f"; the {TAIL_TARGET}x target is below this floor"))
    return ok


def tail_floor(model, train, widths, repeats: int) -> tuple[float, dict[str, float]]:
    """(floor, parts): the least a tail step can cost against ``P``, in this process's CPU time.

    Any tail step must (a) run the layers after the site forward and backward on the batch
    (``P``, which reads one fixed, contiguous batch already in cache), (b) read the batch's
    base and source activations at the site from where they were precomputed, at the
    shuffled indices of the step (``G``: one ``index_select`` of the rows of a table as wide
    as the base's and every source's activations together, a fresh random batch each time),
    (c) take an optimiser step on the basis (``A``: ``torch.optim.Adam(fused=True)``, the
    cheapest Adam torch has, with a gradient already in place), and (d) keep the basis
    orthonormal, as DAS requires (``R``: the tangent projection and QR retraction of
    :class:`~mechscope.causal.stiefel.StiefelSubspace`, the cheapest way mechscope has;
    torch's orthogonal parametrisation costs more).
    """
    after_site, _ = plain_passes(model, train)
    (site, d), = widths.items()
    width = d * (1 + len(train.variables))
    table = torch.randn(len(train), width)  # [n, d (1 + V)]: the gather's cost depends on the shape only
    gen = torch.Generator().manual_seed(1)
    trainable = SubspaceAlignment({v: site for v in train.variables}, {"WX": 8, "YZ": 8}, widths, seed=0)
    params = list(trainable.parameters())
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    adam = torch.optim.Adam(params, lr=1e-2, fused=True)

    def gather() -> None:
        table.index_select(0, torch.randperm(len(train), generator=gen)[:BATCH])

    def permutation() -> None:  # G's own index draw, subtracted
        torch.randperm(len(train), generator=gen)[:BATCH]

    def retract() -> None:
        trainable.before_step()
        trainable.after_step()

    fns = {"P": after_site, "G+perm": gather, "perm": permutation, "A": adam.step, "R": retract}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    with frozen(model):
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for k, fn in fns.items():
                c0 = time.process_time()
                for _ in range(20):
                    fn()
                cpu[k].append((time.process_time() - c0) / 20)
    t = {k: statistics.median(v) for k, v in cpu.items()}
    parts = {"P": t["P"], "G": max(t["G+perm"] - t["perm"], 0.0), "A": t["A"], "R": t["R"], "width": width}
    return (parts["P"] + parts["G"] + parts["A"] + parts["R"]) / parts["P"], parts


def plain_passes(model, train):
    """(P, E) as functions: ``P`` the plain forward + backward of the layers after the site on
    one batch (input gradient only: the model is frozen), ``E`` plain forwards of the whole
    model on the base and on each source (what a full-forward step computes beyond a tail step)."""
    import torch.nn.functional as F

    idx = torch.arange(BATCH)
    base = train.base[idx]
    sources = [train.sources[v][idx] for v in train.variables]
    labels = train.labels[idx]
    with frozen(model), torch.no_grad():
        h0 = model.acts[0](model.layers[0](base))  # the site: hidden layer 0 after its ReLU

    def after_site() -> None:  # layers 1.. and the readout, forward and backward (input gradient only)
        h = h0.clone().requires_grad_(True)
        x = h
        for layer, act in zip(model.layers[1:], model.acts[1:]):
            x = act(layer(x))
        F.cross_entropy(model.readout(x), labels).backward()

    def precomputed() -> None:
        with torch.no_grad():
            for x in (base, *sources):
                model(x)

    return after_site, precomputed


def ratio_ceiling(model, train, repeats: int) -> tuple[float, float, float]:
    """(ceiling, P, E): the best ratio a tail engine could show against full forwards.

    A tail step must at least run the network after the site forward and backward on the
    batch (``P``: plain, hook-free, no rotation, no optimiser). The full-forward step does
    that too, plus what the tail has precomputed (``E``: bounded above by plain forwards
    of the whole model on the base and on each source). So no tail implementation can be
    faster than ``(P + E) / P`` times the full forwards -- and ours also pays for the
    rotations, the interchange and the optimiser, which the full forwards pay too.
    """
    after_site, precomputed = plain_passes(model, train)
    with frozen(model):
        t = interleaved({"P": after_site, "E": precomputed}, repeats=repeats, inner=5)
    return (t["P"] + t["E"]) / t["P"], t["P"], t["E"]


def main() -> int:
    quick = "--quick" in sys.argv
    threads = fix_threads()
    header("DAS training speed", threads)
    print(f"keeping freed memory as the mechscope command does: {retain_freed_memory()}; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    ok = whole_fit(quick)
    ok = steps_per_second(quick) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
