"""``mechscope spd train|eval|figures``: stochastic parameter decomposition from the command line.

- ``train``: decompose a built-in target (``--target tms_5_2``; its published settings,
  each overridable by the SPDConfig options) or a random Hugging Face model
  (``--hf-config``, with ``--sites`` and random token batches); writes a resumable run to
  ``--out``; ``--ship`` also replaces the zoo's decomposition of a built-in target. A run
  in ``--out`` resumes only with the same target and settings (else an error naming the
  first that differs); training it on to other ``--steps`` needs ``--continue``.
- ``eval``: measures of a decomposition (the shipped one by default) as a table or JSON.
- ``figures``: the importance matrix, subcomponent norms and subcomponents against the
  target's feature directions, as PNG files in ``--out``.

``torchrun --nproc_per_node N -m mechscope spd train ...`` trains data-parallel: each
process draws its own batches and masks, gradients are averaged, rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Literal, Optional

from mechscope.cli import UsageError
from mechscope.core.config import Config, ConfigError, add_config_arguments, cli_fields, config, config_from_args, param
from mechscope.core.paths import output_dir
from mechscope.spd.config import SPDConfig

TARGETS = ("tms_5_2", "tms_40_10", "tms_5_2_id", "resid_mlp")
CONTINUE_HELP = (
    "train the run in --out on to another --steps than it was planned for (without it that is refused): the "
    "learning-rate schedule (warm-up, cosine) and the annealing of p are recomputed for the new total and "
    "training goes on from the run's step of them, so a cosine that had reached 0 starts again from the new "
    "schedule's value there; the continuation is recorded in the run's files")


@config
class SPDCommandConfig(Config):
    """What to decompose and where the files go (the method's options are SPDConfig's)."""

    target: Optional[str] = param(None, metavar="NAME", help=f"a built-in target: {', '.join(TARGETS)}")
    hf_config: Optional[str] = param(None, metavar="PATH_OR_JSON",
                                     help="a Hugging Face config.json (path or JSON text): a random model, no download")
    out: Optional[Path] = param(None, metavar="DIR", help="run directory (train) or figure directory (figures)")
    decomposition: Optional[Path] = param(None, metavar="FILE",
                                          help="a decomposition file (default: the target's shipped one)")
    ship: bool = param(False, help="train: also write the decomposition into the package's zoo")
    seq_len: int = param(16, ge=2, help="hf-config: tokens per random sequence")
    threads: int = param(1, ge=1, help="torch threads")
    json: bool = param(False, help="eval: print JSON")
    log_to: Literal["none", "jsonl", "tensorboard", "wandb"] = param(
        "none", help="train: experiment logging of every history record to OUT/logs (jsonl: a file, no dependency; "
                     "tensorboard, wandb: their packages)")

    def validate(self) -> None:
        if (self.target is None) == (self.hf_config is None):
            raise ConfigError("give exactly one of --target NAME or --hf-config PATH_OR_JSON")
        if self.target is not None and self.target not in TARGETS:
            raise ConfigError(f"unknown SPD target {self.target!r}; valid: {', '.join(TARGETS)}")
        if self.ship and self.target is None:
            raise ConfigError("--ship writes a built-in target's decomposition; it needs --target")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("spd", help="stochastic parameter decomposition: train, eval, figures",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="spd_action", metavar="ACTION", required=True)
    for name, text in (("train", "decompose a model's layers"), ("eval", "measure a decomposition"),
                       ("figures", "draw a decomposition's figures")):
        sub = actions.add_parser(name, help=text, description=text)
        add_config_arguments(sub, SPDCommandConfig)
        if name == "train":
            group = sub.add_argument_group("SPD options (default: the target's published settings)")
            add_config_arguments(group, SPDConfig)
            sub.set_defaults(**{f.name: None for f in cli_fields(SPDConfig)})  # None: not given
            sub.add_argument("--continue", dest="continue_run", action="store_true", help=CONTINUE_HELP)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in cli_fields(SPDConfig)
            if getattr(args, f.name, None) is not None}


def _hf(cmd: SPDCommandConfig, seed: int) -> tuple[Any, Any]:
    """A random Hugging Face model and a sampler of random token batches."""
    import torch

    from mechscope.cli.model_source import ModelSource, load

    model = load(ModelSource(hf_config=cmd.hf_config), seed=seed)[0].eval()
    vocab = int(model.config.vocab_size)
    return model, lambda b, g: {"input_ids": torch.randint(0, vocab, (b, cmd.seq_len), generator=g)}


def _train(cmd: SPDCommandConfig, args: argparse.Namespace) -> int:
    from mechscope.tasks import spd_targets as targets
    from mechscope.spd.train import train_spd

    if cmd.out is None:
        raise UsageError("spd train needs --out DIR for the run's checkpoints")
    output_dir(cmd.out, "--out")  # before any work; train_spd locks it for the run
    changes = _overrides(args)
    if cmd.target is not None:
        cfg = targets.target(cmd.target).spd.replace(**changes)
        model, data = targets.load_target(cmd.target), targets.data_fn(cmd.target)
    else:
        if not changes.get("sites"):
            raise UsageError("--hf-config needs --sites (module paths, see `mechscope sites --hf-config ...`)")
        cfg = SPDConfig.from_dict({"recon": "kl", "batch_size": 8, **changes})
        model, data = _hf(cmd, cfg.seed)
    from mechscope.spd.components import SPDError
    from mechscope.spd.precision import check_dtype

    try:
        check_dtype(cfg.dtype)  # before any work: bf16 without hardware support is refused
    except SPDError as e:
        raise UsageError(str(e)) from None
    from mechscope.core.distributed import is_main
    from mechscope.core.tracking import open_tracker

    from mechscope.core.fingerprint import FingerprintError, cli_label

    with open_tracker(cmd.log_to, cmd.out / "logs", config=cfg.to_dict(), name=cmd.target,
                      enabled=is_main()) as tracker:
        try:
            run = train_spd(model, data, cfg, out_dir=cmd.out, on_record=lambda row: tracker.log(row, row["step"]),
                            fingerprint=_fingerprint(cmd), extend=args.continue_run)
        except FingerprintError as e:  # the library's message, with the options' names
            raise UsageError(e.compose("--out", cli_label)) from None

    if not is_main():  # under torchrun, rank 0 reports and ships
        return 0
    print(f"decomposed {cmd.target or model.__class__.__name__} in {run.seconds:.0f}s "
          f"({run.steps_per_second:.1f} steps/s); files in {cmd.out}")
    if cmd.ship:
        from mechscope.spd.checkpoint import save_decomposition

        path = targets.target(cmd.target).decomposition_checkpoint
        # the step count lets the bench label a decomposition shipped from a shortened run
        save_decomposition(path, run.decomposition, {
            "target": cmd.target, "steps": cfg.steps, "published_steps": targets.target(cmd.target).spd.steps,
            "steps_run": run.steps_run, "seconds": run.seconds, "steps_per_second": run.steps_per_second})
        print(f"shipped {path}")
    return 0


def _fingerprint(cmd: SPDCommandConfig) -> dict[str, Any]:
    """What a run records of its target, checked on resume: the built-in target's name, or the
    Hugging Face config (a file's JSON, so that an edited file counts) and the sequence length."""
    if cmd.target is not None:
        return {"target": cmd.target}
    text = cmd.hf_config
    path = Path(text).expanduser()
    try:
        text = path.read_text() if path.is_file() else text
        hf: Any = json.loads(text)
    except (OSError, ValueError):
        hf = text  # the loader has accepted it; compare it as written
    return {"hf_config": hf, "seq_len": cmd.seq_len}


def _load(cmd: SPDCommandConfig) -> tuple[Any, Any]:
    from mechscope.tasks import spd_targets as targets
    from mechscope.spd.checkpoint import load_decomposition

    if cmd.target is not None:
        model = targets.load_target(cmd.target)
        path = cmd.decomposition or targets.target(cmd.target).decomposition_checkpoint
    else:
        if cmd.decomposition is None:
            raise UsageError("--hf-config needs --decomposition FILE")
        model, path = _hf(cmd, 0)[0], cmd.decomposition
    return model, load_decomposition(path, model)  # a CheckpointError is printed by mechscope.cli.errors


def _eval(cmd: SPDCommandConfig) -> int:
    import torch

    model, dec = _load(cmd)
    if cmd.target is not None:
        from mechscope.tasks.spd_assess import assess, public

        result = public(assess(cmd.target, model, dec))
    else:
        from mechscope.spd.evals import live_counts, lm_metrics

        vocab = int(model.config.vocab_size)
        ids = torch.randint(0, vocab, (16, cmd.seq_len), generator=torch.Generator().manual_seed(0))
        result = {"live": {p: n for p, (n, _) in live_counts(dec).items()}, **lm_metrics(model, dec, {"input_ids": ids})}
    if cmd.json:
        print(json.dumps(result, indent=2, default=float))
    else:
        for key, value in result.items():
            print(f"{key:16s} {json.dumps(value, default=float)[:300]}")
    return 0


def _figures(cmd: SPDCommandConfig) -> int:
    from contextlib import contextmanager

    from mechscope.report.figures import new_figure, to_png
    from mechscope.tasks.spd_assess import assess, draw

    if cmd.target is None or cmd.out is None:
        raise UsageError("spd figures needs --target NAME and --out DIR")
    output_dir(cmd.out, "--out")
    model, dec = _load(cmd)
    written = []

    @contextmanager
    def figure(name: str, caption: str, **kwargs: Any):
        fig = new_figure(**{"figsize": (9.0, 3.6), **kwargs})
        yield fig
        path = cmd.out / f"{cmd.target}__{name}.png"
        path.write_bytes(to_png(fig))
        written.append(path)

    draw(assess(cmd.target, model, dec), model, dec, figure)
    for path in written:
        print(path)
    return 0


def run(args: argparse.Namespace) -> int:
    cmd = config_from_args(SPDCommandConfig, args)
    import torch

    torch.set_num_threads(cmd.threads)
    if args.spd_action == "train":
        from mechscope.core.distributed import finish, init_distributed

        comm = init_distributed()  # under torchrun: join the group; rank 0 writes the files
        code = _train(cmd, args)
        finish(comm)  # every rank waits for rank 0, then leaves the group
        return code
    if args.spd_action == "eval":
        return _eval(cmd)
    return _figures(cmd)
