"""Edge cases of ft.losses found by an adversarial review against optax 0.2.8.

Integer labels of every width, empty batches and class axes, ``axis=()``, the multiclass
sparsemax loss's label indexing, masked (``-inf``) and huge scores, ties at ``epsilon``, CTC
under autocast and with masked classes, NT-Xent's memory, and each loss as a train step's or
per_sample_grads' loss, pure and without host reads. References: torch.nn.functional,
float64 closed forms and autograd loops (``tools/optax_losses_edges.py`` compares the same
edges with optax itself).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _loss_cases import CASES
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import functrain as ft

L = ft.losses
D = torch.float64
INF = math.inf


def _randn(*shape: int, seed: int = 0, scale: float = 1.0, dtype=D) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=D) * scale).to(dtype)


# -- integer labels: every integer dtype, empty batches, no classes ----------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8])
def test_integer_labels_of_any_integer_dtype_equal_torch_cross_entropy(dtype):
    logits, labels = _randn(6, 5), torch.tensor([0, 4, 2, 1, 3, 0])
    want = F.cross_entropy(logits, labels, reduction="none")
    for fn in (L.softmax_cross_entropy_with_integer_labels, L.multiclass_sparsemax_loss):
        got = fn(logits, labels.to(dtype))
        ref = fn(logits, labels) if fn is L.multiclass_sparsemax_loss else want
        torch.testing.assert_close(got, ref, rtol=1e-14, atol=1e-14)


def test_int8_negative_label_of_many_classes_counts_from_the_end():
    # -1 + 200 does not fit in int8: the index must be widened before the arithmetic.
    logits = _randn(2, 200)
    got = L.softmax_cross_entropy_with_integer_labels(
        logits, torch.tensor([-1, 5], dtype=torch.int8)
    )
    want = F.cross_entropy(logits, torch.tensor([199, 5]), reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize(
    ("shape", "axis", "batch"),
    [((0, 5), -1, (0,)), ((0, 3, 4), (1,), (0, 4)), ((0, 3, 4), (2, 1), (0,))],
)
def test_integer_labels_empty_batch_gives_empty_losses_and_gradients(shape, axis, batch):
    logits = torch.zeros(shape, dtype=D, requires_grad=True)
    where = torch.ones(shape, dtype=torch.bool)
    for kw in ({}, {"where": where}):
        out = L.softmax_cross_entropy_with_integer_labels(
            logits, torch.zeros(batch, dtype=torch.int64), axis=axis, **kw
        )
        assert out.shape == batch
        (grad,) = torch.autograd.grad(out.sum(), logits)
        assert grad.shape == shape


def test_no_class_is_an_error_naming_the_axis():
    with pytest.raises(ValueError, match=r"softmax_cross_entropy_with_integer_labels: .*no class"):
        L.softmax_cross_entropy_with_integer_labels(
            torch.zeros(4, 0), torch.zeros(4, dtype=torch.int64)
        )
    for fn in (L.multiclass_sparsemax_loss, L.multiclass_hinge_loss):
        with pytest.raises(ValueError, match=f"{fn.__name__}: scores have no class"):
            fn(torch.zeros(4, 0), torch.zeros(4, dtype=torch.int64))


def test_safe_softmax_cross_entropy_refuses_0d_logits():
    with pytest.raises(ValueError, match="safe_softmax_cross_entropy: logits must have a class"):
        L.safe_softmax_cross_entropy(torch.tensor(1.0), torch.tensor(1.0))


# -- axis=(): jax reduces nothing (torch.logsumexp(x, ()) would reduce everything) -------------


@pytest.mark.parametrize("name", ["softmax_cross_entropy", "poly_loss_cross_entropy"])
def test_empty_axis_makes_each_element_its_own_distribution(name):
    # log_softmax over no axis is x - x = 0: the cross entropy is 0 and poly adds ε·y·(1 - 1).
    logits = _randn(3, 4).requires_grad_(True)
    labels = torch.softmax(_randn(3, 4, seed=1), -1).requires_grad_(True)
    out = getattr(L, name)(logits, labels, axis=())
    assert out.shape == (3, 4)
    torch.testing.assert_close(out, torch.zeros(3, 4, dtype=D), rtol=0, atol=0)
    grads = torch.autograd.grad(out.sum(), (logits, labels))
    for g in grads:
        torch.testing.assert_close(g, torch.zeros(3, 4, dtype=D), rtol=0, atol=0)


def test_kept_logits_all_minus_inf_give_nan_like_jax_not_a_finite_gradient():
    # A slice whose included logits are all -inf has no distribution: NaN loss and gradient
    # (jax's log_softmax), while a slice that where leaves out entirely gets 0 and 0.
    logits = _randn(3, 4)
    logits[1] = -INF
    logits.requires_grad_(True)
    labels = F.one_hot(torch.tensor([0, 1, 2]), 4).to(D)
    where = torch.tensor([[True] * 4, [True] * 4, [False] * 4])
    out = L.softmax_cross_entropy(logits, labels, where=where)
    assert out[0].isfinite() and out[1].isnan() and out[2] == 0
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert grad[0].isfinite().all() and grad[1].isnan().all() and (grad[2] == 0).all()


def test_poly_where_of_lower_rank_is_an_error_naming_poly():
    logits, labels = _randn(2, 3, 4), torch.softmax(_randn(2, 3, 4, seed=1), -1)
    with pytest.raises(ValueError, match="poly_loss_cross_entropy: where expanded at axis"):
        L.poly_loss_cross_entropy(logits, labels, where=torch.ones(4, dtype=torch.bool))
    full = torch.ones(1, 1, 4, dtype=torch.bool)  # the logits' rank: fine
    torch.testing.assert_close(
        L.poly_loss_cross_entropy(logits, labels, where=full),
        L.poly_loss_cross_entropy(logits, labels),
    )


# -- multiclass sparsemax loss -------------------------------------------------------------------


def _sparsemax_ref(z: list[float]) -> list[float]:
    """The simplex projection by Martins & Astudillo's algorithm, in Python floats."""
    u = sorted(z, reverse=True)
    k = max(j for j in range(1, len(u) + 1) if 1 + j * u[j - 1] > sum(u[:j]))
    tau = (sum(u[:k]) - 1) / k
    return [max(x - tau, 0.0) for x in z]


def _sparsemax_loss_ref(z: list[float], label: int) -> tuple[float, list[float]]:
    """Closed form ``-z_y + ½ Σ_S (z_j² - τ²) + ½`` and its gradient ``sparsemax(z) - e_y``,
    with optax's indexing (negative labels count from the end, then clamped)."""
    n = len(z)
    y = min(max(label + n if label < 0 else label, 0), n - 1)
    p = _sparsemax_ref(z)
    support = [j for j in range(n) if p[j] > 0]
    tau = z[support[0]] - p[support[0]]
    loss = -z[y] + 0.5 * sum(z[j] ** 2 - tau**2 for j in support) + 0.5
    return loss, [p[j] - (j == y) for j in range(n)]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-20, 20, allow_nan=False), min_size=1, max_size=6),
    st.integers(-12, 12),
)
def test_multiclass_sparsemax_loss_closed_form_with_optax_label_indexing(values, label):
    scores = torch.tensor(values, dtype=D, requires_grad=True)
    out = L.multiclass_sparsemax_loss(scores, torch.tensor(label))
    (grad,) = torch.autograd.grad(out, scores)
    want, want_grad = _sparsemax_loss_ref(values, label)
    assert out.item() == pytest.approx(want, rel=1e-9, abs=1e-9)
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=D), rtol=1e-9, atol=1e-9)


def test_multiclass_sparsemax_loss_masked_scores_are_left_out():
    # -inf scores (a masked vocabulary) get probability 0: the loss of the kept classes alone.
    kept = [0.3, 1.2, -0.4]
    scores = torch.tensor([[0.3, -INF, 1.2, -0.4, -INF]] * 2, dtype=D, requires_grad=True)
    out = L.multiclass_sparsemax_loss(scores, torch.tensor([2, 1]))
    (grad,) = torch.autograd.grad(out[0], scores)
    want, want_grad = _sparsemax_loss_ref(kept, 1)
    assert out[0].item() == pytest.approx(want, rel=1e-12)
    torch.testing.assert_close(
        grad[0], torch.tensor([want_grad[0], 0, want_grad[1], want_grad[2], 0], dtype=D)
    )
    assert out[1].item() == INF  # the label is a masked class, as optax's


@pytest.mark.parametrize("dtype", [torch.float32, D])
def test_multiclass_sparsemax_loss_huge_scores(dtype):
    # Far-apart scores: sparsemax is the one-hot of the top score, the loss s_top - s_label
    # and its gradient e_top - e_label (the projection's support test must hold at k = 1).
    scores = torch.tensor([[1e30, -2e30, 3e30, 0.0], [4e30, 1e30, -1e30, 2e30]], dtype=dtype)
    scores.requires_grad_(True)
    labels = torch.tensor([0, 0])
    out = L.multiclass_sparsemax_loss(scores, labels)
    torch.testing.assert_close(out, torch.tensor([2e30, 0.0], dtype=dtype))
    (grad,) = torch.autograd.grad(out.sum(), scores)
    want = torch.tensor([[-1.0, 0, 1, 0], [0, 0, 0, 0]], dtype=dtype)
    torch.testing.assert_close(grad, want, rtol=0, atol=0)


# Forward-mode AD's first use imports torch's jvp decompositions, which call torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_multiclass_sparsemax_forward_mode_equals_reverse_mode():
    scores, labels = _randn(4, 6, scale=2.0), torch.tensor([0, 5, -1, 2])
    scores[0, :3] = torch.tensor([1.0, 0.0, 0.0], dtype=D)  # entries on the support's edge

    def total(s: torch.Tensor) -> torch.Tensor:
        return L.multiclass_sparsemax_loss(s, labels).sum()

    rev = torch.func.jacrev(total)(scores)
    fwd = torch.func.jacfwd(total)(scores)
    torch.testing.assert_close(fwd, rev, rtol=1e-12, atol=1e-12)


# -- cosine similarity: a squared norm equal to epsilon (jnp.clip's tie) -----------------------


def test_cosine_squared_norm_at_epsilon_gets_half_the_clip_gradient():
    # f(a) = ⟨a, b⟩ / (sqrt(max(‖a‖², ε)) ‖b‖) at ‖a‖² = ε = 1, a = (1, 0), b = (3, 4):
    # max's tie passes half the gradient: ∂f/∂a = b/‖b‖ - ⟨a, b/‖b‖⟩ · ½ · a = (0.3, 0.8).
    a = torch.tensor([1.0, 0.0], dtype=D, requires_grad=True)
    b = torch.tensor([3.0, 4.0], dtype=D)
    out = L.cosine_similarity(a, b, epsilon=1.0)
    (grad,) = torch.autograd.grad(out, a)
    torch.testing.assert_close(grad, torch.tensor([0.3, 0.8], dtype=D))


# -- CTC: a gather, not a one-hot matmul --------------------------------------------------------


def _ctc_inputs(seed: int = 0):
    logits = _randn(3, 30, 12, seed=seed, scale=3.0, dtype=torch.float32)
    labels = torch.randint(1, 12, (3, 8), generator=torch.Generator().manual_seed(seed))
    label_pad = torch.zeros(3, 8)
    label_pad[1, 5:] = 1.0
    logit_pad = torch.zeros(3, 30)
    logit_pad[2, 24:] = 1.0
    return logits, logit_pad, labels, label_pad


def _torch_ctc(logits, logit_pad, labels, label_pad):
    lengths = (1 - logit_pad).sum(1).long()
    target_lengths = (1 - label_pad).sum(1).long()
    return F.ctc_loss(
        logits.double().log_softmax(-1).transpose(0, 1), labels, lengths, target_lengths,
        reduction="none",
    )  # fmt: skip


def test_ctc_under_autocast_is_computed_in_float32():
    logits, logit_pad, labels, label_pad = _ctc_inputs()
    want = _torch_ctc(logits, logit_pad, labels, label_pad).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = L.ctc_loss(logits, logit_pad, labels, label_pad)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-4)


def test_ctc_minus_inf_logits_of_classes_not_in_the_labels():
    logits, logit_pad, labels, label_pad = _ctc_inputs(1)
    logits = logits.double()
    labels = torch.where(labels == 7, 3, labels)
    logits[..., 7] = -INF  # a masked class that no label (nor padding) uses
    logits.requires_grad_(True)
    got = L.ctc_loss(logits, logit_pad, labels, label_pad)
    torch.testing.assert_close(got, _torch_ctc(logits.detach(), logit_pad, labels, label_pad))
    (grad,) = torch.autograd.grad(got.sum(), logits)
    assert grad.isfinite().all()


# -- NT-Xent: similarities by a matmul (no [B, B, F] tensor), in float32 under autocast --------


class _Largest(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_ntxent_memory_is_quadratic_in_the_batch_not_times_the_features():
    b, f = 32, 64
    emb = _randn(b, f, dtype=torch.float32).requires_grad_(True)
    labels = torch.arange(b) // 2
    with _Largest() as mode:
        loss = L.ntxent(emb, labels)
        torch.autograd.grad(loss, emb)
    assert mode.numel <= 2 * b * b + b * f  # the old elementwise product held b * b * f
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = L.ntxent(emb, labels)
    ref = L.ntxent(emb.double(), labels)
    torch.testing.assert_close(under.double(), ref, rtol=1e-5, atol=1e-5)


# -- the documented equivalences with torch.nn.functional --------------------------------------


def test_documented_torch_equivalences():
    a, b = _randn(5, 3), _randn(5, 3, seed=1)
    e = torch.linspace(-3, 3, 13, dtype=D)
    torch.testing.assert_close(  # smooth_l1_loss is huber / δ (its beta)
        L.huber_loss(e, delta=0.7) / 0.7, F.smooth_l1_loss(e, 0 * e, beta=0.7, reduction="none")
    )
    torch.testing.assert_close(  # torch's eps bounds each norm: ours bounds its square
        L.cosine_similarity(a * 1e-6, b, epsilon=1e-10),
        F.cosine_similarity(a * 1e-6, b, dim=-1, eps=1e-5),
    )
    torch.testing.assert_close(  # CosineEmbeddingLoss with target 1, up to its 1e-12
        L.cosine_distance(a, b), F.cosine_embedding_loss(a, b, torch.ones(5), reduction="none"),
        rtol=1e-10, atol=1e-10,
    )  # fmt: skip
    lp, lt = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    torch.testing.assert_close(
        L.kl_divergence_with_log_targets(lp, lt),
        F.kl_div(lp, lt, log_target=True, reduction="none").sum(-1),
    )
    t = lt.exp().clone()
    t[:, 1] = 0.0
    torch.testing.assert_close(
        L.kl_divergence(lp, t).sum() / 5, F.kl_div(lp, t, reduction="batchmean")
    )
    s, y = _randn(5, 4), torch.tensor([0, 3, 1, 1, 2])
    ww = torch.stack(
        [
            sum((1 - s[i, y[i]] + s[i, j]).clamp_min(0) for j in range(4) if j != y[i])
            for i in range(5)
        ]
    )
    torch.testing.assert_close(F.multi_margin_loss(s, y, reduction="none"), ww / 4)  # per class
    worst = torch.stack(
        [max((s[i, j] + 1 - float(j == y[i])) for j in range(4)) - s[i, y[i]] for i in range(5)]
    )
    torch.testing.assert_close(L.multiclass_hinge_loss(s, y), worst)


# -- as a train step's loss and per_sample_grads' loss (masked vocabulary, LossSum) ------------

_V = 7
_VOCAB = torch.tensor([True, True, True, False, True, True, True])  # class 3 masked: -inf


def _model_loss(params, batch):
    h = F.embedding(batch["x"], params["emb"])
    logits = torch.where(_VOCAB, F.linear(h, params["w"], params["b"]), -INF)
    where = _VOCAB & batch["m"][..., None]  # masked vocabulary and padding tokens
    per_token = L.softmax_cross_entropy_with_integer_labels(logits, batch["y"], where=where)
    return ft.LossSum(per_token.sum(), batch["m"].sum())


def _problem():
    g = torch.Generator().manual_seed(3)
    params = {k: torch.randn(*s, generator=g, dtype=D) for k, s in
              {"emb": (_V, 4), "w": (_V, 4), "b": (_V,)}.items()}  # fmt: skip
    y = torch.randint(0, _V, (6, 5), generator=g)
    m = torch.rand(6, 5, generator=g) > 0.3
    m[2] = False  # one example all padding
    batch = {"x": torch.randint(0, _V, (6, 5), generator=g), "y": torch.where(y == 3, 0, y), "m": m}
    return params, batch


def _grad(params, batch, mean_of_counts: bool):
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    s = _model_loss(p, batch)
    count = s.count if mean_of_counts else s.count.clamp_min(1)
    return torch.autograd.grad(s.total / count, list(p.values()))


@pytest.mark.parametrize("method", ["auto", "layers", "vmap"])
def test_per_sample_grads_of_a_masked_token_loss(method):
    params, batch = _problem()
    got = ft.per_sample_grads(_model_loss, params, batch, method=method)
    for i in range(6):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        for k, want in zip(params, _grad(params, one, mean_of_counts=False)):
            torch.testing.assert_close(got[k][i], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_train_step_with_a_masked_token_loss_gives_the_batch_gradient(strategy):
    params, batch = _problem()
    tx = ft.sgd(1.0)
    step = ft.make_train_step(_model_loss, tx, micro_batches=3, strategy=strategy, donate=False)
    new, metrics = step(ft.TrainState.create(params=params, tx=tx), batch)
    for k, want in zip(params, _grad(params, batch, mean_of_counts=True)):
        torch.testing.assert_close(params[k] - new.params[k], want, rtol=1e-12, atol=1e-12)
    assert metrics["loss"].isfinite()


# -- purity and host reads -----------------------------------------------------------------------


class _Strict(TorchDispatchMode):
    """Fails on a read back to the host, or on an in-place op on one of ``inputs``."""

    def __init__(self, inputs) -> None:
        super().__init__()
        self.ids = {id(t) for t in inputs}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            raise AssertionError(f"host read: {func}")
        if func._schema.is_mutable:
            hit = [a for a in (*args, *kwargs.values()) if id(a) in self.ids]
            assert not hit, f"{func} writes an input"
        return func(*args, **kwargs)


_EDGES = {
    "int8 labels, where": lambda: (
        lambda x, y: L.softmax_cross_entropy_with_integer_labels(x, y, where=_VOCAB[None, :5]),
        (_randn(3, 5), torch.tensor([-1, 2, 9], dtype=torch.int8)),
    ),
    "tuple axis, transposed": lambda: (
        lambda x, y: L.softmax_cross_entropy_with_integer_labels(x, y, axis=(0, 2)),
        (_randn(4, 3, 2).transpose(0, 1), torch.tensor([0, 5, 3, -2])),
    ),
    "sparsemax uint8 labels, -inf": lambda: (
        L.multiclass_sparsemax_loss,
        (torch.where(_VOCAB, _randn(2, 7), -INF), torch.tensor([1, 200], dtype=torch.uint8)),
    ),
    "masked softmax, expanded labels": lambda: (
        lambda x, y: L.softmax_cross_entropy(x, y, where=_VOCAB[None]),
        (_randn(2, 7), torch.softmax(_randn(7), -1).expand(2, 7)),
    ),
}


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("name", sorted(CASES) + sorted(_EDGES))
def test_no_loss_reads_the_host_or_writes_its_inputs(name, autocast):
    fn, args = CASES[name](0, torch.float32) if name in CASES else _EDGES[name]()
    args = tuple(a.requires_grad_(True) if a.dtype.is_floating_point else a for a in args)
    before = [a.detach().clone() for a in args]
    with _Strict(args), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*args)
        total = sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,)))
        torch.autograd.grad(total, [a for a in args if a.requires_grad], allow_unused=True)
    for b, a in zip(before, args):
        assert a.dtype == b.dtype and torch.equal(a.detach(), b)
