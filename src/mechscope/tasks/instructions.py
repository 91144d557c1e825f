"""A synthetic language with instructions, for comparing ways to control a model.

A sequence is ``BOS INSTR x_1 .. x_n SEP y_1 .. y_n EOS`` with symbols ``x_i`` in
0..11 and ``n`` in 3..7. The answer ``y`` is a transformation of ``x`` chosen by the
instruction token, and known exactly:

==========================  ===============================
``PLAIN`` (no instruction)  copy: ``y = x``
``REV``                     reverse: ``y = x[::-1]``
``SORT``                    sort ascending
``SHIFT``                   ``y_i = x_i + 1 mod 12``
==========================  ===============================

The instruction slot is always there (``PLAIN`` when nothing is asked), so inputs with
and without an instruction line up position by position. The base model is a small
transformer trained here on that language (loss on the answer only). The **control
task** is to make it *reverse without being told*: ``BOS PLAIN x SEP`` -> ``x[::-1] EOS``.
The behaviour exists in the model (behind ``REV``), so
prompting (insert ``REV``) is the reference, and steering, ReFT, LoRA and full
finetuning are compared on the same training data, with their trainable-parameter
counts, their accuracy, and their KL on *unrelated* inputs (prompts with ``SORT`` or
``SHIFT``, whose answers should not change).

Batches are left-padded (prompts end in the same column, so generation appends on the
right); ``position_ids`` count real tokens, so padding does not change the model's view.
The shipped checkpoint ``zoo/checkpoints/instructions.safetensors`` is reproduced by
``mechscope train instructions`` (:func:`train`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.batch import collate
from mechscope.core.run import logits_of
from mechscope.steer.baselines import SupervisedTask
from mechscope.zoo.recipes import load_shipped, save_shipped, train_steps
from mechscope.zoo.transformer import Transformer, TransformerConfig

N_SYMBOLS = 12
BOS, SEP, EOS, PAD, PLAIN, REV, SORT, SHIFT = range(N_SYMBOLS, N_SYMBOLS + 8)
VOCAB = N_SYMBOLS + 8
INSTRUCTIONS = {"copy": PLAIN, "rev": REV, "sort": SORT, "shift": SHIFT}
SLOT = 1  # position of the instruction token in every prompt
MIN_LEN, MAX_LEN = 3, 7
CHECKPOINT = Path(__file__).resolve().parent.parent / "zoo" / "checkpoints" / "instructions.safetensors"
MODEL = TransformerConfig(vocab=VOCAB, n_ctx=24, d_model=64, n_layers=3, n_heads=4, d_head=16, d_mlp=256)
MIXTURE = {"copy": 0.4, "rev": 0.2, "sort": 0.2, "shift": 0.2}


def transform(x: Sequence[int], instruction: str) -> list[int]:
    """The exact answer for ``x`` under ``instruction`` (one of :data:`INSTRUCTIONS`)."""
    if instruction == "copy":
        return list(x)
    if instruction == "rev":
        return list(x)[::-1]
    if instruction == "sort":
        return sorted(x)
    if instruction == "shift":
        return [(v + 1) % N_SYMBOLS for v in x]
    raise ValueError(f"unknown instruction {instruction!r}; choose one of {', '.join(INSTRUCTIONS)}")


@dataclass(frozen=True)
class Example:
    """One prompt (``BOS [INSTR] x SEP``) and its answer (``y EOS``)."""

    prompt: tuple[int, ...]
    answer: tuple[int, ...]


def make_example(x: Sequence[int], instruction: str, say: str = "same") -> Example:
    """``say`` is the instruction written in the prompt: "same" as ``instruction``, or another one
    (``"copy"`` writes ``PLAIN``, i.e. no instruction)."""
    shown = instruction if say == "same" else say
    if shown not in INSTRUCTIONS:
        raise ValueError(f"unknown instruction {shown!r}; choose one of {', '.join(INSTRUCTIONS)}")
    prompt = (BOS, INSTRUCTIONS[shown]) + tuple(x) + (SEP,)
    return Example(prompt, tuple(transform(x, instruction)) + (EOS,))


def examples(n: int, instruction: str, seed: int = 0, say: str = "same") -> list[Example]:
    """``n`` examples of one instruction (see :func:`make_example` for ``say``)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(MIN_LEN, MAX_LEN + 1, (1,), generator=gen))
        x = torch.randint(N_SYMBOLS, (length,), generator=gen).tolist()
        out.append(make_example(x, instruction, say))
    return out


def control_task(n: int, seed: int = 0) -> list[Example]:
    """The behaviour to induce: reverse, with no instruction (``PLAIN``) in the prompt."""
    return examples(n, "rev", seed, say="copy")


def prompted_task(n: int, seed: int = 0) -> list[Example]:
    """The same inputs as :func:`control_task` with the instruction written in: the prompting baseline."""
    return examples(n, "rev", seed, say="rev")


def unrelated(n: int, seed: int = 0) -> list[Example]:
    """Prompts whose answers the control task should not change (``SORT`` and ``SHIFT``)."""
    half = n // 2
    return examples(half, "sort", seed) + examples(n - half, "shift", seed + 1)


def mixture(n: int, seed: int = 0) -> list[Example]:
    """The pretraining language: every instruction in :data:`MIXTURE` proportions."""
    out: list[Example] = []
    for i, (name, frac) in enumerate(MIXTURE.items()):
        out += examples(round(n * frac), name, seed * 10 + i)
    order = torch.randperm(len(out), generator=torch.Generator().manual_seed(seed))
    return [out[i] for i in order]


# --------------------------------------------------------------------------- batches
@dataclass(frozen=True)
class TrainBatch:
    """Left-padded prompt+answer; ``labels`` -100 off the answer; ``prompt_start``/``prompt_len`` [batch]."""

    inputs: dict[str, Tensor]
    labels: Tensor
    prompt_start: Tensor
    prompt_len: Tensor


def train_batch(batch: Sequence[Example], pad_id: int = PAD) -> TrainBatch:
    """Teacher forcing: position t predicts token t+1; only answer tokens are scored."""
    seqs = [list(e.prompt) + list(e.answer) for e in batch]
    inputs = collate([s[:-1] for s in seqs], pad_id=pad_id, side="left")
    width = inputs["input_ids"].shape[1]
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    starts = torch.zeros(len(batch), dtype=torch.long)
    for i, (e, s) in enumerate(zip(batch, seqs)):
        pad = width - (len(s) - 1)
        starts[i] = pad
        n_ans = len(e.answer)
        labels[i, width - n_ans:] = torch.tensor(e.answer)  # the last n_ans inputs predict the answer
    lens = torch.tensor([len(e.prompt) for e in batch])
    return TrainBatch(inputs, labels, starts, lens)


def prompt_batch(batch: Sequence[Example], pad_id: int = PAD) -> dict[str, Tensor]:
    """Left-padded prompts only, for generation."""
    return collate([list(e.prompt) for e in batch], pad_id=pad_id, side="left")


def extend(inputs: dict[str, Tensor], token: Tensor) -> dict[str, Tensor]:
    """Append one token per row on the right (after a left-padded prompt)."""
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(token[:, None])], 1)
    pos = torch.cat([inputs["position_ids"], inputs["position_ids"][:, -1:] + 1], 1)
    return {"input_ids": torch.cat([inputs["input_ids"], token[:, None]], 1), "attention_mask": mask, "position_ids": pos}


Forward = Callable[[dict, Tensor, Tensor], Any]  # (inputs, prompt_start, prompt_len) -> output


def plain(model: nn.Module) -> Forward:
    """The model itself as a :data:`Forward` (positions unused)."""
    return lambda inputs, start, length: model(**inputs)


@torch.no_grad()
def generate(forward: Forward, batch: Sequence[Example], max_new: int | None = None,
             pad_id: int = PAD) -> list[list[int]]:
    """Greedy answers of a (possibly intervened) model; prompts are left-padded, so the prompt
    positions stay where they are while tokens are appended."""
    inputs = prompt_batch(batch, pad_id)
    lens = inputs["attention_mask"].sum(1)
    starts = inputs["attention_mask"].shape[1] - lens
    steps = max_new or max(len(e.answer) for e in batch)
    out = []
    for _ in range(steps):
        nxt = logits_of(forward(inputs, starts, lens))[:, -1].argmax(-1)
        out.append(nxt)
        inputs = extend(inputs, nxt)
    gen = torch.stack(out, 1).tolist()
    return [g[:len(e.answer)] for g, e in zip(gen, batch)]


def exact_match(forward: Forward, data: Sequence[Example], batch_size: int = 256, pad_id: int = PAD) -> float:
    """Fraction of examples whose greedy answer (with EOS) is exactly right."""
    if not data:
        raise ValueError("exact_match needs at least one example")
    hits = 0
    for start in range(0, len(data), batch_size):
        chunk = data[start:start + batch_size]
        hits += sum(list(e.answer) == g for e, g in zip(chunk, generate(forward, chunk, pad_id=pad_id)))
    return hits / len(data)


def comparison_task(n_train: int = 1000, n_test: int = 500, n_unrelated: int = 500, seed: int = 0) -> Any:
    """The control task as a :class:`mechscope.steer.baselines.SupervisedTask`."""
    s = seed * 100
    return SupervisedTask(train=control_task(n_train, s + 1), test=control_task(n_test, s + 2),
                          prompted_train=prompted_task(n_train, s + 1), prompted_test=prompted_task(n_test, s + 2),
                          unrelated=unrelated(n_unrelated, s + 3), batch=train_batch, accuracy=exact_match,
                          steer_positions=(SLOT, -1))


# --------------------------------------------------------------------------- the base model
@dataclass(frozen=True)
class Recipe:
    steps: int = 3000
    batch: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0


def build_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(MODEL)


def answer_loss(model: nn.Module, tb: TrainBatch) -> Tensor:
    logits = logits_of(model(**tb.inputs))
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tb.labels.reshape(-1))


def train(recipe: Recipe = Recipe(), log: Any = None) -> Transformer:
    """Train the instruction model on the :data:`MIXTURE` language (a few minutes on one thread)."""
    model = build_model(recipe.seed)

    def loss_at(step: int) -> Tensor:
        return answer_loss(model, train_batch(mixture(recipe.batch, seed=recipe.seed * 1_000_003 + step + 1)))

    return train_steps(model, recipe, loss_at, pct_start=0.1, clip=1.0, log=log)


def save(model: Transformer, path: Path = CHECKPOINT, recipe: Recipe = Recipe()) -> None:
    save_shipped(path, model, MODEL, recipe)


def load(path: Path = CHECKPOINT) -> Transformer:
    """The shipped (or a retrained) instruction model, in eval mode."""
    return load_shipped(path, MODEL, "instruction-model", "instructions")


def train_and_ship(out_dir: Path, log: Any = None) -> list[Path]:
    """``mechscope train``'s entry: train by :class:`Recipe` and write the checkpoint into ``out_dir``."""
    recipe = Recipe()
    path = Path(out_dir) / CHECKPOINT.name
    save(train(recipe, log=log), path, recipe)
    return [path]
