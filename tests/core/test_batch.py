import pytest
import torch

from mechscope.core.batch import collate, real_tokens


def test_collate_pads_left_and_right_with_masks_and_positions():
    right = collate([[5, 6, 7], [8]], pad_id=0, side="right")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    left = collate([[5, 6, 7], [8]], pad_id=9, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert left["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert real_tokens(left).tolist() == [[True, True, True], [False, False, True]]
    assert collate([torch.tensor([1, 2])], max_len=4)["input_ids"].shape == (1, 4)


def test_collate_errors():
    with pytest.raises(ValueError, match="empty list of sequences"):
        collate([])
    with pytest.raises(ValueError, match="sequences \\[1\\] are empty"):
        collate([[1], []])
    with pytest.raises(ValueError, match="more than max_len=2"):
        collate([[1, 2, 3]], max_len=2)
    with pytest.raises(ValueError, match="'left' or 'right'"):
        collate([[1]], side="middle")
