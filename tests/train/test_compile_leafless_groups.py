"""A ``compile=`` step whose optimizer keeps a group masking every parameter.

torch 2.13's dynamo cannot flatten a dict without tensors ("Unexpected type in sourceless
builder: DictMetaData", which it calls a dynamo bug), and such a group's state holds one: the
step raised that message, naming nothing of the user's. It now says which configuration does
it and what to do; the same step runs eagerly.
"""

from __future__ import annotations

import pytest
import torch

import functrain as ft


def _loss(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(x @ p["w"].T) @ p["v"].T).square().mean()


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: ft.muon(0.05),  # only matrices: the AdamW group is empty
        lambda: ft.partition({"a": ft.adam(0.1), "b": ft.sgd(0.1)}, {"w": "a", "v": "a"}),
    ],
    ids=["muon_only_matrices", "partition_unused_label"],
)
def test_compiled_step_names_the_empty_group(make_tx) -> None:
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 2, generator=gen), "v": torch.randn(2, 3, generator=gen)}
    batch = torch.randn(8, 2, generator=gen)
    tx = make_tx()
    eager = ft.make_train_step(_loss, tx)
    eager(ft.TrainState.create(params=params, tx=tx), batch)  # eager runs
    torch._dynamo.reset()
    step = ft.make_train_step(_loss, tx, compile={"backend": "eager"})
    with pytest.raises(ValueError, match="group masks every parameter"):
        step(ft.TrainState.create(params=params, tx=tx), batch)
