"""The instruction language: exact answers, aligned prompts, batching, and the shipped model."""

import pytest
import torch

from mechscope.tasks import instructions as ins


def test_transformations_are_exact():
    x = [5, 11, 0, 7]
    assert ins.transform(x, "copy") == x
    assert ins.transform(x, "rev") == [7, 0, 11, 5]
    assert ins.transform(x, "sort") == [0, 5, 7, 11]
    assert ins.transform(x, "shift") == [6, 0, 1, 8]
    with pytest.raises(ValueError, match="unknown instruction"):
        ins.transform(x, "double")


def test_control_and_prompted_tasks_line_up():
    plain, prompted = ins.control_task(20, seed=3), ins.prompted_task(20, seed=3)
    for a, b in zip(plain, prompted):
        assert a.prompt[ins.SLOT] == ins.PLAIN and b.prompt[ins.SLOT] == ins.REV
        assert a.prompt[:ins.SLOT] + a.prompt[ins.SLOT + 1:] == b.prompt[:ins.SLOT] + b.prompt[ins.SLOT + 1:]
        assert a.answer == b.answer == tuple(list(a.prompt[2:-1])[::-1]) + (ins.EOS,)


def test_train_batch_scores_only_the_answer():
    ex = ins.examples(4, "sort", seed=0)
    tb = ins.train_batch(ex)
    for i, e in enumerate(ex):
        labels = tb.labels[i][tb.labels[i] != -100].tolist()
        assert labels == list(e.answer)
        start, n = int(tb.prompt_start[i]), int(tb.prompt_len[i])
        assert tb.inputs["input_ids"][i, start:start + n].tolist() == list(e.prompt)
        assert int(tb.inputs["attention_mask"][i, :start].sum()) == 0


def test_generation_with_a_perfect_oracle():
    # a forward that always predicts the right next token scores 1.0; prompts are left-padded
    data = ins.examples(6, "rev", seed=1)

    def oracle(inputs, start, length):
        out = torch.full((*inputs["input_ids"].shape, ins.VOCAB), -10.0)
        for i, e in enumerate(data):
            done = inputs["input_ids"].shape[1] - int(start[i]) - int(length[i])
            out[i, -1, e.answer[min(done, len(e.answer) - 1)]] = 10.0
        return out

    assert ins.exact_match(oracle, data) == 1.0


def test_shipped_model_follows_instructions_and_does_not_reverse_unasked():
    model = ins.load()
    fwd = ins.plain(model)
    for name in ins.INSTRUCTIONS:
        assert ins.exact_match(fwd, ins.examples(100, name, seed=11)) >= 0.98, name
    assert ins.exact_match(fwd, ins.control_task(100, seed=12)) < 0.1  # the behaviour to induce is absent


def test_training_runs_and_lowers_the_loss():
    losses = []
    ins.train(ins.Recipe(steps=30, batch=16), log=lambda s: losses.append(float(s.split()[-1])))
    assert losses[-1] < losses[0]
