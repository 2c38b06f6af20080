"""Review tests for ``make_eval_step`` and the micro-batch combination (``combine.py``).

References are computed by hand in float64 from the whole eval set; none come from the code
under test.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import functrain as ft

N = 24  # eval-set size for the property tests


def _data(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 3, generator=g)
    mask = torch.rand(N, 5, generator=g) < 0.6
    mask[:, 0] = mask[:, 0] | (torch.arange(N) % 4 == 0)  # some rows have tokens, some not
    return {"x": x, "mask": mask, "y": torch.randint(0, 2, (N,), generator=g)}


W = torch.tensor([0.5, -1.0, 2.0])


def _per_example(params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> Any:
    """Per-example score and per-token losses (the token loss is ``score² * (j + 1)``)."""
    score = batch["x"] @ params["w"]
    tokens = score[:, None] ** 2 * torch.arange(1.0, 6.0, dtype=score.dtype)
    return score, tokens


def _mean_loss(params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> Any:
    score, tokens = _per_example(params, batch)
    correct = ((score > 0).long() == batch["y"]).sum()  # an integer aux: a per-example mean
    return ft.LossOutput(
        (score**2).mean(),
        aux={
            "acc": correct / score.shape[0],
            "correct_frac": ft.LossSum(correct, score.shape[0]),
            "tok": ft.LossSum((tokens * batch["mask"]).sum(), batch["mask"].sum()),
        },
    )


def _sum_loss(params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> Any:
    score, tokens = _per_example(params, batch)
    mask = batch["mask"]
    return ft.LossOutput(
        ft.LossSum((tokens * mask).sum(), mask.sum()), aux={"abs": score.abs().mean()}
    )


def _reference(data: dict[str, torch.Tensor]) -> dict[str, float]:
    """The full-eval-set metrics, by hand in float64."""
    x, mask, y = data["x"].double(), data["mask"].double(), data["y"]
    score = x @ W.double()
    tokens = score[:, None] ** 2 * torch.arange(1.0, 6.0, dtype=torch.float64)
    acc = ((score > 0).long() == y).double().mean()
    tok = (tokens * mask).sum() / mask.sum()
    return {
        "mean/loss": float((score**2).mean()),
        "mean/acc": float(acc),
        "mean/correct_frac": float(acc),
        "mean/tok": float(tok),
        "sum/loss": float(tok),
        "sum/abs": float(score.abs().mean()),
        "num_tokens": float(mask.sum()),
    }


def _cuts(sizes: list[int]) -> list[int]:
    """Boundaries of consecutive pieces of the given sizes."""
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


@st.composite
def _splits(draw: st.DrawFn) -> list[tuple[int, int]]:
    """A partition of ``range(N)`` into eval batches, each with a micro-batch count."""
    points = draw(st.sets(st.integers(1, N - 1), max_size=5))
    bounds = [0, *sorted(points), N]
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    return [(s, draw(st.integers(1, min(s, 4)))) for s in sizes]


@settings(max_examples=25, deadline=None)
@given(split=_splits(), seed=st.integers(0, 3))
def test_any_split_of_the_eval_set_gives_the_full_set_metrics(
    split: list[tuple[int, int]], seed: int
) -> None:
    """Batches of unequal sizes, each cut into micro-batches, weighted by ``num_examples``
    (``num_tokens`` for a LossSum loss and ``LossSum`` aux), give the full-set values."""
    data = _data(seed)
    ref = _reference(data)
    state = ft.TrainState.create(params={"w": W.clone()}, tx=ft.sgd(0.1))
    bounds = _cuts([s for s, _ in split])
    for kind, loss_fn in (("mean", _mean_loss), ("sum", _sum_loss)):
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for (start, stop), (_, k) in zip(itertools.pairwise(bounds), split):
            batch = {name: v[start:stop] for name, v in data.items()}
            m = ft.make_eval_step(loss_fn, micro_batches=k)(state, batch)
            assert int(m["num_examples"]) == stop - start
            assert m["num_examples"].dtype == torch.int64
            n = float(m["num_examples"])
            # Each value's own weight: what the metric is a mean over in this batch.
            batch_tokens = float(batch["mask"].double().sum())
            own = {
                "loss": batch_tokens if kind == "sum" else n,
                "acc": n,
                "correct_frac": n,
                "tok": batch_tokens,
                "abs": n,
            }
            for name, value in m.items():
                if name in ("num_examples", "num_tokens"):
                    continue
                w = own[name]
                if w:  # a batch with no tokens has a NaN token mean and adds nothing
                    sums[name] = sums.get(name, 0.0) + float(value) * w
                    weights[name] = weights.get(name, 0.0) + w
            if kind == "sum":
                assert float(m["num_tokens"]) == batch_tokens
        for name in sums:
            assert sums[name] / weights[name] == pytest.approx(ref[f"{kind}/{name}"], rel=1e-5)


def test_eval_mode_model_uses_running_stats_and_mutates_nothing() -> None:
    """An eval-mode model: dropout off, BatchNorm normalises with its running statistics;
    the state's params and buffers keep their values and version counters; no graph."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5))
    with torch.no_grad():
        net[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        net[1].running_var.copy_(torch.tensor([2.0, 0.5, 1.5, 1.0]))
    model, params, buffers = ft.functionalize(net)
    model = model.eval()
    state = ft.TrainState.create(params=params, buffers=buffers, tx=ft.sgd(0.1))
    before = {k: (v.clone(), v._version) for k, v in {**state.params, **state.buffers}.items()}

    def loss_fn(p: dict[str, torch.Tensor], b: torch.Tensor) -> torch.Tensor:
        return (model(p, b) ** 2).mean()

    x = torch.randn(10, 3)
    m = ft.make_eval_step(loss_fn, micro_batches=(4, 3, 3))(state, x)

    p64 = {k: v.double() for k, v in state.params.items()}
    b64 = {k: v.double() for k, v in state.buffers.items()}
    h = x.double() @ p64["0.weight"].T + p64["0.bias"]
    h = (h - b64["1.running_mean"]) / torch.sqrt(b64["1.running_var"] + 1e-5)
    h = h * p64["1.weight"] + p64["1.bias"]
    assert float(m["loss"]) == pytest.approx(float((h**2).mean()), rel=1e-5)
    assert m["loss"].grad_fn is None and not m["loss"].requires_grad
    for k, v in {**state.params, **state.buffers}.items():
        assert torch.equal(v, before[k][0]) and v._version == before[k][1], k
    assert not state.consumed


class _NoHostSync(TorchFunctionMode):
    """Fails on the tensor-to-Python reads that block on a device."""

    READS = frozenset({"item", "__bool__", "__float__", "__int__", "__index__", "tolist"})

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # Keys are CPU tensors by design (rng.py): reading one is no device sync.
        caller = sys._getframe(1).f_code.co_filename
        if getattr(func, "__name__", "") in self.READS and not caller.endswith("rng.py"):
            raise AssertionError(f"host sync: Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


def test_eval_step_reads_nothing_back_to_the_host() -> None:
    data = _data(0)
    state = ft.TrainState.create(params={"w": W.clone()}, tx=ft.sgd(0.1))
    for loss_fn in (_mean_loss, _sum_loss):
        step = ft.make_eval_step(loss_fn, micro_batches=(7, 9, 8))
        step(state, data)  # warm-up outside the mode
        with _NoHostSync():
            step(state, data)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sums_are_float32(dtype: torch.dtype) -> None:
    """Half-precision losses and aux: the combined value is the float64 mean rounded once,
    whatever the micro-batch count (a half-precision running sum drifts with it)."""
    values = (torch.arange(1, 201, dtype=torch.float64) % 7 + 250.0).to(dtype)

    def loss_fn(p: dict[str, torch.Tensor], b: torch.Tensor) -> Any:
        return ft.LossOutput(b.mean(), aux={"s": ft.LossSum(b.sum(), b.numel())})

    state = ft.TrainState.create(params={"w": torch.zeros(())}, tx=ft.sgd(0.1))
    expected = values.double().mean().to(dtype)
    for k in (1, 8, 200):
        m = ft.make_eval_step(loss_fn, micro_batches=k)(state, values)
        assert m["loss"].dtype == dtype and m["s"].dtype == dtype
        # Micro-batch means are rounded to ``dtype`` by loss_fn itself: allow that one rounding.
        assert float(m["loss"]) == pytest.approx(float(expected), rel=2e-3)
        assert m["s"] == expected or k == 200  # per-value sums of one element: exact in dtype


def test_aux_named_num_tokens_is_refused_for_a_mean_loss() -> None:
    """A mean loss's aux ``num_tokens`` was reported as the built-in count, which the loop
    reads as the loss's token weight: a silently reweighted eval loss."""

    def loss_fn(p: dict[str, torch.Tensor], b: torch.Tensor) -> Any:
        return ft.LossOutput((p["w"] * b).mean(), aux={"num_tokens": b.mean()})

    state = ft.TrainState.create(params={"w": torch.tensor(1.0)}, tx=ft.sgd(0.1))
    with pytest.raises(ValueError, match="'num_tokens' clashes with a built-in metric"):
        ft.make_eval_step(loss_fn)(state, torch.arange(4.0))


def test_aux_keys_in_another_order_per_micro_batch_combine_by_name() -> None:
    """The same aux keys in another insertion order were refused as "different aux"."""

    def loss_fn(p: dict[str, torch.Tensor], b: torch.Tensor) -> Any:
        aux = {"lo": b.min(), "hi": ft.LossSum(b.sum(), b.numel())}
        if b.shape[0] == 1:
            aux = dict(reversed(aux.items()))
        return ft.LossOutput((p["w"] * b).mean(), aux=aux)

    state = ft.TrainState.create(params={"w": torch.tensor(2.0)}, tx=ft.sgd(0.1))
    x = torch.tensor([1.0, 2.0, 3.0, 10.0])
    m = ft.make_eval_step(loss_fn, micro_batches=(3, 1))(state, x)
    assert float(m["lo"]) == pytest.approx(0.75 * 1.0 + 0.25 * 10.0)  # example-weighted mins
    assert float(m["hi"]) == pytest.approx(4.0)
    assert float(m["loss"]) == pytest.approx(8.0)


def test_bad_input_errors_name_the_key_or_shape() -> None:
    state = ft.TrainState.create(params={"w": torch.tensor(1.0)}, tx=ft.sgd(0.1))

    def nested(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> Any:
        return ft.LossOutput(b["x"].mean(), aux={"acc": {"top1": b["x"].mean()}})

    with pytest.raises(TypeError, match=r"aux\['acc'\] must be a 0-d tensor or ft.LossSum"):
        ft.make_eval_step(nested)(state, {"x": torch.ones(3)})

    def unreduced(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> Any:
        return ft.LossOutput(b["x"].mean(), aux={"err": b["x"]})

    with pytest.raises(ValueError, match=r"aux\['err'\].*shape \(3,\)"):
        ft.make_eval_step(unreduced)(state, {"x": torch.ones(3)})

    mean_x = ft.make_eval_step(lambda p, b: b["x"].mean())
    with pytest.raises(ValueError, match=r"batch\['x'\] has 3, batch\['y'\] has 2"):
        mean_x(state, {"x": torch.ones(3), "y": torch.ones(2)})


def test_empty_batch_is_refused_with_a_clear_error() -> None:
    """Deliberate: the metric keys (aux, ``num_tokens``) come from running loss_fn, which an
    empty batch cannot do meaningfully; the loop's ``evaluate`` skips weight-0 batches."""
    state = ft.TrainState.create(params={"w": torch.tensor(1.0)}, tx=ft.sgd(0.1))
    with pytest.raises(ValueError, match="the batch is empty"):
        ft.make_eval_step(lambda p, b: b.mean())(state, torch.zeros(0, 3))
