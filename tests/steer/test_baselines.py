"""The baseline table: every method on the same task, with honest parameter counts and KL."""

import pytest

from mechscope.core.site import Site
from mechscope.steer.baselines import MethodResult, compare, kl_unrelated, plain, steering_forward
from mechscope.steer.finetune import TrainRecipe
from mechscope.tasks import instructions as ins


@pytest.fixture(scope="module")
def setup():
    pytest.importorskip("peft")
    model = ins.load()
    task = ins.comparison_task(64, 16, 16, seed=1)
    sites = [Site(f"blocks.{l}", io="input") for l in range(ins.MODEL.n_layers)]
    return model, task, sites


def test_every_method_gets_a_row_with_its_parameter_count(setup):
    model, task, sites = setup
    rows = {r.method: r for r in compare(model, task, sites, 64, recipe=TrainRecipe(steps=3), batch_size=8)}
    assert list(rows) == ["prompting", "steering", "loreft", "direft", "lora", "full_finetuning"]
    assert rows["prompting"].trainable_params == 0 and rows["prompting"].kl_unrelated == 0.0
    assert rows["prompting"].accuracy == 1.0  # the model follows the written instruction
    assert rows["loreft"].trainable_params == 3 * (2 * 4 * 64 + 4)
    lora = sum(8 * (a + b) for a, b in [(64, 64)] * 4 + [(64, 256), (256, 64)]) * 3  # q k v o fc_in fc_out
    assert rows["lora"].trainable_params == lora
    assert rows["full_finetuning"].trainable_params == sum(p.numel() for p in model.parameters())
    assert all(isinstance(r, MethodResult) and 0 <= r.accuracy <= 1 for r in rows.values())
    assert all(p.requires_grad is False for p in model.parameters())  # the base model stays frozen


def test_steering_at_the_instruction_slot_from_the_embeddings_is_the_prompt(setup):
    # at the embeddings, REV - PLAIN at the slot is one vector: adding it is writing the instruction
    model, task, _ = setup
    site = Site("blocks.0", io="input")
    v = (model.embed.weight[ins.REV] - model.embed.weight[ins.PLAIN]).detach()
    fwd = steering_forward(model, v, site, 1.0, where=ins.SLOT)
    assert task.accuracy(fwd, task.test) == 1.0


def test_kl_of_a_method_against_itself_is_zero(setup):
    model, task, _ = setup
    assert kl_unrelated(plain(model), plain(model), task) == pytest.approx(0.0, abs=1e-7)
