"""``mechscope reft``: train a LoReFT / DiReFT intervention with the model frozen, score it, save it;
with ``--compare``, the whole baseline table (prompting, steering, LoReFT, DiReFT, LoRA, full
finetuning) on the same data.

Data: the built-in ``instructions`` task (make the instruction model reverse without being
told) or a JSON-lines file of ``{"prompt": [ids], "answer": [ids], "split": "train" | "test"
| "unrelated"}`` rows (answers scored by exact greedy match; KL on the ``unrelated`` rows);
with a model that has a tokenizer, the prompt and answer may be text (``{"prompt": "The
capital of France is", "answer": " Paris"}``): the prompt becomes [BOS] + tokens, the answer
its tokens + EOS.
Interventions sit on the residual stream entering each chosen block (``resid_pre.L``) at
the first and last prompt tokens (``--positions f2+l2``).
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import Any, Literal, Optional

from mechscope.cli import UsageError
from mechscope.cli.model_source import ModelSource, load, resolve_site
from mechscope.core.config import add_config_arguments, config, config_from_args, param

DESCRIPTION = __doc__.split("\n\n", 1)[1]


@config
class ReftConfig(ModelSource):
    """Options of ``mechscope reft``."""

    FIELD_HELP = {"model": "a built-in model (default: instructions)"}

    data: str = param("instructions", metavar="NAME_OR_JSONL", help="instructions or a JSON-lines file")
    kind: Literal["loreft", "direft"] = param("loreft", help="the intervention")
    rank: int = param(4, ge=1, help="rank r of the intervention")
    positions: str = param("f2+l2", help="first / last prompt tokens to intervene at, e.g. f2+l2, l1")
    layers: tuple[int, ...] = param((), metavar="L[,L...]", help="blocks whose input is intervened (default: all)")
    steps: int = param(400, ge=1, help="training steps")
    lr: float = param(1e-2, gt=0, help="learning rate (AdamW, one-cycle)")
    batch: int = param(32, ge=1, help="batch size")
    n_train: int = param(1000, help="training examples (built-in task)")
    n_test: int = param(300, help="test and unrelated examples (built-in task)")
    compare: bool = param(False, help="run every baseline on the same data and print the table")
    save: Optional[Path] = param(None, metavar="FILE", help="write the trained intervention (safetensors)")
    seed: int = param(0, help="seed for data and initialisation")
    json: bool = param(False, help="print JSON")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("reft", help="representation finetuning (LoReFT, DiReFT) and its baselines",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, ReftConfig)
    return parser


def task_from(cfg: ReftConfig, model: Any = None, tokenizer: Any = None) -> Any:
    """The :class:`~mechscope.steer.baselines.SupervisedTask` the options name (a file's token
    ids checked against ``model``'s vocabulary; text rows tokenised with ``tokenizer``)."""
    from mechscope.tasks import instructions as ins

    if cfg.data == "instructions":
        return ins.comparison_task(cfg.n_train, cfg.n_test, cfg.n_test, seed=cfg.seed)
    from mechscope.core.jsonl import one_of, read_jsonl, token_ids, vocab_size
    from mechscope.core.text_pairs import pair_kind, text_pairs
    from mechscope.steer.baselines import SupervisedTask

    split: dict[str, list[Any]] = {"train": [], "test": [], "unrelated": []}
    pad = 0
    if pair_kind(cfg.data) == "text":
        if tokenizer is None:
            raise UsageError(f"--data {cfg.data} holds text prompts; give a --model with a tokenizer (a pretrained "
                             "model), or token ids ({\"prompt\": [5, 6], \"answer\": [7]})")
        for name, pairs in text_pairs(cfg.data, tokenizer).items():
            split[name] = [ins.Example(tuple(p), tuple(a)) for p, a in pairs]
        pad = next((int(p) for p in (tokenizer.pad_token_id, tokenizer.eos_token_id) if p is not None), 0)
    else:
        ids = token_ids(vocab_size(model) if model is not None else None)
        rows = read_jsonl(cfg.data, {"prompt": ids, "answer": ids}, {"split": one_of("train", "test", "unrelated")},
                          example='{"prompt": [5, 6], "answer": [7], "split": "train"}')
        for r in rows:
            split[r.get("split", "train")].append(ins.Example(tuple(r["prompt"]), tuple(r["answer"])))
    if not split["train"] or not split["test"]:
        raise UsageError(f"{cfg.data}: need rows with split 'train' and 'test' (got {len(split['train'])} and "
                         f"{len(split['test'])})")
    return SupervisedTask(split["train"], split["test"], [], [], split["unrelated"],
                          batch=partial(ins.train_batch, pad_id=pad), accuracy=partial(ins.exact_match, pad_id=pad))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(ReftConfig, args)
    from mechscope.core.models import structure
    from mechscope.steer.baselines import compare, reft_alone
    from mechscope.steer.finetune import TrainRecipe, frozen
    from mechscope.steer.reft import ReftError, save_reft

    model, tokenizer = load(cfg, "instructions")
    model = frozen(model)
    s = structure(model)
    layers = list(cfg.layers) or list(range(s.n_layers))
    sites = [resolve_site(model, f"resid_pre.{l}") for l in layers]
    task = task_from(cfg, model, tokenizer)
    recipe = TrainRecipe(steps=cfg.steps, lr=cfg.lr)
    try:
        if cfg.compare:
            if not task.prompted_test:
                raise UsageError("--compare needs prompted examples (the built-in instructions task)")
            rows = compare(model, task, sites, s.d_model, recipe=recipe, batch_size=cfg.batch, rank=cfg.rank,
                           positions=cfg.positions, seed=cfg.seed, full_lr=1e-3)
        else:
            row, reft = reft_alone(model, task, sites, s.d_model, kind=cfg.kind, rank=cfg.rank,
                                   positions=cfg.positions, recipe=recipe, batch_size=cfg.batch, seed=cfg.seed)
            rows = [row]
            if cfg.save:
                save_reft(cfg.save, reft)
    except ReftError as e:
        raise UsageError(str(e)) from None
    table = [r.row() for r in rows]
    for r in table:
        r.pop("selection", None)
    if cfg.json:
        print(json.dumps({"sites": [str(x) for x in sites], "rows": table}, indent=2, default=str))
    else:
        print(f"{'method':16s} {'params':>9s} {'accuracy':>9s} {'KL unrelated':>13s}")
        for r in table:
            print(f"{r['method']:16s} {r['trainable_params']:9d} {r['accuracy']:9.3f} {r['kl_unrelated']:13.4f}")
        if cfg.save and not cfg.compare:
            print(f"saved {cfg.kind} to {cfg.save}")
    return 0
