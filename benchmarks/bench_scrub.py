"""Speed of causal scrubbing: one batched forward per tree depth against one forward per tree node.

On the built-in induction model (k_composition and q_composition) and on hierarchical
equality (wx_and_yz), for one scrub evaluation (the hypothesis; the full-scrub reference
is a second tree of its own): the forwards ``causal.scrub`` runs (one over the pool for
every node's unscrubbed activations, then one per depth of the treeified graph) against the
naive count (one forward per tree node and one per randomly resampled activation), and the
wall time of the batched evaluation against that naive reference (one forward per tree node
and per resample, over every input of the pool), timed interleaved, with the same losses
(checked). For information: one forward per tree node with the resamples read from the
clean cache (the same rows through the model as the batched levels, in more calls: on a CPU
with batches this size the two cost about the same; the saving is the resamples' forwards
and, where calls are dear, the number of calls). Target: fewer forwards than the naive count
on the induction graph, and not slower than the naive reference.

Run: ``.venv/bin/python benchmarks/bench_scrub.py``.
"""

from __future__ import annotations

import sys

import torch

from _timing import fix_threads, header, interleaved, verdict
from mechscope.causal import scrub as sc
from mechscope.core.intervene import Replace
from mechscope.core.run import run
from mechscope.tasks import scrub_worlds


def per_node(world, root, clean, leaves_by_forward: bool) -> torch.Tensor:
    """The reference: one forward per tree node over every input of the pool; with
    ``leaves_by_forward`` also one per randomly resampled activation (the naive count),
    else those read from the clean cache."""
    def leaf(parent: str, rows: torch.Tensor) -> torch.Tensor:
        if not leaves_by_forward:
            return clean[parent][rows]
        site = world.graph.node(parent).site
        return run(world.model, world.inputs[rows], cache=[site], stop_when_cached=True)[1][site]

    def value(tree):
        plan = [(world.graph.node(p).site, Replace(value(s) if isinstance(s, sc._Tree) else leaf(p, s)))
                for p, s in tree.patches]
        if tree.node == sc.OUTPUT:
            return world.loss(run(world.model, world.inputs[tree.rows], plan)[0], tree.rows)
        site = world.graph.node(tree.node).site
        return run(world.model, world.inputs[tree.rows], plan, cache=[site])[1][site]
    return value(root)


@torch.no_grad()
def one(world, name: str) -> bool:
    h = world.hypotheses[name]
    res = sc.scrub(world.model, world.inputs, world.graph, h, world.loss)
    clean, _, _ = sc._clean(world.model, world.inputs, world.graph, world.loss, 4096)
    root, nodes, leaves = sc._treeify(world.graph, h, len(world.inputs), torch.Generator().manual_seed(0))
    ev = sc._Evaluator(world.model, world.inputs, world.graph, clean, world.loss, 4096)
    same = torch.allclose(ev.evaluate(root), per_node(world, root, clean, True), rtol=1e-4, atol=1e-5)
    times = interleaved({"batched": lambda: sc._Evaluator(world.model, world.inputs, world.graph, clean, world.loss,
                                                          4096).evaluate(root),
                         "naive": lambda: per_node(world, root, clean, True),
                         "per_node": lambda: per_node(world, root, clean, False)}, repeats=5)
    print(f"{world.name:>22} {name:<14} n={res.n:<5} forwards {res.forwards:>3} (naive {res.naive_forwards:>3}: "
          f"{nodes} tree nodes + {leaves} resamples + 1 clean)  batched {times['batched'] * 1e3:7.1f} ms  "
          f"naive {times['naive'] * 1e3:7.1f} ms ({times['naive'] / times['batched']:.1f}x)  [one forward per tree "
          f"node, resamples cached: {times['per_node'] * 1e3:.1f} ms]  same losses {same}  "
          f"recovered {res.recovered:.3f}")
    # a chain (no resamples, one tree node per depth) has nothing to batch: only the count and losses are checked
    faster = res.forwards == res.naive_forwards or times["batched"] <= 1.1 * times["naive"]
    return same and res.forwards <= res.naive_forwards and faster


def main() -> int:
    threads = fix_threads()
    header("causal scrubbing: forwards per evaluation, batched vs one per tree node", threads)
    ind = scrub_worlds.induction_world(n=128)
    eq = scrub_worlds.equality_world(n=2000)
    ok = [one(ind, "k_composition"), one(ind, "q_composition"), one(eq, "wx_and_yz")]
    fewer = sc.scrub(ind.model, ind.inputs, ind.graph, ind.hypotheses["k_composition"], ind.loss)
    ok.append(fewer.forwards < fewer.naive_forwards)
    print(f"{verdict(all(ok))}: every evaluation gives the naive reference's losses, in no more forwards, and is "
          "not slower where it takes fewer; the induction graph takes fewer forwards than the naive count")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
