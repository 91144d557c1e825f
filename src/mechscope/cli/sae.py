"""``mechscope sae train|eval|pages``: sparse dictionaries from the command line.

Data comes from exactly one source:

- ``--store DIR --site KEY`` an activation store (``mechscope.core.store.write_store``);
  a transcoder also names ``--target-site``;
- ``--world induction|grokking`` a built-in trained model and its data (the residual
  stream after layer 0 of the induction model, the MLP neurons of the grokking model);
- ``--synthetic`` sparse combinations of known directions (the spec's reference world).

``train`` writes the dictionary (mechscope format, and optionally an SAELens directory);
under ``torchrun --nproc-per-node N -m mechscope sae train ...`` every process trains on
its share of the batches and process 0 writes. The output paths are checked before the
training starts, and ``--out`` (and ``--checkpoint-dir``) are locked for the run, so a
second job writing them fails at once. ``eval`` prints the metrics (plus CE loss
recovered on a world, MMCS on synthetic data); ``pages`` writes HTML feature pages.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Literal, Optional

from mechscope.cli import UsageError

DESCRIPTION = """\
Train, evaluate and browse sparse dictionaries. Data comes from exactly one source:
  --store DIR --site KEY     an activation store (a transcoder also names --target-site)
  --world induction|grokking a built-in trained model and its data
  --synthetic                sparse combinations of known directions (ground truth)
Under `torchrun --nproc-per-node N -m mechscope sae train ...` every process trains on its
share of the batches and process 0 writes the files."""
from mechscope.core.config import Config, ConfigError, add_config_arguments, config, config_from_args, param


@config
class DataConfig(Config):
    """Where the activations come from (exactly one source)."""

    store: Optional[Path] = param(None, metavar="DIR", help="an activation store directory")
    site: Optional[str] = param(None, metavar="KEY", help="the store's site to read (key, label or module path)")
    target_site: Optional[str] = param(None, metavar="KEY", help="a transcoder's target site in the store")
    world: Optional[Literal["induction", "grokking"]] = param(None, help="a built-in trained model and its data")
    synthetic: bool = param(False, help="synthetic activations with known features (d 256, 512 features, L0 5)")
    data_seed: int = param(1, help="seed of the data order")

    def validate(self) -> None:
        n = sum([self.store is not None, self.world is not None, self.synthetic])
        if n != 1:
            raise ConfigError("give exactly one data source: --store DIR (with --site), --world NAME or --synthetic")
        if self.store is not None and self.site is None:
            raise ConfigError("--store needs --site: which of the store's sites to read")


@config
class OutputConfig(Config):
    out: Path = param(metavar="FILE", help="where to write the trained dictionary (.safetensors)")
    saelens: Optional[Path] = param(None, metavar="DIR", help="also write it as an SAELens directory")
    threads: int = param(1, ge=1, help="torch threads")


@config
class EvalConfig(Config):
    sae: Path = param(metavar="PATH", help="a dictionary file, or an SAELens directory")
    batches: int = param(10, ge=1, help="batches of activations to evaluate on")
    batch_size: int = param(4096, ge=1, help="rows per batch")
    json: bool = param(False, help="print JSON instead of a table")
    threads: int = param(1, ge=1, help="torch threads")


@config
class PagesConfig(Config):
    sae: Path = param(metavar="PATH", help="a dictionary file, or an SAELens directory")
    world: Literal["induction", "grokking"] = param("induction", help="the built-in model whose activations it reads")
    out: Path = param(Path("sae-pages"), metavar="DIR", help="directory to write the pages to")
    n_features: int = param(50, help="pages for the latents active most often")
    n_examples: int = param(10, help="top examples per latent")
    threads: int = param(1, ge=1, help="torch threads")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from mechscope.sae.arch import SAEConfig
    from mechscope.sae.train import TrainConfig

    parser = subparsers.add_parser("sae", help="train, evaluate and browse sparse autoencoders and transcoders",
                                   description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="sae_command", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train a dictionary")
    add_config_arguments(train.add_argument_group("data"), DataConfig)
    add_config_arguments(train.add_argument_group("dictionary (d_in comes from the data)"), SAEConfig,
                         exclude=("d_in", "d_out"))
    add_config_arguments(train.add_argument_group("training"), TrainConfig)
    add_config_arguments(train.add_argument_group("output"), OutputConfig)
    ev = sub.add_parser("eval", help="metrics of a dictionary on activations")
    add_config_arguments(ev.add_argument_group("data"), DataConfig)
    add_config_arguments(ev, EvalConfig)
    pages = sub.add_parser("pages", help="HTML feature pages of a dictionary on a built-in model")
    add_config_arguments(pages, PagesConfig)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    # SAE, store, lock and checkpoint errors carry their own fix: mechscope.cli.errors prints them (exit 2)
    return {"train": _train, "eval": _eval, "pages": _pages}[args.sae_command](args, torch)


def _stream(data: DataConfig, batch_size: int, kind: str = "sae") -> tuple[Any, int, int | None, Any]:
    """``(batches, d_in, d_out, source)``: rows, or (x, y) pairs for a transcoder read from a store."""
    if data.synthetic:
        from mechscope.tasks.synthetic_features import SyntheticFeatures

        world = SyntheticFeatures()
        return world.batches(batch_size, seed=data.data_seed), world.cfg.d, None, world
    if data.world is not None:
        from mechscope.tasks.sae_worlds import load_world

        world = load_world(data.world)
        first = next(world.stream(8, 0))
        return world.stream(batch_size, data.data_seed), int(first.shape[-1]), None, world
    from mechscope.core.store import open_store
    from mechscope.sae.data import store_batches

    store = open_store(data.store)
    if kind == "sae":
        return store_batches(store, data.site, batch_size, seed=data.data_seed), store.d(data.site), None, store
    if data.target_site is None:
        raise UsageError(f"a {kind} reads --site and predicts --target-site; give --target-site")
    x_site, y_site = _resolve(store, data.site), _resolve(store, data.target_site)
    pairs = store_batches(store, [x_site, y_site], batch_size, seed=data.data_seed)
    return ((b[x_site], b[y_site]) for b in pairs), store.d(x_site), store.d(y_site), store


def _resolve(store: Any, ref: str) -> Any:
    key = store.key(ref)
    return next(s for s in store.sites if store.key(s) == key)


def _train(args: argparse.Namespace, torch: Any) -> int:
    from mechscope.core.lock import lock_file
    from mechscope.core.paths import output_dir
    from mechscope.sae.train import TrainConfig

    data, out = config_from_args(DataConfig, args), config_from_args(OutputConfig, args)
    cfg = config_from_args(TrainConfig, args)
    if out.saelens is not None:
        output_dir(out.saelens, "--saelens")
    if cfg.checkpoint_dir is not None:
        output_dir(cfg.checkpoint_dir, "--checkpoint-dir")
    with lock_file(out.out, "--out"):  # checked (a file, its directory made) and locked before any work
        return _train_locked(args, torch, data, out, cfg)


def _train_locked(args: argparse.Namespace, torch: Any, data: DataConfig, out: OutputConfig, cfg: Any) -> int:
    from mechscope.sae.arch import SAEConfig
    from mechscope.core.distributed import finish, init_distributed, shard
    from mechscope.sae.io import save_sae
    from mechscope.sae.saelens import save_saelens
    from mechscope.sae.train import train

    torch.set_num_threads(out.threads)
    comm = init_distributed()
    fields = {f: getattr(args, f) for f in SAEConfig.field_names() if hasattr(args, f) and f not in ("d_in", "d_out")}
    stream, d_in, d_out, _ = _stream(data, cfg.batch_size, fields.get("kind", "sae"))
    sae_cfg = SAEConfig.from_dict({**fields, "d_in": d_in, "d_out": d_out})
    result = train(sae_cfg, cfg, shard(stream, comm), comm=comm)
    if comm.is_main:
        extra = {"data": data.to_dict(), "train": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.to_dict().items()},
                 "history": result.history}
        save_sae(out.out, result.sae, extra=json.loads(json.dumps(extra, default=str)))
        print(f"wrote {out.out}", file=sys.stderr)
        if out.saelens is not None:
            save_saelens(out.saelens, result.sae, hook_name=data.site or data.world or "synthetic")
            print(f"wrote {out.saelens} (SAELens layout)", file=sys.stderr)
        last = result.history[-1]
        print(f"final: FVU {last['fvu']:.4f}  L0 {last['l0']:.2f}  dead {100 * last['dead']:.1f}%")
    finish(comm)
    return 0


def _load(path: Path) -> Any:
    from mechscope.sae.io import load_sae
    from mechscope.sae.saelens import load_saelens

    if path.is_dir():
        return load_saelens(path)[0]
    return load_sae(path)


def _eval(args: argparse.Namespace, torch: Any) -> int:
    from mechscope.sae.evals import evaluate, matched_correlation, mmcs

    data, cfg = config_from_args(DataConfig, args), config_from_args(EvalConfig, args)
    torch.set_num_threads(cfg.threads)
    sae = _load(cfg.sae)
    stream, d_in, _, extra = _stream(data, cfg.batch_size, sae.cfg.kind)
    if d_in != sae.d_in:
        raise UsageError(f"the dictionary reads width {sae.d_in}, the data has width {d_in}; pick the matching site")
    result = {k: v for k, v in evaluate(sae, stream, max_batches=cfg.batches).items() if k != "density"}
    if data.synthetic:
        result.update(mmcs=mmcs(extra.features, sae.W_dec), mcc=matched_correlation(extra.features, sae.W_dec))
    if data.world is not None:
        from mechscope.tasks.sae_worlds import score

        result.update({k: v for k, v in score(extra, sae).items() if k.startswith(("ce_", "kl_", "delta"))})
    if cfg.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:22s} {v:.6g}" if isinstance(v, float) else f"{k:22s} {v}")
    return 0


def _pages(args: argparse.Namespace, torch: Any) -> int:
    from mechscope.sae.pages import feature_pages
    from mechscope.tasks.sae_worlds import load_world

    from mechscope.core.paths import output_dir

    cfg = config_from_args(PagesConfig, args)
    output_dir(cfg.out, "--out")
    torch.set_num_threads(cfg.threads)
    sae = _load(cfg.sae)
    world = load_world(cfg.world)
    to_logits = None
    if cfg.world == "grokking":  # the neurons reach the logits through W_L = W_U W_out ([p, d_mlp])
        from mechscope.tasks.modular import neuron_to_logit

        to_logits = neuron_to_logit(world.model).T  # [d_mlp, p]
    index = feature_pages(world.model, sae, world.site, world.eval_batches, cfg.out, n_features=cfg.n_features,
                          n_examples=cfg.n_examples, to_logits=to_logits)
    print(f"wrote {index}")
    return 0
