"""``mechscope sae train|eval|pages``: sparse dictionaries from the command line.

Data comes from exactly one source:

- ``--store DIR --site KEY`` an activation store (``mechscope.core.store.write_store``);
  a transcoder also names ``--target-site``;
- ``--world induction|grokking`` a built-in trained model and its data (the residual
  stream after layer 0 of the induction model, the MLP neurons of the grokking model);
- ``--synthetic`` sparse combinations of known directions (the spec's reference world);
- ``--model M --corpus C --site S`` a pretrained model run live over a text corpus (no store;
  ``eval`` then scores held-out windows: by default those after the text the dictionary was
  trained on, when it is the same corpus). BOS / position 0 is left out unless --keep-bos.

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
  --model M --corpus C --site S  a pretrained model run live over text (BOS left out unless
                             --keep-bos); eval scores held-out windows, by default those
                             after the text the dictionary was trained on
Under `torchrun --nproc-per-node N -m mechscope sae train ...` every process trains on its
share of the batches and process 0 writes the files."""
from mechscope.cli.sae_data import LiveModel, data_stream, live_model, live_stream, provenance, run_fingerprint
from mechscope.core.config import Config, ConfigError, add_config_arguments, config, config_from_args, param


CONTINUE_HELP = (
    "train the run in --checkpoint-dir on to another --steps than it was planned for (without it that is "
    "refused): every schedule (the learning-rate decay, the L1 warm-up) is recomputed for the new "
    "total and training goes on from the checkpoint's step of it, so a decay that had reached 0 starts again "
    "from the new schedule's value there; the continuation is recorded in the checkpoint and the output file")


@config
class DataConfig(Config):
    """Where the activations come from (exactly one source)."""

    store: Optional[Path] = param(None, metavar="DIR", help="an activation store directory")
    site: Optional[str] = param(None, metavar="KEY", help="the site to read: a store's key, label or module path; with "
                                                         "--model, an alias (resid_post.6) or a module path")
    target_site: Optional[str] = param(None, metavar="KEY", help="a transcoder's target site in the store")
    world: Optional[Literal["induction", "grokking"]] = param(None, help="a built-in trained model and its data")
    synthetic: bool = param(False, help="synthetic activations with known features (d 256, 512 features, L0 5)")
    corpus: Optional[Path] = param(None, metavar="PATH", help="text for --model: a text file, .jsonl (see --field), "
                                                             ".parquet/.arrow, a saved dataset, or an installed "
                                                             "corpus by name (python-docs)")
    field: str = param("text", help="the text field of a .jsonl corpus or a dataset")
    split: Optional[str] = param(None, help="the split of a dataset saved with splits")
    seq_len: int = param(128, ge=2, help="tokens per window of --corpus, BOS included")
    batch_windows: int = param(8, ge=1, help="windows of --corpus per forward")
    shuffle_buffer: int = param(0, ge=0, metavar="K", help="shuffle --corpus windows through a buffer of K "
                                                          "(training only; 0: corpus order)")
    keep_bos: bool = param(False, help="keep the BOS / position-0 rows of --corpus (the attention sink)")
    buffer_rows: int = param(65536, ge=1, help="rows of --corpus activations mixed in a buffer before they are "
                                               "served (training)")
    data_seed: int = param(1, help="seed of the data order")

    def validate(self) -> None:
        n = sum([self.store is not None, self.world is not None, self.synthetic, self.corpus is not None])
        if n != 1:
            raise ConfigError("give exactly one data source: --store DIR (with --site), --world NAME, --synthetic "
                              "or --model M --corpus C (with --site)")
        if (self.store is not None or self.corpus is not None) and self.site is None:
            raise ConfigError(f"--{'store' if self.store is not None else 'corpus'} needs --site: which site to read")


@config
class OutputConfig(Config):
    out: Path = param(metavar="FILE", help="where to write the trained dictionary (.safetensors)")
    saelens: Optional[Path] = param(None, metavar="DIR", help="also write it as an SAELens directory")
    threads: int = param(1, ge=1, help="torch threads")
    log_to: Literal["none", "jsonl", "tensorboard", "wandb"] = param(
        "none", help="experiment logging of every history entry: jsonl (a file, no dependency), tensorboard or "
                     "wandb (their packages must be installed)")
    log_dir: Optional[Path] = param(None, metavar="DIR", help="where --log-to writes (default: OUT's name + '-logs' "
                                                              "beside it)")


@config
class EvalConfig(Config):
    sae: Path = param(metavar="PATH", help="a dictionary file, or an SAELens directory")
    batches: int = param(10, ge=1, help="batches of activations to evaluate on")
    windows: int = param(64, ge=1, help="held-out windows of --corpus to evaluate on")
    skip_windows: Optional[int] = param(None, ge=0, help="windows of --corpus to skip first (default: every window "
                                                         "the dictionary was trained on, for the same corpus; else 0)")
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
    add_config_arguments(train.add_argument_group("live model (with --corpus)"), LiveModel)
    add_config_arguments(train.add_argument_group("dictionary (d_in comes from the data)"), SAEConfig,
                         exclude=("d_in", "d_out"))
    training = train.add_argument_group("training")
    add_config_arguments(training, TrainConfig)
    training.add_argument("--continue", dest="continue_run", action="store_true", help=CONTINUE_HELP)
    add_config_arguments(train.add_argument_group("output"), OutputConfig)
    ev = sub.add_parser("eval", help="metrics of a dictionary on activations")
    add_config_arguments(ev.add_argument_group("data"), DataConfig)
    add_config_arguments(ev.add_argument_group("live model (with --corpus)"), LiveModel)
    add_config_arguments(ev, EvalConfig)
    pages = sub.add_parser("pages", help="HTML feature pages of a dictionary on a built-in model")
    add_config_arguments(pages, PagesConfig)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    # SAE, store, lock and checkpoint errors carry their own fix: mechscope.cli.errors prints them (exit 2)
    return {"train": _train, "eval": _eval, "pages": _pages}[args.sae_command](args, torch)


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
    elif getattr(args, "continue_run", False):
        raise UsageError("--continue extends the run in a --checkpoint-dir; give the --checkpoint-dir it was trained in")
    with lock_file(out.out, "--out"):  # checked (a file, its directory made) and locked before any work
        return _train_locked(args, torch, data, out, cfg)


def _train_locked(args: argparse.Namespace, torch: Any, data: DataConfig, out: OutputConfig, cfg: Any) -> int:
    from mechscope.sae.arch import SAEConfig
    from mechscope.core.fingerprint import FingerprintError, cli_label
    from mechscope.cli.model_source import compute_device
    from mechscope.core.distributed import finish, init_distributed, launched_by_torchrun, shard
    from mechscope.core.tracking import open_tracker
    from mechscope.sae.io import save_sae
    from mechscope.sae.saelens import save_saelens
    from mechscope.sae.train import train

    torch.set_num_threads(out.threads)
    device = compute_device(args.device)  # where the dictionary trains (and, under torchrun, this rank's model)
    comm = init_distributed("gloo")  # gloo reduces CPU and CUDA tensors alike (the scales' statistics, the grads)
    if launched_by_torchrun() and device.startswith("cuda:"):  # this rank's own GPU (compute_device)
        torch.cuda.set_device(device)
        if args.device == "cuda":
            args.device = device  # the rank's live model goes there too
    fields = {f: getattr(args, f) for f in SAEConfig.field_names() if hasattr(args, f) and f not in ("d_in", "d_out")}
    if data.corpus is not None:
        if fields.get("kind", "sae") != "sae":
            raise UsageError("--model/--corpus trains an autoencoder on one site; train a transcoder from a store "
                             "holding both sites (mechscope store --sites IN,OUT)")
        stream, d_in, live = live_stream(args, data, cfg.batch_size, comm)
        d_out, batches, source = None, stream, None  # each rank runs the model on its own windows
    else:
        stream, d_in, d_out, source = data_stream(data, cfg.batch_size, fields.get("kind", "sae"))
        batches, live = shard(stream, comm), None
    sae_cfg = SAEConfig.from_dict({**fields, "d_in": d_in, "d_out": d_out})
    log_dir = out.log_dir or out.out.with_name(out.out.stem + "-logs")
    with open_tracker(out.log_to, log_dir, config={"sae": sae_cfg.to_dict(), "train": cfg.to_dict(),
                                                   "data": data.to_dict()}, name=out.out.stem,
                      enabled=comm.is_main) as tracker:
        try:
            result = train(sae_cfg, cfg, batches, comm=comm, device=device,
                           on_log=lambda entry, t: tracker.log(entry, t.step_count),
                           fingerprint=run_fingerprint(data, source, live) if cfg.checkpoint_dir is not None else None,
                           extend=args.continue_run)
        except FingerprintError as e:  # the library's message, with the options' names
            raise UsageError(e.compose("--checkpoint-dir", cli_label)) from None
    if comm.is_main:
        extra = {"data": data.to_dict(), "train": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.to_dict().items()},
                 "history": result.history, **provenance(data, live)}
        if result.trainer.continued:
            extra["continued"] = result.trainer.continued
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
    if data.corpus is not None:
        result = _eval_text(args, data, cfg, sae)
    else:
        stream, d_in, _, extra = data_stream(data, cfg.batch_size, sae.cfg.kind)
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


def _eval_text(args: argparse.Namespace, data: DataConfig, cfg: EvalConfig, sae: Any) -> dict[str, Any]:
    """FVU, L0, dead fraction and CE loss recovered on held-out windows of --corpus."""
    from mechscope.sae.io import read_sae_metadata
    from mechscope.sae.text_data import evaluate_on_text, held_out_skip

    model, tokenizer, site, (text, _) = live_model(args, data)
    trained = read_sae_metadata(cfg.sae).get("text") if cfg.sae.is_file() else None
    skip = held_out_skip(trained, text, cfg.skip_windows)
    return evaluate_on_text(sae, model, tokenizer, site, text, windows=cfg.windows, skip_windows=skip,
                            batch_windows=data.batch_windows)


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
