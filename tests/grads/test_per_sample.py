from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from grad_problems import cnn_problem, mlp_problem, naive_per_sample
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft
from functrain import tree
from functrain.testing import assert_trees_all_close, assert_trees_all_equal


def test_matches_naive_loop(problem):
    loss_fn, params, batch = problem
    expected = naive_per_sample(loss_fn, params, batch)
    got = ft.per_sample_grads(loss_fn, params, batch)
    assert_trees_all_close(got, expected, rtol=1e-10, atol=1e-12)


def test_mean_of_per_sample_grads_is_batch_grad(problem):
    loss_fn, params, batch = problem
    got = ft.per_sample_grads(loss_fn, params, batch)
    batch_grad = torch.func.grad(loss_fn)(params, batch)
    assert_trees_all_close(tree.map(lambda g: g.mean(0), got), batch_grad, rtol=1e-10, atol=1e-12)


@given(chunk_size=st.integers(1, 9))
def test_chunked_equals_unchunked(chunk_size):
    loss_fn, params, batch = mlp_problem(7)
    full = ft.per_sample_grads(loss_fn, params, batch)
    chunked = ft.per_sample_grads(loss_fn, params, batch, chunk_size=chunk_size)
    assert_trees_all_close(chunked, full, rtol=1e-12, atol=1e-14)


def test_value_and_grads_losses():
    loss_fn, params, batch = cnn_problem(5)
    losses, grads = ft.per_sample_value_and_grads(loss_fn, params, batch, chunk_size=2)
    expected = torch.stack(
        [loss_fn(params, tree.map(lambda x: x[i : i + 1], batch)) for i in range(5)]
    )
    assert_trees_all_close(losses, expected, rtol=1e-12)
    assert_trees_all_close(grads, ft.per_sample_grads(loss_fn, params, batch), rtol=1e-12)


def test_has_aux():
    params = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    batch = torch.tensor([[1.0, 2.0], [3.0, 1.0], [0.5, 0.5]], dtype=torch.float64)

    def loss_fn(p, x):
        out = x @ p["w"]
        return (out**2).mean(), {"out": out}

    (losses, aux), grads = ft.per_sample_value_and_grads(
        loss_fn, params, batch, has_aux=True, chunk_size=2
    )
    assert aux["out"].shape == (3, 1)
    assert_trees_all_close(aux["out"][:, 0], batch @ params["w"])
    assert_trees_all_close(losses, (batch @ params["w"]) ** 2)
    grads2, _ = ft.per_sample_grads(loss_fn, params, batch, has_aux=True)
    assert_trees_all_close(grads, grads2)
    assert_trees_all_close(grads["w"], 2 * (batch @ params["w"])[:, None] * batch)


def test_buffers_eval_batchnorm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(8, 2)
    ).double()
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    batch = {"x": torch.randn(5, 1, 4, 4, dtype=torch.float64), "y": torch.randint(0, 2, (5,))}

    def loss_fn(p, b, buffers):
        out = torch.func.functional_call(model, {**p, **buffers}, (b["x"],))
        return F.cross_entropy(out, b["y"])

    got = ft.per_sample_grads(loss_fn, params, batch, buffers=buffers, chunk_size=2)
    expected = naive_per_sample(loss_fn, params, batch, buffers=buffers)
    assert_trees_all_close(got, expected, rtol=1e-10, atol=1e-12)
    # Buffers are not modified.
    assert_trees_all_equal(buffers, {k: v.detach() for k, v in model.named_buffers()})


def test_randomness_modes():
    params = {"w": torch.ones(6, dtype=torch.float64)}
    batch = torch.ones(4, 6, dtype=torch.float64)

    def loss_fn(p, x):
        return F.dropout(x * p["w"], p=0.5, training=True).sum(-1).mean()

    with pytest.raises(RuntimeError, match="randomness"):
        ft.per_sample_grads(loss_fn, params, batch)
    torch.manual_seed(0)
    different = ft.per_sample_grads(loss_fn, params, batch, randomness="different")["w"]
    # Dropout gradient: 0 or 2 per coordinate; examples draw independently.
    assert set(different.unique().tolist()) <= {0.0, 2.0}
    assert not all(torch.equal(different[0], different[i]) for i in range(1, 4))
    same = ft.per_sample_grads(loss_fn, params, batch, randomness="same")["w"]
    for i in range(1, 4):
        assert torch.equal(same[0], same[i])


class Params(NamedTuple):
    w: torch.Tensor
    b: torch.Tensor


def test_namedtuple_params_and_tuple_batch():
    params = Params(
        torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    )
    batch = (torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64))

    def loss_fn(p: Params, b: Any) -> torch.Tensor:
        x, y = b
        return ((x @ p.w.T + p.b - y) ** 2).mean()

    got = ft.per_sample_grads(loss_fn, params, batch)
    assert isinstance(got, Params)
    assert_trees_all_close(got, naive_per_sample(loss_fn, params, batch), rtol=1e-12)


def test_float32_dtype_preserved():
    loss_fn, params, batch = mlp_problem(3)
    params = tree.cast(params, torch.float32)
    batch = {"x": batch["x"].float(), "y": batch["y"]}
    got = ft.per_sample_grads(loss_fn, params, batch)
    assert all(g.dtype == torch.float32 for g in tree.leaves(got))


def test_bad_inputs():
    params = {"w": torch.ones(2)}
    loss_fn = lambda p, b: (b["x"] @ p["w"]).mean()  # noqa: E731
    with pytest.raises(ValueError, match=r"batch\['y'\] has leading dimension 2"):
        ft.per_sample_grads(loss_fn, params, {"x": torch.ones(3, 2), "y": torch.ones(2)})
    with pytest.raises(ValueError, match="chunk_size"):
        ft.per_sample_grads(loss_fn, params, {"x": torch.ones(3, 2)}, chunk_size=0)
    with pytest.raises(ValueError, match="randomness"):
        ft.per_sample_grads(loss_fn, params, {"x": torch.ones(3, 2)}, randomness="other")
    with pytest.raises(ValueError, match="scalar mean loss"):
        ft.per_sample_grads(lambda p, b: b["x"] * p["w"], params, {"x": torch.ones(3, 2)})
    with pytest.raises(ValueError, match="leading batch dimension"):
        ft.per_sample_grads(loss_fn, params, {"x": torch.tensor(1.0)})


def test_chunks_cover_batch_in_order():
    loss_fn, params, batch = mlp_problem(7)
    chunks = list(ft.per_sample_chunks(loss_fn, params, batch, chunk_size=3))
    assert [(c.start, c.stop) for c in chunks] == [(0, 3), (3, 6), (6, 7)]
    assert all(tree.leaves(c.grads)[0].shape[0] == c.stop - c.start for c in chunks)


def test_loss_sum_and_loss_output_results():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, dtype=torch.float64, generator=g)}
    x = torch.randn(4, 5, 3, dtype=torch.float64, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    batch = {"x": x, "mask": mask}

    def token_loss(p, b):
        per_token = (b["x"] @ p["w"]) ** 2 * b["mask"]
        return ft.LossSum(per_token.sum(), b["mask"].sum())

    def example_mean(p, b):
        return ((b["x"] @ p["w"]) ** 2 * b["mask"]).sum() / b["mask"].sum()

    got = ft.per_sample_grads(token_loss, params, batch, chunk_size=3)
    assert_trees_all_close(got, naive_per_sample(example_mean, params, batch), rtol=1e-12)

    def with_output(p, b):
        out = b["x"] @ p["w"]
        return ft.LossOutput(example_mean(p, b), aux={"first": out[:, 0].mean()})

    grads, aux = ft.per_sample_grads(with_output, params, batch, has_aux=True)
    assert_trees_all_close(grads, got, rtol=1e-12)
    assert_trees_all_close(aux["first"], x[:, 0] @ params["w"], rtol=1e-12)
    assert_trees_all_close(ft.per_sample_grads(with_output, params, batch), got, rtol=1e-12)


def test_buffers_need_a_buffers_argument():
    with pytest.raises(TypeError, match="buffers"):
        ft.per_sample_grads(
            lambda p, b: (b @ p).mean(),
            torch.ones(2),
            torch.ones(3, 2),
            buffers={"m": torch.ones(1)},
        )
