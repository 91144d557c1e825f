"""Causal scrubbing (Chan et al. 2022, Redwood Research): resample what a hypothesis calls irrelevant.

A :class:`ModelGraph` names the model's computational graph at the grain the hypothesis
speaks of: nodes are sites (a head's output, a head's keys, a hidden layer), each with its
parent nodes, in forward order, and the nodes the output reads. A :class:`ScrubHypothesis`
is a subgraph of it: the output's parents that matter, and for each node on a claimed path
the parents whose paths matter and what the node carries, as a key per input of the pool
(inputs with equal keys are interchangeable for that node; ``None``: the input itself).

Scrubbing evaluates the model on each input ``x`` of the pool, treeified: a claimed parent
``P`` of a node run on input ``r`` takes its value from a run on an input ``r'`` drawn from
those that agree with ``r`` on ``P``'s key, in which ``P``'s own parents are scrubbed the
same way (recursively); an unclaimed parent takes its value on an input drawn at random
(the unscrubbed model there). A node's dependence on the input along paths the graph does
not list is the input of the run it is computed in. Score (the paper's)::

    recovered = (L_full_scrub − L_scrubbed) / (L_full_scrub − L_clean)

with ``L_clean`` the model's loss and ``L_full_scrub`` the loss with every node of the
graph resampled at random (the hypothesis that nothing in the graph matters), a seeded
bootstrap interval over the inputs beside it.

Speed: the unscrubbed activations of every node on the whole pool come from one forward;
every tree node at one depth, for every input, runs in one batched forward (its rows
concatenated, each row carrying its own patched parents), so an evaluation takes
``1 + depth`` forwards (per ``batch_size`` rows) where one forward per tree node and per
random resample would take ``ScrubResult.naive_forwards``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from mechscope.core.run import find_module, run
from mechscope.core.site import Site, SiteError
from mechscope.core.stats import bootstrap_interval

OUTPUT = "output"
MAX_TREE = 4096  # tree nodes; a treeified graph grows with the number of claimed paths
Loss = Callable[[Any, Tensor], Tensor]  # (model output for rows, rows [b] long) -> [b] per-input loss


class ScrubError(ValueError):
    """A graph, hypothesis or pool that causal scrubbing cannot use."""


@dataclass(frozen=True)
class Node:
    """One node of the model's graph: its site and the nodes it reads (by name)."""

    name: str
    site: Site
    parents: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "parents", tuple(self.parents))


@dataclass(frozen=True)
class ModelGraph:
    """Nodes in forward order (each node's parents before it) and the nodes the output reads."""

    nodes: tuple[Node, ...]
    output: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "output", tuple(self.output))
        seen: dict[str, Site] = {}
        for node in self.nodes:
            if node.name == OUTPUT or node.name in seen:
                raise ScrubError(f"graph node name {node.name!r} is {'reserved' if node.name == OUTPUT else 'repeated'}; "
                                 "give every node its own name")
            if node.site in seen.values():
                raise ScrubError(f"graph nodes {next(n for n, s in seen.items() if s == node.site)!r} and {node.name!r} "
                                 f"are both at site {node.site}; one site is one node")
            late = [p for p in node.parents if p not in seen]
            if late:
                raise ScrubError(f"graph node {node.name!r} reads {late}, which are not nodes listed before it; list "
                                 "nodes in forward order, each after its parents")
            seen[node.name] = node.site
        unknown = [p for p in self.output if p not in seen]
        if unknown or not self.output:
            raise ScrubError(f"the graph's output reads {list(self.output)}; {unknown or 'none'} are not nodes of it")

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def parents(self, name: str) -> tuple[str, ...]:
        return self.output if name == OUTPUT else self.node(name).parents

    def check_sites(self, model: nn.Module) -> None:
        for node in self.nodes:
            try:
                find_module(model, node.site.path)
            except SiteError as e:
                raise ScrubError(f"graph node {node.name!r} is at {node.site}, a site {type(model).__name__} does not "
                                 f"have: {e}") from None


@dataclass(frozen=True, eq=False)
class Claim:
    """What a node carries (``key``: [n_pool], equal keys interchangeable; None: the input
    itself) and which of its parents' paths matter."""

    parents: tuple[str, ...] = ()
    key: Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "parents", tuple(self.parents))


@dataclass(frozen=True, eq=False)
class ScrubHypothesis:
    """The output's parents that matter and a :class:`Claim` for every node on a claimed path."""

    name: str
    output: tuple[str, ...]
    claims: Mapping[str, Claim] = field(default_factory=dict)

    def check(self, graph: ModelGraph, n_pool: int) -> None:
        """The hypothesis's graph must be a subgraph of ``graph``, every claimed node reached, every key [n_pool]."""
        names = {n.name for n in graph.nodes}
        for child, claimed in [(OUTPUT, self.output), *((c, cl.parents) for c, cl in self.claims.items())]:
            if child != OUTPUT and child not in names:
                raise ScrubError(f"scrubbing hypothesis {self.name!r} claims node {child!r}, which the model graph "
                                 f"does not have (its nodes: {sorted(names)}); its graph must be a subgraph of the model's")
            extra = [p for p in claimed if p not in graph.parents(child)]
            if extra:
                raise ScrubError(f"scrubbing hypothesis {self.name!r} claims the edges {extra} -> {child}, which the "
                                 f"model graph does not have ({child} reads {list(graph.parents(child))} there); its "
                                 "graph must be a subgraph of the model's")
        reached, todo = set(), list(self.output)
        while todo:
            name = todo.pop()
            if name not in self.claims:
                raise ScrubError(f"scrubbing hypothesis {self.name!r} claims a path through {name!r} but says nothing "
                                 f"of what it carries: add claims[{name!r}] = Claim(parents, key)")
            reached.add(name)
            todo += [p for p in self.claims[name].parents if p not in reached]
        stray = sorted(set(self.claims) - reached)
        if stray:
            raise ScrubError(f"scrubbing hypothesis {self.name!r} claims {stray}, which no claimed path from the "
                             "output reaches; claim the edges that lead to them or drop them")
        for name, cl in self.claims.items():
            if cl.key is not None and (cl.key.ndim != 1 or len(cl.key) != n_pool):
                raise ScrubError(f"the key of {name!r} in {self.name!r} has shape {list(cl.key.shape)}; it needs one "
                                 f"value per input of the pool, [{n_pool}]")


@dataclass(frozen=True, eq=False)
class ScrubResult:
    """Fraction of the loss recovered under a hypothesis, with both references and a bootstrap interval."""

    hypothesis: str
    recovered: float
    interval: tuple[float, float]
    loss_scrubbed: float
    loss_full_scrub: float
    loss_clean: float
    n: int
    forwards: int  # model forwards this evaluation took
    naive_forwards: int  # one forward per tree node and per random resample
    per_input: dict[str, Tensor] = field(repr=False, default_factory=dict)  # "scrubbed"/"full"/"clean": [n]

    def summary(self) -> str:
        return (f"{self.hypothesis!r} recovers {self.recovered:.3f} [{self.interval[0]:.3f}, {self.interval[1]:.3f}] "
                f"of the loss (scrubbed {self.loss_scrubbed:.4f}, everything resampled {self.loss_full_scrub:.4f}, "
                f"clean {self.loss_clean:.4f}; {self.n} inputs; {self.forwards} forwards, naive {self.naive_forwards})")

    def to_dict(self) -> dict[str, Any]:
        return {"hypothesis": self.hypothesis, "recovered": self.recovered, "ci95": list(self.interval),
                "loss_scrubbed": self.loss_scrubbed, "loss_full_scrub": self.loss_full_scrub,
                "loss_clean": self.loss_clean, "n": self.n, "forwards": self.forwards,
                "naive_forwards": self.naive_forwards}


# -- the treeified evaluation ----------------------------------------------------------------
@dataclass(eq=False)
class _Tree:
    """One node of the treeified graph, for every input at once: its runs' rows and its patched parents."""

    node: str
    depth: int
    rows: Tensor  # [n] long: the pool input each input's copy of this node runs on
    patches: list[tuple[str, "_Tree | Tensor"]] = field(default_factory=list)  # parent -> subtree or random rows [n]


def _agreeing(key: Tensor | None, rows: Tensor, gen: torch.Generator) -> Tensor:
    """For each row, a pool row drawn uniformly among those with the same key (itself when key is None)."""
    if key is None:
        return rows.clone()
    key = key.long() if key.dtype == torch.bool else key  # searchsorted needs an ordered numeric dtype
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    start = torch.searchsorted(sorted_key, key[rows], right=False)
    count = torch.searchsorted(sorted_key, key[rows], right=True) - start  # >= 1: the row itself
    pick = (torch.rand(len(rows), generator=gen) * count).long().clamp_max(count - 1)
    return order[start + pick]


def _treeify(graph: ModelGraph, hyp: ScrubHypothesis, n: int, gen: torch.Generator) -> tuple[_Tree, int, int]:
    """The tree rooted at the output on rows 0..n-1; also its number of tree nodes and random resamples."""
    counts = [0, 0]

    def grow(name: str, depth: int, rows: Tensor) -> _Tree:
        counts[0] += 1
        if counts[0] > MAX_TREE:
            raise ScrubError(f"hypothesis {hyp.name!r} treeifies into more than {MAX_TREE} nodes; claim fewer paths")
        tree = _Tree(name, depth, rows)
        claimed = hyp.output if name == OUTPUT else hyp.claims[name].parents
        for p in graph.parents(name):
            if p in claimed:
                tree.patches.append((p, grow(p, depth + 1, _agreeing(hyp.claims[p].key, rows, gen))))
            else:
                counts[1] += 1
                tree.patches.append((p, torch.randint(0, n, (n,), generator=gen)))
        return tree

    root = grow(OUTPUT, 0, torch.arange(n))
    return root, counts[0], counts[1]


@dataclass(frozen=True, eq=False)
class _RowPatch:
    """Rows where ``mask`` holds take ``values``; the others keep the model's own activation."""

    mask: Tensor  # [b] bool
    values: Tensor  # the view's shape

    def __call__(self, view: Tensor, call: Any) -> Tensor:
        if self.values.shape != view.shape:
            raise ScrubError(f"a scrubbed value at {call.site} has shape {list(self.values.shape)}, the view "
                             f"{list(view.shape)}: do all inputs of the pool have the same shape?")
        return torch.where(self.mask.view(-1, *[1] * (view.ndim - 1)), self.values.to(view.dtype), view)


class _Evaluator:
    """Runs a tree level by level, deepest first, one batched forward (per chunk) per level."""

    def __init__(self, model: nn.Module, inputs: Tensor, graph: ModelGraph, clean: dict[str, Tensor],
                 loss: Loss, batch_size: int) -> None:
        self.model, self.inputs, self.graph, self.clean = model, inputs, graph, clean
        self.loss, self.batch_size, self.forwards = loss, batch_size, 0

    def evaluate(self, root: _Tree) -> Tensor:  # [n] per-input loss
        levels: dict[int, list[_Tree]] = {}
        todo = [root]
        while todo:
            t = todo.pop()
            levels.setdefault(t.depth, []).append(t)
            todo += [sub for _, sub in t.patches if isinstance(sub, _Tree)]
        values: dict[int, Tensor] = {}  # id(tree) -> [n, ...view]
        for depth in sorted(levels, reverse=True):
            out = self._level(levels[depth], values)
            if depth == 0:
                return out
        raise AssertionError("unreachable: the root is at depth 0")

    def _value(self, parent: str, sub: "_Tree | Tensor", values: dict[int, Tensor]) -> Tensor:
        return values[id(sub)] if isinstance(sub, _Tree) else self.clean[parent][sub]

    def _level(self, trees: list[_Tree], values: dict[int, Tensor]) -> Tensor:
        n = len(trees[0].rows)
        rows = torch.cat([t.rows for t in trees])  # [m*n]
        patched: dict[str, tuple[Tensor, Tensor]] = {}  # site node -> (mask [m*n], values)
        for i, t in enumerate(trees):
            for parent, sub in t.patches:
                v = self._value(parent, sub, values)  # [n, ...]
                if parent not in patched:
                    patched[parent] = (torch.zeros(len(rows), dtype=torch.bool), v.new_zeros(len(rows), *v.shape[1:]))
                mask, vals = patched[parent]
                mask[i * n:(i + 1) * n] = True
                vals[i * n:(i + 1) * n] = v
        reads = [self.graph.node(t.node).site for t in trees if t.node != OUTPUT]
        outs: list[Any] = []
        for lo in range(0, len(rows), self.batch_size):
            hi = min(lo + self.batch_size, len(rows))
            plan = [(self.graph.node(p).site, _RowPatch(m[lo:hi], v[lo:hi])) for p, (m, v) in patched.items()]
            # every patched value was read, and checked finite, in an earlier forward: no second check per hook
            out, acts = run(self.model, self.inputs[rows[lo:hi]], plan, cache=reads, stop_when_cached=bool(reads),
                            check_finite=False)
            self.forwards += 1
            outs.append(self.loss(out, rows[lo:hi]) if not reads else acts)
        if not reads:  # the root: one tree, the loss of every input
            return torch.cat(outs)
        whole = {site: torch.cat([a[site] for a in outs]) for site in set(reads)}  # [m*n, ...view] per site
        for i, t in enumerate(trees):
            values[id(t)] = whole[self.graph.node(t.node).site][i * n:(i + 1) * n]
        return torch.empty(0)


def _clean(model: nn.Module, inputs: Tensor, graph: ModelGraph, loss: Loss, batch_size: int) -> tuple[dict, Tensor, int]:
    """Every node's activation on every input of the pool, and the model's per-input loss: one forward per chunk."""
    acts: dict[str, list[Tensor]] = {n.name: [] for n in graph.nodes}
    losses, calls = [], 0
    for lo in range(0, len(inputs), batch_size):
        rows = torch.arange(lo, min(lo + batch_size, len(inputs)))
        out, cached = run(model, inputs[rows], cache=[n.site for n in graph.nodes])
        calls += 1
        losses.append(loss(out, rows))
        for n in graph.nodes:
            acts[n.name].append(cached[n.site])
        _check_order(graph, list(cached))
    return {k: torch.cat(v) for k, v in acts.items()}, torch.cat(losses), calls


def _check_order(graph: ModelGraph, reached: list[Site]) -> None:
    """Every parent must be computed before the node that reads it (``reached``: sites in the
    order the forward reached them), or patching it could not change the node."""
    at = {site: i for i, site in enumerate(reached)}
    missing = [n.name for n in graph.nodes if n.site not in at]
    if missing:
        raise ScrubError(f"graph nodes {missing} were never reached by the model's forward; is the module used?")
    for node in graph.nodes:
        for p in node.parents:
            parent = graph.node(p).site
            if parent.module_key == node.site.module_key:
                raise ScrubError(f"graph node {node.name!r} reads {p!r}, but both are views of one activation "
                                 f"({parent.path}), which cannot feed itself; make them separate nodes without an edge")
            if at[parent] > at[node.site]:
                raise ScrubError(f"graph node {node.name!r} ({node.site}) reads {p!r} ({parent}), which the model "
                                 "computes after it; a parent must be upstream of the node that reads it")


def _recovered(full: Tensor, scrubbed: Tensor, clean: Tensor) -> Tensor:
    return (full.mean() - scrubbed.mean()) / (full.mean() - clean.mean())


@torch.no_grad()
def scrub(model: nn.Module, inputs: Tensor, graph: ModelGraph, hypothesis: ScrubHypothesis, loss: Loss, *,
          seed: int = 0, batch_size: int = 4096) -> ScrubResult:
    """Causal scrubbing of ``hypothesis`` on the pool ``inputs`` ([n, ...], also the inputs resampled from).

    ``loss(output, rows)`` is the per-input loss ([b]) of the model's output on the pool rows
    ``rows`` (the loss reads those rows' targets). Every input is scored; ``seed`` seeds the
    resampling and the bootstrap.
    """
    n = len(inputs)
    if n < 2:
        raise ScrubError(f"causal scrubbing resamples from the pool of inputs, which has {n}; give at least 2")
    graph.check_sites(model)
    hypothesis.check(graph, n)
    was = model.training
    model.eval()
    try:
        clean_acts, clean_loss, calls = _clean(model, inputs, graph, loss, batch_size)
        gen = torch.Generator().manual_seed(seed)
        runs = {}
        for h in (hypothesis, ScrubHypothesis("everything resampled", ())):
            root, tree_nodes, leaves = _treeify(graph, h, n, gen)
            ev = _Evaluator(model, inputs, graph, clean_acts, loss, batch_size)
            runs[h.name] = (ev.evaluate(root).double(), ev.forwards, tree_nodes + leaves)
    finally:
        model.train(was)
    scrubbed, forwards, naive = runs[hypothesis.name]
    full, clean = runs["everything resampled"][0], clean_loss.double()
    for what, losses in (("scrubbed", scrubbed), ("fully scrubbed", full), ("clean", clean)):
        if not bool(torch.isfinite(losses).all()):
            raise ScrubError(f"the {what} loss is not finite on {int((~torch.isfinite(losses)).sum())} of {n} inputs; "
                             "check the loss function (it must give a finite [b] loss per input)")
    if not float(full.mean() - clean.mean()) > 0:
        raise ScrubError(f"resampling every node of the graph does not raise the loss ({float(full.mean()):.4f} vs "
                         f"clean {float(clean.mean()):.4f}), so there is no loss to recover: the graph's nodes carry "
                         "nothing the loss needs, or the loss does not read the model's output")
    stacked = torch.stack([full, scrubbed, clean], 1)  # [n, 3]: resampled together, input by input
    lo, hi = bootstrap_interval(stacked, lambda s: _recovered(s[:, 0], s[:, 1], s[:, 2]), seed=seed, resamples=1000)
    value = float(_recovered(full, scrubbed, clean))
    chunks = math.ceil(n / batch_size)
    return ScrubResult(hypothesis.name, value, (min(lo, value), max(hi, value)), float(scrubbed.mean()),
                       float(full.mean()), float(clean.mean()), n, calls + forwards, chunks * (1 + naive),
                       {"scrubbed": scrubbed, "full": full, "clean": clean})
