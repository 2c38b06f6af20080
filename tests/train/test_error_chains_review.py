"""A ``loss_fn``'s own error reaches the caller as it was raised: its type, message and cause,
also when the step explains it (a compiled step's eager rerun) or inspects it (the
saved-tensor-hooks check), and also when its ``__str__`` raises."""

from __future__ import annotations

import pytest
import torch

import functrain as ft


class _Unprintable(RuntimeError):
    def __str__(self) -> str:
        raise AttributeError("this error cannot be rendered")


def _raising_loss(p, batch):
    loss = (p["w"] * batch).sum()
    try:
        {}["root"]
    except KeyError as err:
        raise ValueError("bad batch") from err
    return loss


def _state(tx):
    return ft.TrainState.create(params={"w": torch.ones(3)}, tx=tx)


def test_compiled_step_keeps_the_cause_of_the_error_its_eager_rerun_shows():
    tx = ft.sgd(0.1)
    step = ft.make_train_step(_raising_loss, tx, compile={"backend": "eager"})
    with pytest.raises(ValueError, match="bad batch") as info:
        step(_state(tx), torch.ones(4, 3))
    assert isinstance(info.value.__cause__, KeyError)  # was None: `raise real from None`
    assert info.value.__cause__.args == ("root",)
    assert any("eager run" in note for note in info.value.__notes__)


@pytest.mark.parametrize(
    "options",
    [{"strategy": "vmap"}, {"strategy": "loop", "grad_backend": "func"}],
    ids=["vmap", "loop-func"],
)
def test_an_error_whose_str_raises_propagates_itself(options):
    def loss_fn(p, batch):
        raise _Unprintable()

    tx = ft.sgd(0.1)
    step = ft.make_train_step(loss_fn, tx, micro_batches=2, **options)
    state = _state(tx)
    before = state.params["w"].clone()
    with pytest.raises(_Unprintable):  # was AttributeError from rendering it
        step(state, torch.ones(4, 3))
    assert torch.equal(state.params["w"], before)
