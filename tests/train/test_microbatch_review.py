"""Review of batch splitting and micro-batch combination.

Covers a ``LossSum`` micro-batch that counts no unit (the grad-stats hook used to get
``∇Tᵢ / 0 = NaN``), low-precision losses whose metric depended on the number of micro-batches
(running sums kept in bfloat16), micro-batch specifications that were misread (bool tensors,
dicts, 0-d tensors) and error messages that suggested what cannot stand there.
"""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft

ENGINES = [("loop", "func"), ("loop", "autograd"), ("vmap", "func")]


def _recording_hook() -> ft.GradStatsHook:
    """Reports every micro-batch's squared gradient norm, size and loss."""
    return ft.GradStatsHook(
        init=lambda params: None,
        per_micro_batch=lambda g, b: {"sq": ft.tree.norm(g, squared=True), "b": b},
        update=lambda stats, grads, s: (
            {"sq": stats.values["sq"], "sizes": stats.sizes, "losses": stats.losses},
            s,
        ),
    )


# ---------------------------------------------------------------- all-padding micro-batches


@pytest.mark.parametrize("strategy, backend", ENGINES)
def test_an_all_padding_micro_batch_gives_the_hook_zeros_and_leaves_the_step_exact(
    strategy, backend
):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)  # third 2: no token
    w0 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)

    def per_token(w, xs, ms):
        return ((xs @ w).sin() + w.square().sum()) * ms

    def loss_fn(p, b):
        return ft.LossSum(per_token(p["w"], *b).sum(), b[1].sum())

    tx = ft.sgd(1.0)
    step = ft.make_train_step(
        loss_fn,
        tx,
        micro_batches=3,
        grad_stats=_recording_hook(),
        strategy=strategy,
        grad_backend=backend,
        donate=False,
    )
    state = ft.TrainState.create(params={"w": w0}, tx=tx)
    new, m = step(state, (x, mask))

    # The step: Σ ∇Tᵢ / Σ Cᵢ and Σ Tᵢ / Σ Cᵢ over the whole batch, by hand in float64.
    def full(w):
        return per_token(w, x, mask).sum() / mask.sum()

    torch.testing.assert_close(w0 - new.params["w"], torch.func.grad(full)(w0), rtol=1e-12, atol=0)
    torch.testing.assert_close(m["loss"], full(w0), rtol=1e-12, atol=0)
    # The hook: each counted micro-batch's mean; the empty one zeros with size 0 (was NaN).
    expected_sq, expected_loss = [], []
    for i in range(3):
        xs, ms = x[2 * i : 2 * i + 2], mask[2 * i : 2 * i + 2]
        if ms.sum() == 0:
            expected_sq.append(0.0)
            expected_loss.append(0.0)
            continue
        g = torch.func.grad(lambda w: per_token(w, xs, ms).sum() / ms.sum())(w0)
        expected_sq.append(float(g.square().sum()))
        expected_loss.append(float(per_token(w0, xs, ms).sum() / ms.sum()))
    f64 = dict(dtype=torch.float64)
    torch.testing.assert_close(m["sq"], torch.tensor(expected_sq, **f64), rtol=1e-12, atol=0)
    torch.testing.assert_close(m["losses"], torch.tensor(expected_loss, **f64), rtol=1e-12, atol=0)
    torch.testing.assert_close(m["sizes"], torch.tensor([2.0, 0.0, 1.0], **f64))
    # MicroBatchStats' identity: the size-weighted mean of the losses is the batch loss.
    torch.testing.assert_close(
        (m["sizes"] * m["losses"]).sum() / m["sizes"].sum(), m["loss"], rtol=1e-12, atol=0
    )


@st.composite
def _padded_cases(draw):
    n = draw(st.integers(2, 9))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1)))
    sizes = tuple(b - a for a, b in itertools.pairwise([0, *cuts, n]))
    mask = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    mask[draw(st.integers(0, n - 1))] = 1  # at least one unit in the batch
    engine = draw(st.sampled_from(ENGINES))
    return sizes, mask, engine, draw(st.integers(0, 2**16))


@given(_padded_cases())
def test_hook_stats_of_any_padded_split_are_finite_and_weigh_to_the_batch_loss(case):
    sizes, mask, (strategy, backend), seed = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(mask), 2, generator=gen, dtype=torch.float64)
    m = torch.tensor(mask, dtype=torch.float64)
    w0 = torch.randn(2, generator=gen, dtype=torch.float64)

    def total(w, xs, ms):
        return ((xs @ w).tanh() * ms).sum()

    tx = ft.sgd(1.0)
    step = ft.make_train_step(
        lambda p, b: ft.LossSum(total(p["w"], *b), b[1].sum()),
        tx,
        micro_batches=sizes,
        grad_stats=_recording_hook(),
        strategy=strategy,
        grad_backend=backend,
        donate=False,
    )
    new, out = step(ft.TrainState.create(params={"w": w0}, tx=tx), (x, m))
    full = torch.func.grad(lambda w: total(w, x, m) / m.sum())(w0)
    torch.testing.assert_close(w0 - new.params["w"], full, rtol=1e-10, atol=1e-13)
    counts = torch.stack([c.sum() for c in m.split(sizes)])
    torch.testing.assert_close(out["sizes"], counts)
    assert bool(torch.isfinite(out["sq"]).all() and torch.isfinite(out["losses"]).all())
    assert bool((out["sq"][counts == 0] == 0).all())
    torch.testing.assert_close(
        (out["sizes"] * out["losses"]).sum() / out["sizes"].sum(),
        total(w0, x, m) / m.sum(),
        rtol=1e-12,
        atol=1e-15,
    )


@pytest.mark.parametrize("strategy, backend", ENGINES)
def test_noise_scale_with_an_empty_micro_batch_is_finite(strategy, backend):
    x = torch.arange(9.0, dtype=torch.float64)
    mask = torch.tensor([1.0, 1, 1, 0, 0, 0, 1, 1, 0], dtype=torch.float64)

    def loss_fn(p, b):
        return ft.LossSum((((p["w"] - b[0]) ** 2) * b[1]).sum(), b[1].sum())

    tx = ft.sgd(0.1)
    step = ft.make_train_step(
        loss_fn,
        tx,
        micro_batches=3,
        grad_stats=ft.noise_scale_hook(),
        strategy=strategy,
        grad_backend=backend,
    )
    state = ft.TrainState.create(params={"w": torch.zeros((), dtype=torch.float64)}, tx=tx)
    _, m = step(state, (x, mask))
    assert all(bool(torch.isfinite(v)) for k, v in m.items() if k.startswith("noise_scale/"))


# ---------------------------------------------------------------- low-precision loss metrics


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("as_sum", [False, True])
@pytest.mark.parametrize("micro_batches", [1, 2, 8])
def test_a_bfloat16_loss_metric_is_rounded_once_whatever_the_split(strategy, as_sum, micro_batches):
    # Per-example losses 256, 1, 1, ...: a bfloat16 running sum drops every 1 (256 + 1 == 256),
    # so the metric was 32 with 8 micro-batches and 33 (the rounded true mean) with 1.
    batch = torch.tensor([256.0, 1, 1, 1, 1, 1, 1, 1])

    def loss_fn(p, b):
        per = (p["w"] * b).to(torch.bfloat16)
        loss = ft.LossSum(per.sum(), b.numel()) if as_sum else per.mean()
        aux = {"m": b.to(torch.bfloat16).mean(), "s": ft.LossSum(b.to(torch.bfloat16).sum(), 1)}
        return ft.LossOutput(loss, aux=aux)

    tx = ft.sgd(0.0)
    step = ft.make_train_step(
        loss_fn, tx, micro_batches=micro_batches, strategy=strategy, donate=False
    )
    state = ft.TrainState.create(params={"w": torch.tensor(1.0)}, tx=tx)
    _, m = step(state, batch)
    mean = torch.tensor(263 / 8, dtype=torch.float64).to(torch.bfloat16)
    assert m["loss"].dtype == torch.bfloat16 and m["loss"] == mean
    assert m["m"].dtype == torch.bfloat16 and m["m"] == mean
    # Σ totals / Σ counts = 263 / K in bfloat16, rounded once.
    sums = torch.tensor(263 / micro_batches, dtype=torch.float64).to(torch.bfloat16)
    assert m["s"] == sums
    evaluated = ft.make_eval_step(loss_fn, micro_batches=micro_batches)(state, batch)
    assert evaluated["loss"] == mean


def test_float16_loss_sums_do_not_overflow_when_the_mean_is_representable():
    # Eight micro-batch totals of 10000 each: 80000 overflows float16 (65504), the mean does not.
    batch = torch.full((8,), 10000.0)

    def loss_fn(p, b):
        return ft.LossSum((p["w"] * b.sum()).to(torch.float16), b.numel())

    tx = ft.sgd(0.0)
    step = ft.make_train_step(loss_fn, tx, micro_batches=8)
    _, m = step(ft.TrainState.create(params={"w": torch.tensor(1.0)}, tx=tx), batch)
    assert m["loss"].dtype == torch.float16 and float(m["loss"]) == 10000.0


# ---------------------------------------------------------------- micro-batch specifications


@pytest.mark.parametrize(
    "micro_batches",
    [torch.tensor(True), torch.tensor([True, True, True, True]), torch.tensor(2.0)],
    ids=["bool", "bool-sizes", "float-0d"],
)
def test_bool_and_float_tensors_are_not_micro_batch_counts(micro_batches):
    # torch.tensor(True) was read as K=1 and [True] * 4 as sizes (1, 1, 1, 1); a 0-d float
    # tensor failed with "iteration over a 0-d tensor".
    with pytest.raises(TypeError, match=r"micro_batches must be an int|sizes must be ints"):
        ft.split_batch(torch.zeros(4), micro_batches)


def test_integer_tensors_are_micro_batch_counts_and_sizes():
    assert ft.split_batch(torch.zeros(5), torch.tensor(2)).sizes == (3, 2)
    assert ft.split_batch(torch.zeros(5), torch.tensor([1, 4])).sizes == (1, 4)


@pytest.mark.parametrize("micro_batches", [{2: "a", 3: "b"}, {2, 3}], ids=["dict", "set"])
def test_unordered_containers_are_not_micro_batch_sizes(micro_batches):
    # A dict was split by its keys; a set's order is not the user's.
    with pytest.raises(TypeError, match="sequence of ints"):
        ft.split_batch(torch.zeros(5), micro_batches)


def test_an_empty_batch_is_named_as_such():
    with pytest.raises(ValueError, match="batch is empty"):
        ft.split_batch({"x": torch.zeros(0, 3)}, 1)


# ---------------------------------------------------------------- error messages


def _step_error(loss_fn, micro_batches=2):
    tx = ft.sgd(0.1)
    step = ft.make_train_step(loss_fn, tx, micro_batches=micro_batches)
    step(ft.TrainState.create(params={"w": torch.tensor(1.0)}, tx=tx), torch.arange(4.0))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: ft.LossSum(ft.LossSum(t, 1), 2), r"LossSum.total must be a 0-d tensor, got"),
        (lambda t: ft.LossOutput(ft.LossOutput(t)), r"LossOutput.loss must be a 0-d tensor or "),
        (lambda t: ft.LossOutput(t, aux={"a": 1.0}), r"aux\['a'\] must be a 0-d tensor or ft.L"),
    ],
    ids=["sum-in-sum", "output-in-output", "float-aux"],
)
def test_errors_do_not_suggest_what_cannot_stand_there(make, message):
    # Each said "must be a 0-d tensor, ft.LossSum or ft.LossOutput", including where the
    # value it refused was one of those.
    with pytest.raises(TypeError, match=message) as info:
        _step_error(lambda p, b: make((p["w"] * b).mean()))
    assert "LossOutput, got" not in str(info.value)


def test_an_aux_value_that_changes_kind_between_micro_batches_is_named():
    # The message read "['a'] vs ['a']" when one micro-batch returned a LossSum for "a".
    def loss_fn(p, b):
        value = (p["w"] * b).mean()
        aux = ft.LossSum(b.sum(), b.numel()) if b.shape[0] == 3 else b.mean()
        return ft.LossOutput(value, aux={"a": aux})

    with pytest.raises(ValueError, match=r"LossSum: \['a'\]\) vs \['a'\] \(LossSum: \[\]\)"):
        tx = ft.sgd(0.1)
        step = ft.make_train_step(loss_fn, tx, micro_batches=(3, 2))
        step(ft.TrainState.create(params={"w": torch.tensor(1.0)}, tx=tx), torch.arange(5.0))
