"""The online code: block boundaries, codelength arithmetic, and the known ordering real < shuffled."""

import math

import pytest
import torch

from mechscope.probe.control import shuffled_labels
from mechscope.probe.linear import ProbeError
from mechscope.probe.mdl import block_ends, online_codelength


def test_block_ends_follow_the_published_fractions():
    assert block_ends(10000) == [10, 20, 40, 80, 160, 320, 625, 1250, 2500, 5000, 10000]
    assert block_ends(100) == [1, 2, 3, 6, 12, 25, 50, 100]  # empty blocks merged


def test_codelength_adds_up_and_orders_real_below_shuffled():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(800, 8, generator=g)
    y = (x[:, 0] + 0.2 * torch.randn(800, generator=g) > 0).long()
    real = online_codelength(x, y, seed=0)
    shuf = online_codelength(x, shuffled_labels(y, 1), seed=0)
    assert real.uniform_codelength == pytest.approx(800 * math.log2(2))
    assert real.block_bits[0] == pytest.approx(real.block_ends[0] * 1.0)  # uniform first block
    assert real.codelength == pytest.approx(sum(real.block_bits))
    assert real.compression > 2.0
    assert 0.8 < shuf.compression < 1.1  # random labels do not compress
    assert real.codelength < shuf.codelength


def test_three_classes_use_log2_3_for_the_first_block():
    x = torch.randn(300, 4)
    y = torch.arange(300) % 3
    code = online_codelength(x, y)
    assert code.block_bits[0] == pytest.approx(code.block_ends[0] * math.log2(3))


def test_one_task_only():
    with pytest.raises(ProbeError, match="one task's labels"):
        online_codelength(torch.randn(50, 2), torch.zeros(50, 2, dtype=torch.long))
