"""Batch splitting: tensor_split sizes, explicit sizes, views, clear errors."""

import pytest
import torch

import functrain as ft
from functrain.train import microbatch


def test_sizes_follow_tensor_split():
    for n in range(1, 13):
        for k in range(1, n + 1):
            split = ft.split_batch(torch.zeros(n), k)
            assert list(split.sizes) == [len(c) for c in torch.tensor_split(torch.arange(n), k)]
            assert split.num_micro_batches == k


def test_micro_batches_are_views_and_cover_the_batch():
    batch = {"x": torch.arange(20.0).reshape(10, 2), "y": torch.arange(10)}
    split = ft.split_batch(batch, (4, 1, 5))
    parts = [microbatch.micro_batch(batch, split, i) for i in range(3)]
    assert parts[1]["x"].data_ptr() == batch["x"][4:].data_ptr()
    assert torch.equal(torch.cat([p["y"] for p in parts]), batch["y"])


def test_stack_groups_equal_sizes():
    batch = torch.arange(10)
    split = ft.split_batch(batch, (2, 3, 2, 3))
    groups = microbatch.size_groups(split)
    assert groups == [(2, [0, 2]), (3, [1, 3])]
    assert microbatch.stack(batch, split, [0, 2]).tolist() == [[0, 1], [5, 6]]
    even = ft.split_batch(batch, 5)
    stacked = microbatch.stack(batch, even, [0, 1, 2, 3, 4])
    assert stacked.shape == (5, 2) and stacked.data_ptr() == batch.data_ptr()


def test_clear_errors():
    with pytest.raises(
        ValueError, match=r"different leading.*batch\['x'\] has 4.*batch\['y'\] has 3"
    ):
        ft.split_batch({"x": torch.zeros(4, 2), "y": torch.zeros(3)}, 2)
    with pytest.raises(ValueError, match="micro_batches=5 is more than the 4 examples"):
        ft.split_batch(torch.zeros(4), 5)
    with pytest.raises(ValueError, match="add up to 5, not the batch size 4"):
        ft.split_batch(torch.zeros(4), (2, 3))
    with pytest.raises(ValueError, match="0-d"):
        ft.split_batch({"x": torch.zeros(4), "t": torch.tensor(1.0)}, 2)
    with pytest.raises(TypeError, match=r"batch\['n'\] must be a tensor"):
        ft.split_batch({"x": torch.zeros(4), "n": 3}, 2)
    with pytest.raises(ValueError, match=">= 1"):
        ft.split_batch(torch.zeros(4), 0)
