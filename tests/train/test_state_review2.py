"""TrainState review 2: repr, ``torch.compile`` and checkpoint round trips."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

import functrain as ft
from functrain import testing


def _state(**kw: Any) -> ft.TrainState:
    return ft.TrainState.create(params={"w": torch.ones(3)}, tx=ft.sgd(0.1), **kw)


# --- repr --------------------------------------------------------------------------------------


def test_repr_accepts_extra_names_of_mixed_types():
    state = _state(extra={1: torch.zeros(()), "ema": torch.zeros(())})
    text = repr(state)  # sorted() of int and str names raised TypeError
    assert "extra=[1, 'ema']" in text and "step=0" in text


def test_repr_of_a_state_with_many_extra_entries_is_bounded():
    state = _state(extra={f"entry{i}": torch.zeros(()) for i in range(10_000)})
    text = repr(state)
    assert len(text) < 400 and "9992 more" in text and "'entry0'" in text


class _ValueReads(TorchFunctionMode):
    """Records calls that read a tensor's values on the host (a sync on an accelerator)."""

    _READS = (torch.Tensor.__repr__, torch.Tensor.__format__, torch.Tensor.item)

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func in self._READS or getattr(func, "__name__", "") in {"tolist", "cpu"}:
            if args and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
                self.reads.append(f"{getattr(func, '__name__', func)} on {args[0].device}")
        return func(*args, **(kwargs or {}))


def test_repr_reads_no_values_of_tensors_off_the_cpu():
    # The meta device stands in for an accelerator: printing the step's value there would
    # copy it to the host, a device sync on every log line.
    state = ft.TrainState.create(params={"w": torch.ones(2, device="meta")}, tx=ft.adam(0.1))
    with _ValueReads() as mode:
        text = repr(state)
    assert mode.reads == []
    assert "step=<torch.int64 tensor of shape () on meta>" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_repr_of_a_cuda_state_does_not_sync():
    state = ft.TrainState.create(params={"w": torch.ones(2, device="cuda")}, tx=ft.adam(0.1))
    torch.cuda.set_sync_debug_mode("error")
    try:
        text = repr(state)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert "on cuda" in text


# --- torch.compile -----------------------------------------------------------------------------


def test_replacing_params_and_opt_state_compiles_in_one_graph():
    tx = ft.sgd(0.1)

    @torch.compile(fullgraph=True, backend="eager")
    def halve(state: ft.TrainState) -> ft.TrainState:
        params = {k: v * 0.5 for k, v in state.params.items()}
        return state.replace(step=state.step + 1, params=params, opt_state=tx.init(params))

    state = _state(buffers={"m": torch.zeros(2)}, extra={"e": torch.zeros(())})
    with testing.count_compiles() as count:
        for _ in range(3):
            state = halve(state)  # raised Unsupported (untyped_storage) before the fix
    assert count.compiles == 1, count.reasons
    assert int(state.step) == 3
    assert torch.equal(state.params["w"], torch.full((3,), 0.125))


def test_a_compiled_replace_that_aliases_its_source_is_consumed_with_it():
    @torch.compile(fullgraph=True, backend="eager")
    def scale_in_place(state: ft.TrainState) -> ft.TrainState:
        params = {k: v.mul_(2.0) for k, v in state.params.items()}  # the same memory
        return state.replace(params=params, opt_state=())

    source = _state()
    derived = scale_in_place(source)
    source._consume("a test")
    with pytest.raises(ft.ConsumedStateError, match="consumed by a test"):
        _ = derived.params


# --- checkpoints -------------------------------------------------------------------------------


def test_checkpoint_round_trip_is_bitwise_and_the_result_is_independent(tmp_path: Any):
    w = torch.tensor([-0.0, 1.5, float("nan")], dtype=torch.float64)
    params = {"w": w, "b": torch.tensor([2.0], dtype=torch.bfloat16)}
    tx = ft.adam(0.1)

    def loss(p: Any, batch: torch.Tensor) -> torch.Tensor:
        return (p["w"][:2] * batch).sum() + p["b"].float().sum()

    step = ft.make_train_step(loss, tx)
    state = ft.TrainState.create(
        params=params, tx=tx, buffers={"n": torch.arange(3)}, extra={"tag": torch.ones(1)}, seed=5
    )
    for _ in range(2):
        state, _ = step(state, torch.tensor([1.0, -2.0], dtype=torch.float64))
    path = os.path.join(tmp_path, "state.safetensors")
    ft.checkpoint.save(path, state)
    target = ft.TrainState.create(
        params={k: torch.zeros_like(v) for k, v in params.items()},
        tx=tx,
        buffers={"n": torch.zeros(3, dtype=torch.int64)},
        extra={"tag": torch.zeros(1)},
        seed=123,
    )
    restored = ft.checkpoint.restore(path, target)
    assert isinstance(restored, ft.TrainState)
    assert type(restored.opt_state[0]) is type(state.opt_state[0])  # the NamedTuple survives
    testing.assert_trees_all_equal(restored, state, bitwise=True)  # -0.0 and NaN bits too
    assert ft.key_seed(restored.key) == ft.key_seed(state.key)
    # The restored state owns fresh memory: donating it leaves the target usable.
    step(restored, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert restored.consumed and not target.consumed
    assert torch.equal(target.params["w"], torch.zeros(3, dtype=torch.float64))
