"""Review of the faster ``"layers"`` routes at their edges, against naive per-example loops.

The routes under review: a one-channel float32 convolution's per-example weight gradients by
one grouped *forward* convolution (``_transposed_weight_grads``), 8+ input channels by one
grouped convolution backward (``_grouped_weight_grads``), symmetric padding passed to the
kernels, and ``F.cross_entropy`` of class indices once on the physical batch
(``cross_entropy_rows``). Each check compares every reduction (per-sample gradients, norms,
Gram matrix, clipped sum) with one autograd call per example in float64, and asserts which
route ran, so that a change of the routing conditions cannot hollow the check out.

Found by the review: one-channel 1-d kernels of 16+ taps with few output channels (audio
front ends) ran faster by the patches than by either grouped convolution (now routed there),
and a cross-entropy whose targets do not match its logits' rows raised the kernel's error with
the physical batch's sizes (now left to ``vmap``, which names the example's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from grad_problems import naive_per_sample
from torch import nn

import functrain as ft
from functrain import tree
from functrain.grads import _layer_dispatch, _layer_grads, _layer_rules

D = torch.float64


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _flat(grads: Any) -> torch.Tensor:
    return torch.cat([g.reshape(g.shape[0], -1) for g in tree.leaves(grads)], 1)


def _double(t: Any) -> Any:
    return tree.map(lambda x: x.double() if x.is_floating_point() else x, t)


@pytest.fixture
def routes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the calls of each per-example weight-gradient route and of the cross-entropy."""
    counts = {"transposed": 0, "grouped": 0, "patches": 0, "cross_entropy": 0}
    for module, name, key in (
        (_layer_grads, "_transposed_weight_grads", "transposed"),
        (_layer_grads, "_grouped_weight_grads", "grouped"),
        (_layer_grads, "_patches", "patches"),
        (_layer_rules, "cross_entropy_rows", "cross_entropy"),
    ):
        original = getattr(module, name)

        def spy(*args: Any, _original: Callable[..., Any] = original, _key: str = key) -> Any:
            counts[_key] += 1
            return _original(*args)

        monkeypatch.setattr(module, name, spy)
    return counts


def _check(loss_fn: Any, params: Any, batch: Any, *, rtol: float = 1e-4) -> None:
    """Every ``"layers"`` reduction of ``params``/``batch`` (float32 or float64) against the
    naive float64 loop, relative to the largest reference entry (float32 sums of products)."""
    reference = _flat(naive_per_sample(loss_fn, _double(params), _double(batch)))
    scale = max(float(reference.abs().max()), 1e-30)
    tol = dict(rtol=rtol, atol=rtol * scale)
    got = _flat(ft.per_sample_grads(loss_fn, params, batch, method="layers"))
    torch.testing.assert_close(got.double(), reference, **tol)
    norms = ft.per_sample_grad_norms(loss_fn, params, batch, method="layers").global_norm
    torch.testing.assert_close(norms.double(), reference.norm(dim=1), **tol)
    gram = ft.per_sample_gram(loss_fn, params, batch, method="layers").double()
    expected = reference @ reference.T
    torch.testing.assert_close(gram, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))
    clip = 0.5 * float(reference.norm(dim=1).median())
    factors = (clip / reference.norm(dim=1)).clamp(max=1.0)
    summed = ft.clipped_grad_sum(loss_fn, params, batch, clip, method="layers").grad_sum
    torch.testing.assert_close(
        _flat(tree.map(lambda t: t[None], summed))[0].double(), factors @ reference, **tol
    )


def _conv(cin: int, kernel: tuple[int, ...] = (3, 3), cout: int = 8, seed: int = 0) -> Any:
    return {
        "w": _randn(cout, cin, *kernel, seed=seed + 1) / cin,
        "b": _randn(cout, seed=seed + 2),
    }


CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}  # by the weight's dimensions


def _conv_loss(**options: Any) -> Callable[..., torch.Tensor]:
    def loss_fn(p: Any, x: torch.Tensor) -> torch.Tensor:
        return CONV[p["w"].dim()](x, p["w"], p.get("b"), **options).tanh().square().mean()

    return loss_fn


# --- the convolution routes at their edges --------------------------------------------------


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextlib.contextmanager
def _without_onednn() -> Iterator[None]:
    # Not ``torch.backends.mkldnn.flags(enabled=False)``: it also sets oneDNN's TF32 flag,
    # which warns on builds without Intel GPU support.
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


SETTINGS: dict[str, Callable[[], Any]] = {
    "deterministic": _deterministic,
    "oneDNN off": _without_onednn,
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("cin", [1, 8])
def test_global_settings(setting: str, cin: int, routes: dict[str, int]) -> None:
    """Deterministic algorithms and oneDNN switched off: the routes stay exact (without
    oneDNN the one-channel layer moves from the transposed to the grouped route)."""
    # 8 outputs: float32 grouped convolutions need multiples of 8 channels (see _grouped_pays).
    params, x = _conv(cin, cout=3 if cin == 1 else 8), _randn(4, cin, 9, 8, seed=3)
    with SETTINGS[setting]():
        _check(_conv_loss(stride=2, padding=1), params, x)
    if cin == 8 or setting == "oneDNN off":
        assert routes["grouped"] and not routes["transposed"]
    else:
        assert routes["transposed"] and not routes["grouped"]


LAYOUTS: dict[str, Callable[[Any, torch.Tensor], tuple[Any, torch.Tensor]]] = {
    "channels_last input": lambda p, x: (p, x.to(memory_format=torch.channels_last)),
    "channels_last weight": lambda p, x: (
        {**p, "w": p["w"].to(memory_format=torch.channels_last)},
        x,
    ),
    "both channels_last": lambda p, x: (
        {**p, "w": p["w"].to(memory_format=torch.channels_last)},
        x.to(memory_format=torch.channels_last),
    ),
    "sliced batch": lambda p, x: (p, torch.cat([x, x.flip(0)])[::2]),
    "cropped view": lambda p, x: (p, F.pad(x, (2, 1, 1, 3))[:, :, 1:-3, 2:-1].flip(-1)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("cin", [1, 8])
def test_memory_layouts_and_views(layout: str, rows: int, cin: int, routes: Any) -> None:
    params, x = LAYOUTS[layout](_conv(cin), _randn(rows, cin, 7, 8, seed=4))
    _check(_conv_loss(stride=(2, 1), padding=1), params, x)
    assert routes["transposed" if cin == 1 else "grouped"]
    grads = ft.per_sample_grads(_conv_loss(padding=1), params, x, method="layers")
    assert grads["w"].is_contiguous()


@pytest.mark.parametrize("cin", [1, 8])
def test_inputs_the_same_for_every_example(cin: int, routes: dict[str, int]) -> None:
    """A constant image (expanded to the batch below ``vmap``) and an image broadcast over the
    channels (a stride-0 dimension inside each example)."""
    params = _conv(cin)
    image = _randn(1, cin, 7, 6, seed=5)
    gray = _randn(4, 1, 7, 6, seed=6)

    def constant(p: Any, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(image.to(p["w"].dtype), p["w"], p["b"], padding=1)
        return (out.tanh() * x.sum()).square().mean()

    def broadcast(p: Any, x: torch.Tensor) -> torch.Tensor:
        expanded = x.expand(-1, cin, -1, -1)
        return F.conv2d(expanded, p["w"], p["b"], stride=2).tanh().square().mean()

    _check(constant, params, gray)
    _check(broadcast, params, gray)
    assert routes["transposed" if cin == 1 else "grouped"]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kernel", [(2, 2), (4, 3), (2, 5)])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("cin", [1, 8])
def test_same_padding_of_even_kernels(kernel: Any, dilation: int, cin: int, routes: Any) -> None:
    """``padding="same"`` pads the far side more for an even span (an ``F.pad`` first)."""
    _check(_conv_loss(padding="same", dilation=dilation), _conv(cin, kernel), _randn(3, cin, 7, 6))
    assert routes["grouped"] or routes["transposed"]


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
@pytest.mark.parametrize("cin", [1, 8])
def test_padding_modes_of_modules(mode: str, cin: int, routes: dict[str, int]) -> None:
    """``nn.Conv2d/1d(padding_mode=...)`` pad by ``F.pad`` and convolve with ``padding=0``:
    the rule sees the padded input, its gradient flows through ``F.pad``."""
    torch.manual_seed(0)
    for module, x in (
        (nn.Conv2d(cin, 8, 3, stride=(2, 1), padding=(1, 2), padding_mode=mode), (4, cin, 7, 6)),
        (nn.Conv1d(cin, 8, 4, padding=2, padding_mode=mode), (4, cin, 9)),
    ):
        params = {k: v.detach() for k, v in module.named_parameters()}

        def loss_fn(p: Any, x: torch.Tensor, module: nn.Module = module) -> torch.Tensor:
            return torch.func.functional_call(module, p, (x,)).tanh().square().mean()

        _check(loss_fn, params, _randn(*x, seed=7))
    assert routes["transposed" if cin == 1 else "grouped"] == 8  # 2 layers x 4 reductions


GEOMETRIES = {
    # (kernel, spatial, options)
    "stride larger than the kernel": ((2, 2), (11, 11), dict(stride=5)),
    "uneven strides larger than the kernel, padded": (
        (2, 2),
        (11, 9),
        dict(stride=(5, 3), padding=1),
    ),
    "one output position": ((3, 3), (3, 3), {}),
    "one output position, stride past the input": ((3, 3), (4, 5), dict(stride=7)),
    "padding wider than the kernel": ((2, 3), (4, 5), dict(padding=(3, 2), stride=2)),
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("cin", [1, 8])
def test_geometries(geometry: str, cin: int, routes: dict[str, int]) -> None:
    kernel, spatial, options = GEOMETRIES[geometry]
    _check(_conv_loss(**options), _conv(cin, kernel), _randn(4, cin, *spatial, seed=8))
    assert routes["transposed" if cin == 1 else "grouped"]


@pytest.mark.parametrize("cin", [1, 8])
def test_batch_of_257_and_no_bias(cin: int, routes: dict[str, int]) -> None:
    params = _conv(cin, (2, 2))
    _check(_conv_loss(stride=2), params, _randn(257, cin, 5, 4, seed=9))
    _check(_conv_loss(padding=1), {"w": params["w"]}, _randn(3, cin, 5, 4, seed=10))
    assert routes["transposed" if cin == 1 else "grouped"]


@pytest.mark.parametrize("cin", [1, 8])
def test_weights_tied_across_calls_and_frames(cin: int, routes: dict[str, int]) -> None:
    """One convolution used several times per example: twice in one forward (each call on
    ``N = 1``), on each frame of a clip in a Python loop, and on the clip's frames at once
    (``N = 3``, the patches)."""
    params = _conv(cin)
    clips = _randn(4, 3, cin, 6, 5, seed=11)  # 4 examples of 3 frames

    def twice(p: Any, x: torch.Tensor) -> torch.Tensor:
        a = F.conv2d(x[:, 0], p["w"], p["b"], padding=1).tanh()
        b = F.conv2d(x[:, 1].flip(-1), p["w"], p["b"], stride=2).tanh()
        return a.square().mean() + b.sum()

    def frame_loop(p: Any, x: torch.Tensor) -> torch.Tensor:
        frames = [F.conv2d(x[:, t], p["w"], p["b"], padding=1).tanh() for t in range(3)]
        return sum(f.square().mean() for f in frames) / 3

    def frames_at_once(p: Any, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x.flatten(0, 1), p["w"], p["b"], padding=1).tanh().square().mean()

    _check(twice, params, clips)
    _check(frame_loop, params, clips)
    fast = routes["transposed" if cin == 1 else "grouped"]
    assert fast
    before = routes["patches"]
    _check(frames_at_once, params, clips)
    assert routes["patches"] > before and routes["transposed" if cin == 1 else "grouped"] == fast


@pytest.mark.parametrize(
    "dims, cin, dtype, route",
    [
        (1, 1, torch.float32, "transposed"),
        (2, 1, torch.float64, "grouped"),  # float64: no oneDNN, 14x14 positions > 4x3 channels
        (3, 1, torch.float32, "grouped"),  # 3-d: not the transposed route
        (2, 8, torch.float64, "grouped"),
        (1, 16, torch.float32, "grouped"),
        (2, 1, torch.bfloat16, "patches"),  # half precision: neither grouped route
        (2, 8, torch.bfloat16, "patches"),
        (2, 8, torch.float16, "patches"),
    ],
)
def test_dtypes_take_the_documented_routes(
    dims: int, cin: int, dtype: torch.dtype, route: str, routes: dict[str, int]
) -> None:
    spatial = {1: (30,), 2: (14, 14), 3: (6, 5, 5)}[dims]
    params = _conv(cin, (3,) * dims)
    batch = _randn(3, cin, *spatial, seed=12)
    options = dict(padding=1)
    half = dtype in (torch.bfloat16, torch.float16)
    _check(
        _conv_loss(**options),
        tree.map(lambda t: t.to(dtype), params),
        batch.to(dtype),
        rtol={torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 3e-2),
    )
    assert routes[route]
    others = {"transposed", "grouped", "patches"} - {route}
    assert not any(routes[k] for k in others)
    if half:  # the half-precision route is the one it was before (patches), no worse
        assert routes["patches"]


@pytest.mark.parametrize(
    "cout, kernel, stride, dtype, route",
    [
        # The M5 audio CNN's first layer (1 -> 32, kernel 80, stride 4) on shorter clips: the
        # patches are runs of 80 samples, cheaper than either grouped convolution.
        (32, 80, 4, torch.float32, "patches"),
        (32, 16, 1, torch.float32, "patches"),
        (32, 80, 4, torch.float64, "patches"),  # not the one-channel grouped route either
        (128, 24, 4, torch.float32, "transposed"),  # many output channels
        (32, 15, 4, torch.float32, "transposed"),  # a short kernel
        (32, 15, 4, torch.float64, "grouped"),
    ],
)
def test_long_one_channel_kernels_take_the_patches(
    cout: int, kernel: int, stride: int, dtype: torch.dtype, route: str, routes: dict[str, int]
) -> None:
    params = tree.map(lambda t: t.to(dtype), _conv(1, (kernel,), cout))
    # 700+ output positions: over 4x the output channels (the one-channel grouped route's bar)
    batch = _randn(3, 1, 3000, seed=15, dtype=dtype)
    _check(_conv_loss(stride=stride), params, batch, rtol=1e-4 if dtype == torch.float32 else 1e-10)
    assert routes[route]
    assert not any(routes[k] for k in {"transposed", "grouped", "patches"} - {route})


def test_grouped_convolutions_take_their_rule() -> None:
    """A trained grouped weight (once refused) has a rule of its own (``_layer_grouped_conv``;
    its tests: test_layer_grouped_weight.py): every reduction, float32, against the loop."""
    params = {"w": _randn(4, 4, 3, 3, seed=13)}
    x = _randn(3, 8, 5, 5, seed=14)

    def loss_fn(p: Any, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, p["w"], groups=2).square().sum()

    _check(loss_fn, params, x)


def test_dp_sgd_step_of_a_cnn_equals_clipping_by_hand(
    monkeypatch: pytest.MonkeyPatch, routes: dict[str, int]
) -> None:
    """``make_train_step(per_example_clip=C)`` (noise off) on a float32 CNN whose layers take
    the transposed, grouped and patches routes: the float64 loop of clipped gradients."""
    monkeypatch.setattr(_layer_dispatch, "GHOST_BYTES", 0)  # the rules, not vmap(grad)
    clip, lr, expected = 0.05, 0.5, 6.0
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 4, 1),
        nn.Flatten(),
        nn.Linear(4 * 16, 3),
    )
    model, params, _ = ft.functionalize(net)

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        return F.cross_entropy(model(p, b["x"]), b["y"])

    tx = ft.chain(ft.dp_noisy_mean(clip, 0.0, expected_batch_size=expected, seed=0), ft.sgd(lr))
    step = ft.make_train_step(loss_fn, tx, micro_batches=2, per_example_clip=clip)
    state = ft.TrainState.create(params=params, tx=tx)
    reference = _double(params)
    for seed, n in enumerate([7, 1, 0, 5]):
        gen = torch.Generator().manual_seed(seed)
        batch = {"x": torch.randn(n, 1, 8, 8, generator=gen), "y": torch.randint(0, 3, (n,))}
        total = tree.map(torch.zeros_like, reference)
        if n:
            grads = naive_per_sample(loss_fn, reference, _double(batch))
            flat = _flat(grads)
            factors = (clip / flat.norm(dim=1)).clamp(max=1.0)
            total = tree.map(lambda g: torch.einsum("b,b...->...", factors, g), grads)
        reference = tree.map(lambda p, t: p - lr * t / expected, reference, total)
        state, _ = step(state, batch)
        ft.testing.assert_trees_all_close(_double(state.params), reference, rtol=1e-5, atol=1e-7)
    assert routes["transposed"] and routes["grouped"] and routes["patches"]


# --- cross-entropy on the physical batch ------------------------------------------------------

CLASSES = 4


def _classifier(rows: int = 5, tokens: int = 3, seed: int = 0) -> tuple[Any, Any]:
    """A linear classifier of ``tokens`` rows per example, float64."""
    params = {
        "w": _randn(CLASSES, 3, seed=seed, dtype=D),
        "b": _randn(CLASSES, seed=seed + 1, dtype=D),
    }
    gen = torch.Generator().manual_seed(seed + 2)
    batch = {
        "x": torch.randn(rows, tokens, 3, generator=gen, dtype=D),
        "y": torch.randint(0, CLASSES, (rows, tokens), generator=gen),
    }
    return params, batch


def _logits(p: Any, b: Any) -> torch.Tensor:
    return F.linear(b["x"].reshape(-1, 3), p["w"], p["b"])


def _own_calls(loss_fn: Any, params: Any, batch: Any, has_aux: bool = False) -> torch.Tensor:
    """Each example's loss by its own call (a batch of one)."""
    rows = tree.leaves(batch)[0].shape[0]
    losses = []
    for i in range(rows):
        out = loss_fn(params, tree.map(lambda t, i=i: t[i : i + 1], batch))
        losses.append(out[0] if has_aux else out)
    return torch.stack(losses)


def _ignore_example(batch: Any, index: int = -100) -> Any:
    y = batch["y"].clone()
    y[1] = index  # every row of example 1
    y[3, 0] = index
    return {**batch, "y": y}


def _inplace_none(p: Any, b: Any) -> torch.Tensor:
    losses = F.cross_entropy(_logits(p, b), b["y"].reshape(-1), reduction="none")
    losses.mul_(torch.arange(1.0, 1.0 + losses.shape[0], dtype=D))
    return losses.sum()


SHARED_LOGITS = _randn(3, CLASSES, seed=20, dtype=D)

CROSS_ENTROPIES: dict[str, tuple[Callable[..., Any], Callable[[Any], Any], bool]] = {
    # name: (loss_fn, batch transform, has_aux)
    "mean, rows per example": (
        lambda p, b: F.cross_entropy(_logits(p, b), b["y"].reshape(-1)),
        lambda b: b,
        False,
    ),
    "every target of one example ignored (mean: nan)": (
        lambda p, b: F.cross_entropy(_logits(p, b), b["y"].reshape(-1)),
        _ignore_example,
        False,
    ),
    "every target ignored, sum": (
        lambda p, b: F.cross_entropy(_logits(p, b), b["y"].reshape(-1), reduction="sum"),
        _ignore_example,
        False,
    ),
    "ignore_index 2 positional, none then in place": (
        lambda p, b: (
            F.cross_entropy(_logits(p, b), b["y"].reshape(-1), None, None, 2, None, "none")
            .mul_(2.0)
            .sum()
        ),
        lambda b: _ignore_example(b, 2),
        False,
    ),
    "reduction none, in place": (_inplace_none, lambda b: b, False),
    "module": (
        lambda p, b: nn.CrossEntropyLoss(ignore_index=1)(_logits(p, b), b["y"].reshape(-1)),
        lambda b: b,
        False,
    ),
    "twice": (
        lambda p, b: (
            F.cross_entropy(_logits(p, b), b["y"].reshape(-1))
            + F.cross_entropy(2 * _logits(p, b), b["y"].reshape(-1).flip(0), reduction="sum")
        ),
        lambda b: b,
        False,
    ),
    "has_aux": (
        lambda p, b: (
            F.cross_entropy(_logits(p, b), b["y"].reshape(-1)),
            {"logit_sum": _logits(p, b).sum()},
        ),
        lambda b: b,
        True,
    ),
    "constant logits, batched targets": (
        lambda p, b: F.cross_entropy(SHARED_LOGITS, b["y"].reshape(-1)) * _logits(p, b).sum(),
        lambda b: b,
        False,
    ),
    "batched logits, constant targets": (
        lambda p, b: F.cross_entropy(_logits(p, b), torch.tensor([0, 3, 1])),
        lambda b: b,
        False,
    ),
}


@pytest.mark.parametrize("name", list(CROSS_ENTROPIES))
def test_cross_entropy_rule_equals_own_calls(name: str, routes: dict[str, int]) -> None:
    loss_fn, transform, has_aux = CROSS_ENTROPIES[name]
    params, batch = _classifier()
    batch = transform(batch)
    values, grads = ft.per_sample_value_and_grads(
        loss_fn, params, batch, method="layers", has_aux=has_aux
    )
    assert routes["cross_entropy"]
    if has_aux:
        values = values[0]
    own = _own_calls(loss_fn, params, batch, has_aux)
    torch.testing.assert_close(values, own, rtol=1e-12, atol=1e-14, equal_nan=True)
    scalar = (lambda p, b: loss_fn(p, b)[0]) if has_aux else loss_fn
    reference = _flat(naive_per_sample(scalar, params, batch))
    torch.testing.assert_close(_flat(grads), reference, rtol=1e-12, atol=1e-14)
    if "nan" in name:  # the ignored example: a nan loss and zero gradients, as its own call
        assert values[1].isnan() and not values[[0, 2, 3, 4]].isnan().any()
        assert (_flat(grads)[1] == 0).all()


def _ce_of(targets: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        return F.cross_entropy(_logits(p, b), targets(b["y"].reshape(-1)))

    return loss_fn


def _ce_under_autocast(p: Any, b: Any) -> torch.Tensor:
    logits = _logits(p, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return F.cross_entropy(logits, b["y"].reshape(-1))


@pytest.mark.parametrize(
    "loss_fn, reference_fn",
    [(_ce_of(lambda y: y.int()), _ce_of(lambda y: y)), (_ce_under_autocast, _ce_under_autocast)],
    ids=["int32", "autocast"],
)
def test_cross_entropies_the_rule_leaves_to_vmap(
    loss_fn: Any, reference_fn: Any, routes: dict[str, int]
) -> None:
    """int32 class indices (which ``vmap``'s decomposition takes, a plain CPU call not) and a
    cross-entropy under ``torch.autocast``: ``vmap``'s own route, exact (the model's linear
    layer still takes its rule)."""
    params, batch = _classifier()
    values, grads = ft.per_sample_value_and_grads(loss_fn, params, batch, method="layers")
    assert not routes["cross_entropy"]
    reference = _flat(naive_per_sample(reference_fn, params, batch))
    torch.testing.assert_close(_flat(grads), reference, rtol=1e-12, atol=1e-14)
    own = _own_calls(reference_fn, params, batch)
    torch.testing.assert_close(values, own, rtol=1e-12, atol=0)


def test_cross_entropy_under_autocast_of_the_whole_loss_is_refused() -> None:
    params, batch = _classifier()

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(_logits(p, b), b["y"].reshape(-1))

    with pytest.raises(ValueError, match=r"params\['w'\] is used by linear under torch.autocast"):
        ft.per_sample_grads(loss_fn, params, batch, method="layers")


def test_cross_entropy_errors_name_an_example_s_sizes() -> None:
    """A bad target raises the error of the example's own call: the sizes of one example
    (3 logit rows, 2 targets), not those of the physical batch (15 and 10)."""
    params, batch = _classifier()

    def mismatched(p: Any, b: Any) -> torch.Tensor:
        return F.cross_entropy(_logits(p, b), b["y"].reshape(-1)[:2])

    with pytest.raises(
        ValueError, match=r"input batch_size \(3\) to match target batch_size \(2\)"
    ):
        mismatched(params, tree.map(lambda t: t[:1], batch))
    with pytest.raises(
        ValueError, match=r"input batch_size \(3\) to match target batch_size \(2\)"
    ):
        ft.per_sample_grads(mismatched, params, batch, method="layers")

    out_of_range = {**batch, "y": batch["y"].clone()}
    out_of_range["y"][2, 1] = CLASSES + 3
    loss_fn = CROSS_ENTROPIES["mean, rows per example"][0]
    with pytest.raises(IndexError, match=f"Target {CLASSES + 3} is out of bounds"):
        ft.per_sample_grads(loss_fn, params, out_of_range, method="layers")
