"""Checks of docs/migration/from-opacus.md against Opacus itself (1.6 in the dev venv).

Every test names the claim of the page it checks. The references are Opacus' own
``PrivacyEngine``, ``DPOptimizer``, ``GradSampleModule``, ``BatchMemoryManager`` and
accountants, run on the same data and the same Poisson batches as functrain, in float64; a
few also use a naive loop of ``torch.autograd.grad`` over single examples.

Opacus divides by ``‖g‖ + 1e-6`` when it clips. Where a test compares whole runs to 1e-10, its
data give every example a gradient norm either well below ``C`` (factor exactly 1 in both) or
near 1e5 (factor ``C/‖g‖`` to 1e-11 relative in Opacus), so the comparison checks everything
else; the 1e-6 itself is checked on ordinary data by its own test.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import functrain as ft

opacus = pytest.importorskip("opacus")

from opacus import GradSampleModule, PrivacyEngine  # noqa: E402
from opacus.accountants import PRVAccountant as OpacusPRV  # noqa: E402
from opacus.accountants import RDPAccountant as OpacusRDP  # noqa: E402
from opacus.grad_sample import GradSampleModuleExpandedWeights  # noqa: E402
from opacus.utils.batch_memory_manager import BatchMemoryManager  # noqa: E402
from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

# Opacus' advice (not errors): the insecure default RNG, its module hooks firing on inputs that
# need no gradient, and its RDP search reaching the largest order.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
]

F64 = torch.float64
N, E, C, LR = 60, 6, 5.0, 0.1  # 60 examples, loader batch 6: sample rate 0.1, E[batch] = 6
DELTA = 1e-5


def _outlier_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Regression data: small residuals (gradient norms ≈ 0.1, never clipped at C = 5) and, on
    every fourth example, a target of ±1e5 (norms ≈ 1e5, always clipped)."""
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(N, 5, generator=g, dtype=F64)
    y = 0.1 * torch.randn(N, generator=g, dtype=F64)
    y[::4] = 1e5 * torch.randn(N // 4, generator=g, dtype=F64).sign()
    return x, y


def _regressor() -> torch.nn.Module:
    """The same initial MLP at every call. Its output is ``(B,)``: Opacus' ghost criterion needs
    one loss per example."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1), torch.nn.Flatten(0)]
    return torch.nn.Sequential(*layers).to(F64)


def _poisson_batches() -> list[list[int]]:
    """One epoch of functrain's Poisson batches (q = 0.1), with an empty one as the 4th step
    (a draw Poisson sampling can make; Opacus' collate needs a non-empty first batch)."""
    sampler = ft.PoissonSampler(N, E / N, generator=torch.Generator().manual_seed(1))
    batches = list(sampler)
    batches.insert(3, [])
    assert batches[0] and len({len(b) for b in batches}) > 3  # sizes vary
    return batches


def _make_private(net: torch.nn.Module, data: TensorDataset, *, accountant: str = "rdp", **kw):
    """``PrivacyEngine(accountant).make_private(...)`` with SGD, a loader of batch ``E`` and
    Poisson sampling; returns the engine, module, optimizer, criterion and loader."""
    engine = PrivacyEngine(accountant=accountant)
    kw = {"noise_multiplier": 0.0, "max_grad_norm": C, **kw}
    criterion = torch.nn.MSELoss()
    out = engine.make_private(
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=LR),
        data_loader=DataLoader(data, batch_size=E),
        poisson_sampling=True,
        **({"criterion": criterion} if kw.get("grad_sample_mode") == "ghost" else {}),
        **kw,
    )
    if len(out) == 4:  # ghost: the criterion comes back wrapped
        module, optimizer, criterion, loader = out
    else:
        module, optimizer, loader = out
    return engine, module, optimizer, criterion, loader


def _opacus_train(batches, *, physical: int | None = None, sigma: float = 0.0, **kw):
    """An Opacus DP-SGD run over ``batches`` (index lists, fed through a DataLoader with
    Opacus' own empty-batch collate); with ``physical``, inside a ``BatchMemoryManager``."""
    x, y = _outlier_data()
    data = TensorDataset(x, y)
    net = _regressor()
    engine, module, optimizer, criterion, dp_loader = _make_private(
        net, data, noise_multiplier=sigma, **kw
    )
    loader = DataLoader(data, batch_sampler=batches, collate_fn=dp_loader.collate_fn)
    if physical is not None:
        loader = BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer
        ).__enter__()
    for xb, yb in loader:
        optimizer.zero_grad()
        criterion(module(xb), yb).backward()
        optimizer.step()
    return {k: v.detach() for k, v in net.named_parameters()}, engine


def _ft_train(batches, *, micro_batches: int = 1):
    """The functrain DP-SGD step over the same batches, without noise."""
    x, y = _outlier_data()
    model, params, _ = ft.functionalize(_regressor())

    def loss_fn(params, batch):
        return F.mse_loss(model(params, batch["x"]), batch["y"])

    tx = ft.chain(ft.dp_noisy_mean(C, 0.0, expected_batch_size=E, seed=0), ft.sgd(LR))
    step = ft.make_train_step(loss_fn, tx, per_example_clip=C, micro_batches=micro_batches)
    state = ft.TrainState.create(params=params, tx=tx)
    fractions = []
    for idx in batches:
        state, metrics = step(state, {"x": x[idx], "y": y[idx]})
        fractions.append(float(metrics["clipped_fraction"]))
    return state.params, fractions


def _assert_params_close(ours: dict, theirs: dict, atol: float) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=atol, msg=name)


# Claim: with the same Poisson batches and no noise, make_private + SGD and the functrain step
# give the same parameters, for Opacus' hooks, functorch and ghost modes (empty batch included).
@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_dp_sgd_loop_matches_make_private_without_noise(mode: str) -> None:
    batches = _poisson_batches()
    ours, fractions = _ft_train(batches)
    theirs, _ = _opacus_train(batches, grad_sample_mode=mode)
    # Both kinds of examples occur: clipped ones and unclipped ones.
    assert any(0 < f < 1 for f in fractions), fractions
    _assert_params_close(ours, theirs, atol=1e-10)
    assert max((ours[k] - _regressor().state_dict()[k]).abs().max() for k in ours) > 1e-3


# Claim: BatchMemoryManager's virtual steps are micro_batches=K: the same parameters, and the
# accountant counts one step per logical batch in both.
def test_virtual_steps_match_micro_batches() -> None:
    batches = _poisson_batches()
    assert max(len(b) for b in batches) > 3  # some logical batches are split
    ours, _ = _ft_train(batches, micro_batches=3)
    theirs, engine = _opacus_train(batches, physical=3)
    _assert_params_close(ours, theirs, atol=1e-10)
    assert engine.accountant.history == [(0.0, E / N, len(batches))]


# Claim: grad_sample_mode="ew" raises on an empty batch; the hooks modes and functrain take it.
def test_expanded_weights_refuses_an_empty_batch() -> None:
    with pytest.raises(RuntimeError, match="Batch size must be positive"):
        _opacus_train(_poisson_batches(), grad_sample_mode="ew")


# Claim: Opacus clips with C / (‖g‖ + 1e-6), functrain with C / ‖g‖: on ordinary data one
# step's updates differ by exactly lr/B · Σᵢ C (1/(‖gᵢ‖ + 1e-6) − 1/‖gᵢ‖) gᵢ.
def test_opacus_clip_factor_has_1e6_in_the_denominator() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(N, 5, generator=g, dtype=F64), torch.randn(N, generator=g, dtype=F64)
    idx, clip = list(range(E)), 0.02
    net = _regressor()
    start = {k: v.detach().clone() for k, v in net.named_parameters()}
    # Reference per-example gradients: one autograd call per example.
    ref = copy.deepcopy(net)
    per_example = [
        torch.autograd.grad(F.mse_loss(ref(x[i : i + 1]), y[i : i + 1]), list(ref.parameters()))
        for i in idx
    ]
    norms = [torch.sqrt(sum((t**2).sum() for t in gi)) for gi in per_example]
    assert min(norms) > 2 * clip  # every example clipped

    _, module, optimizer, criterion, _ = _make_private(net, TensorDataset(x, y), max_grad_norm=clip)
    optimizer.zero_grad()
    criterion(module(x[idx]), y[idx]).backward()
    optimizer.step()

    model, params, _ = ft.functionalize(_regressor())
    tx = ft.chain(ft.dp_noisy_mean(clip, 0.0, expected_batch_size=E, seed=0), ft.sgd(LR))
    step = ft.make_train_step(
        lambda p, b: F.mse_loss(model(p, b["x"]), b["y"]), tx, per_example_clip=clip
    )
    state, _ = step(ft.TrainState.create(params=params, tx=tx), {"x": x[idx], "y": y[idx]})

    for j, (name, p) in enumerate(net.named_parameters()):
        factor_gap = [clip / (n + 1e-6) - clip / n for n in norms]
        predicted = -LR / E * sum(f * gi[j] for f, gi in zip(factor_gap, per_example))
        actual = (p.detach() - start[name]) - (state.params[name] - start[name])
        assert predicted.abs().max() > 1e-11  # far above rounding, and explained exactly:
        torch.testing.assert_close(actual, predicted, rtol=0, atol=1e-15)


# Claim: the noise of one step has per-coordinate std σ·C/E with E the *expected* batch size
# (not the realized one) in both libraries, on a full batch and on an empty one.
@pytest.mark.parametrize("size", [12, 0])
def test_noise_std_is_sigma_c_over_expected_batch_size(size: int) -> None:
    sigma, clip, seeds, lr = 1.3, 0.7, range(20), 1.0
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(N, 40, generator=g, dtype=F64), torch.randn(N, 25, generator=g, dtype=F64)
    idx = list(range(size))
    batch = {"x": x[idx], "y": y[idx]}

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Linear(40, 25).to(F64)

    # Opacus: noise = update(σ) − update(0), per seed of the optimizer's generator.
    net = fresh()
    start = [p.detach().clone() for p in net.parameters()]
    _, module, optimizer, criterion, _ = _make_private(
        net, TensorDataset(x, y), noise_multiplier=sigma, max_grad_norm=clip
    )
    optimizer.param_groups[0]["lr"] = lr

    def opacus_update(noise: float, seed: int) -> torch.Tensor:
        with torch.no_grad():
            for p, p0 in zip(net.parameters(), start):
                p.copy_(p0)
        optimizer.noise_multiplier = noise
        optimizer.generator = torch.Generator().manual_seed(seed)
        optimizer.zero_grad()
        criterion(module(batch["x"]), batch["y"]).backward()
        optimizer.step()
        return torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(net.parameters(), start)])

    clean = opacus_update(0.0, 0)
    theirs = torch.cat([opacus_update(sigma, s) - clean for s in seeds])

    # functrain: the same difference, per seed of dp_noisy_mean.
    model, params, _ = ft.functionalize(fresh())

    def loss_fn(params, batch):
        return F.mse_loss(model(params, batch["x"]), batch["y"])

    def ft_update(noise: float, seed: int) -> torch.Tensor:
        tx = ft.chain(ft.dp_noisy_mean(clip, noise, expected_batch_size=E, seed=seed), ft.sgd(lr))
        step = ft.make_train_step(loss_fn, tx, per_example_clip=clip)
        state, _ = step(ft.TrainState.create(params=params, tx=tx), batch)
        return torch.cat([(state.params[k] - params[k]).flatten() for k in params])

    clean = ft_update(0.0, 0)
    ours = torch.cat([ft_update(sigma, s) - clean for s in seeds])

    expected = lr * sigma * clip / E
    tolerance = 4 / math.sqrt(2 * ours.numel())  # 4 standard errors of a relative RMS
    for noise in (ours, theirs):
        rms = noise.pow(2).mean().sqrt()
        assert abs(rms / expected - 1) < tolerance, (rms, expected)
        if size:  # the realized size would be far outside the band
            assert abs(rms / (lr * sigma * clip / size) - 1) > 10 * tolerance


# Claim: privacy_engine.get_epsilon (PRV, the default, and RDP) equals functrain's accountant
# stepped once per step; Opacus' len() counts history entries, functrain's counts steps.
@pytest.mark.parametrize(
    ("name", "ours_cls"), [("prv", ft.PRVAccountant), ("rdp", ft.RDPAccountant)]
)
def test_epsilon_matches_privacy_engine(name: str, ours_cls: type) -> None:
    batches = _poisson_batches()
    _, engine = _opacus_train(batches, sigma=1.1, accountant=name)
    ours = ours_cls()
    for _ in batches:
        ours.step(noise_multiplier=1.1, sample_rate=E / N)
    assert ours.history == engine.accountant.history == [(1.1, E / N, len(batches))]
    for delta in (DELTA, 1e-3):
        assert ours.get_epsilon(delta) == pytest.approx(engine.get_epsilon(delta), abs=1e-6)
    assert len(engine.accountant) == 1 and len(ours) == len(batches)


# Claim: make_private_with_epsilon's σ is get_noise_multiplier(..., accountant=<the engine's>)
# for steps = int(epochs / sample_rate), to the tolerance of the two searches (ε within 0.01
# below the target, by either library's accountant).
@pytest.mark.parametrize("name", ["prv", "rdp"])
def test_make_private_with_epsilon_sigma(name: str) -> None:
    target, epochs = 2.0, 3
    x, y = _outlier_data()
    net = _regressor()
    _, optimizer, loader = PrivacyEngine(accountant=name).make_private_with_epsilon(
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=LR),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=E),
        target_epsilon=target,
        target_delta=DELTA,
        epochs=epochs,
        max_grad_norm=C,
    )
    q, steps = loader.sample_rate, int(epochs / loader.sample_rate)
    theirs = optimizer.noise_multiplier
    ours = ft.get_noise_multiplier(target, DELTA, q, steps, accountant=name)
    reference = {"prv": OpacusPRV, "rdp": OpacusRDP}[name]
    for sigma in (ours, theirs):
        for accountant in (reference(), {"prv": ft.PRVAccountant, "rdp": ft.RDPAccountant}[name]()):
            accountant.history = [(sigma, q, steps)]
            assert target - 0.01 - 1e-6 <= accountant.get_epsilon(DELTA) <= target + 1e-6
    assert ours == pytest.approx(theirs, rel=0.01)


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.LayerNorm(10), torch.nn.Tanh(), torch.nn.Linear(10, 3)
    ).to(F64)


def _cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 3, 2),
        torch.nn.Flatten(),
        torch.nn.Linear(12, 3),
    ).to(F64)


def _grouped_cnn() -> torch.nn.Module:
    """Depthwise (2 outputs per channel, strided) and grouped convolutions, then a linear head."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2),
        torch.nn.Tanh(),
        torch.nn.Conv2d(4, 6, 2, groups=2, dilation=2),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 2 * 2, 3),
    ).to(F64)


# Claim: GradSampleModule's p.grad_sample (hooks, functorch and ew modes) is per_sample_grads'
# result, by either route, on an MLP (linear, layer norm), a CNN and one of depthwise and grouped
# convolutions.
@pytest.mark.parametrize(
    ("make", "shape"),
    [(_mlp, (7, 6)), (_cnn, (7, 1, 8, 8)), (_grouped_cnn, (7, 2, 8, 8))],
    ids=["mlp", "cnn", "grouped-cnn"],
)
def test_grad_sample_equals_per_sample_grads(make, shape) -> None:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(shape, generator=g, dtype=F64), torch.randint(0, 3, (7,), generator=g)
    model, params, _ = ft.functionalize(make())

    def loss_fn(params, batch):
        return F.cross_entropy(model(params, batch["x"]), batch["y"])

    ours = {
        m: ft.per_sample_grads(loss_fn, params, {"x": x, "y": y}, method=m)
        for m in ("vmap", "layers")
    }
    for wrap in (
        GradSampleModule,
        lambda net: GradSampleModule(net, force_functorch=True),
        GradSampleModuleExpandedWeights,
    ):
        net = make()
        F.cross_entropy(wrap(net)(x), y).backward()
        for grads in ours.values():
            for name, p in net.named_parameters():
                torch.testing.assert_close(grads[name], p.grad_sample, rtol=0, atol=1e-12)


class _Text(torch.nn.Module):
    """Embedding, Conv1d and GroupNorm: Opacus has a hook for each, functrain rules for the
    first two only."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 6)
        self.conv = torch.nn.Conv1d(6, 4, 2)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(self.emb(tokens).transpose(1, 2)))
        return self.head(h.mean(dim=2))


def _then_head(layer: torch.nn.Module, width: int) -> torch.nn.Module:
    return torch.nn.Sequential(layer, torch.nn.Flatten(), torch.nn.Linear(width, 3))


# Claim: Opacus' hooks cover GroupNorm, InstanceNorm and RMSNorm, functrain's layer rules do not:
# method="layers" raises ValueError naming the parameter and the operation; "vmap" and "auto"
# give Opacus' per-sample gradients. (Grouped convolutions, once here, have a rule: see
# test_grad_sample_equals_per_sample_grads.)
@pytest.mark.parametrize(
    ("make", "op", "tokens"),
    [
        (_Text, "norm.weight'].*group_norm", True),
        (lambda: _then_head(torch.nn.InstanceNorm1d(4, affine=True), 24), "instance_norm", False),
        (lambda: _then_head(torch.nn.RMSNorm(6), 24), "rms_norm", False),
    ],
    ids=["group_norm", "instance_norm", "rms_norm"],
)
def test_layers_without_rules_go_to_vmap_and_match_grad_sample(make, op, tokens) -> None:
    torch.manual_seed(0)
    net = make().to(F64)
    model, params, _ = ft.functionalize(copy.deepcopy(net))
    g = torch.Generator().manual_seed(7)
    if tokens:
        x = torch.randint(0, 20, (7, 5), generator=g)
    else:
        x = torch.randn(7, 4, 6, generator=g, dtype=F64)
    batch = {"x": x, "y": torch.randint(0, 3, (7,), generator=g)}

    def loss_fn(params, batch):
        return F.cross_entropy(model(params, batch["x"]), batch["y"])

    F.cross_entropy(GradSampleModule(net)(batch["x"]), batch["y"]).backward()
    with pytest.raises(ValueError, match=f"method='layers': params.*{op}"):
        ft.per_sample_grads(loss_fn, params, batch, method="layers")
    for method in ("vmap", "auto"):
        grads = ft.per_sample_grads(loss_fn, params, batch, method=method)
        for name, p in net.named_parameters():
            torch.testing.assert_close(grads[name], p.grad_sample, rtol=0, atol=1e-12)


# Claim: an Opacus accountant's state_dict (its history) loads into functrain's accountants.
def test_opacus_accountant_state_dict_loads() -> None:
    theirs = OpacusPRV()
    for sigma, q in [(1.1, 0.1)] * 5 + [(0.9, 0.05)] * 3:
        theirs.step(noise_multiplier=sigma, sample_rate=q)
    for ours in (ft.PRVAccountant(), ft.RDPAccountant()):
        ours.load_state_dict(theirs.state_dict())
        assert ours.history == [(1.1, 0.1, 5), (0.9, 0.05, 3)] and len(ours) == 8
    ours = ft.PRVAccountant()
    ours.load_state_dict(theirs.state_dict())
    assert ours.get_epsilon(DELTA) == pytest.approx(theirs.get_epsilon(DELTA), abs=1e-6)


# Claim: per-layer clipping is clipping="per_layer" with max_grad_norm=[C/√K]*K: the same
# parameters without noise, and the same noise scale C = ‖[C/√K, ...]‖.
def test_per_layer_clipping_matches_opacus_per_layer() -> None:
    batches = _poisson_batches()
    k = len(list(_regressor().parameters()))
    theirs, _ = _opacus_train(batches, clipping="per_layer", max_grad_norm=[C / k**0.5] * k)

    x, y = _outlier_data()
    model, params, _ = ft.functionalize(_regressor())
    tx = ft.chain(ft.dp_noisy_mean(C, 0.0, expected_batch_size=E, seed=0), ft.sgd(LR))
    opt_state = tx.init(params)
    for idx in batches:
        grads = ft.per_sample_grads(
            lambda p, b: F.mse_loss(model(p, b["x"]), b["y"]), params, {"x": x[idx], "y": y[idx]}
        )
        clipped_sum, _ = ft.per_example_layer_norm_clip(grads, C)
        updates, opt_state = tx.update(clipped_sum, opt_state, params)
        params = ft.apply_updates(params, updates)
    _assert_params_close(params, theirs, atol=1e-10)


# Claim: Opacus takes q = 1/len(loader) and divides by int(N·q); PoissonSampler's
# expected_batch_size is q·N; its default steps round 1/q where Opacus' sampler truncates; the
# same seed gives different batches (float32 draws there, float64 here).
def test_sample_rate_expected_batch_size_and_steps() -> None:
    n, batch_size = 1000, 64
    net = torch.nn.Linear(3, 1)
    _, optimizer, loader = PrivacyEngine().make_private(
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=LR),
        data_loader=DataLoader(TensorDataset(torch.randn(n, 3)), batch_size=batch_size),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert loader.sample_rate == 1 / 16 and optimizer.expected_batch_size == 62
    assert ft.PoissonSampler(n, batch_size / n).expected_batch_size == 64.0
    assert ft.PoissonSampler(n, 1 / 16).expected_batch_size == 62.5

    assert len(UniformWithReplacementSampler(num_samples=100, sample_rate=0.15)) == 6
    assert len(ft.PoissonSampler(100, 0.15)) == 7
    theirs = UniformWithReplacementSampler(
        num_samples=100, sample_rate=0.15, generator=torch.Generator().manual_seed(0)
    )
    ours = ft.PoissonSampler(100, 0.15, steps=6, generator=torch.Generator().manual_seed(0))
    assert list(ours) != list(theirs)


# Claim: functrain's noise is a pure function of the seed and the step and leaves the global
# RNG alone; Opacus draws from torch's generator (the global one by default).
def test_noise_comes_from_the_seed_not_the_global_rng() -> None:
    x, y = _outlier_data()
    idx = list(range(8))
    model, params, _ = ft.functionalize(_regressor())

    def run() -> dict:
        tx = ft.chain(ft.dp_noisy_mean(C, 1.0, expected_batch_size=E, seed=7), ft.sgd(LR))
        step = ft.make_train_step(
            lambda p, b: F.mse_loss(model(p, b["x"]), b["y"]), tx, per_example_clip=C
        )
        state = ft.TrainState.create(params=params, tx=tx)
        for _ in range(2):
            state, _ = step(state, {"x": x[idx], "y": y[idx]})
        return state.params

    rng = torch.get_rng_state()
    first = run()
    assert torch.equal(torch.get_rng_state(), rng)
    torch.manual_seed(123)  # another global state: the same noise
    ft.testing.assert_trees_all_equal(run(), first, bitwise=True)

    net = _regressor()
    _, module, optimizer, criterion, _ = _make_private(
        net, TensorDataset(x, y), noise_multiplier=1.0
    )
    optimizer.zero_grad()
    criterion(module(x[idx]), y[idx]).backward()
    rng = torch.get_rng_state()
    optimizer.step()
    assert not torch.equal(torch.get_rng_state(), rng)


# Claims on how ε is reported: functrain's RDP ε is never negative (Opacus' can be, at a large
# δ) and steps with q = 0 spend nothing (Opacus: the conversion's floor, about 0.1); before any
# step Opacus' PRV accountant raises, functrain's reports 0; "gdp" has no counterpart.
def test_epsilon_reporting_differences() -> None:
    little = [(1e3, 0.01, 1)]
    for theirs, ours in ((OpacusRDP(), ft.RDPAccountant()), (OpacusPRV(), ft.PRVAccountant())):
        theirs.history = ours.history = list(little)
        assert theirs.get_epsilon(0.5) < 0 <= ours.get_epsilon(0.5) <= 0.01
    theirs, ours = OpacusRDP(), ft.RDPAccountant()
    theirs.history = ours.history = [(1.0, 0.0, 10)]
    assert theirs.get_epsilon(DELTA) == pytest.approx(0.103, abs=1e-3)
    assert ours.get_epsilon(DELTA) == 0.0
    with warnings.catch_warnings(), pytest.raises(ValueError):
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's 1/0 on the way to the error
        OpacusPRV().get_epsilon(DELTA)
    assert ft.PRVAccountant().get_epsilon(DELTA) == 0.0
    with pytest.raises(ValueError, match="accountant must be 'rdp' or 'prv'"):
        ft.get_noise_multiplier(2.0, DELTA, 0.1, 30, accountant="gdp")
    with warnings.catch_warnings():  # Opacus' own search for the gdp accountant works
        warnings.simplefilter("ignore")
        from opacus.accountants.utils import get_noise_multiplier

        assert (
            get_noise_multiplier(
                target_epsilon=2.0, target_delta=DELTA, sample_rate=0.1, steps=30, accountant="gdp"
            )
            > 0
        )


# Claim: BatchNorm in train mode is refused by both; Opacus refuses it in eval mode too, where
# functrain takes the frozen statistics as buffers.
def test_batchnorm_refused_by_both_in_train_mode() -> None:
    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2)
        ).to(F64)

    g = torch.Generator().manual_seed(6)
    batch = {
        "x": torch.randn(8, 4, generator=g, dtype=F64),
        "y": torch.randint(0, 2, (8,), generator=g),
    }
    for train in (True, False):
        with pytest.raises(NotImplementedError, match="buffers"):
            GradSampleModule(make().train(train))

    model, params, buffers = ft.functionalize(make())

    def loss_fn(params, batch):  # the snapshot buffers, read-only
        return F.cross_entropy(model(params, batch["x"]), batch["y"])

    def loss_with_buffers(params, batch, buffers):  # new running statistics returned
        out, new_buffers = model.apply(params, buffers, batch["x"])
        return ft.LossOutput(F.cross_entropy(out, batch["y"]), buffers=new_buffers)

    with pytest.raises(RuntimeError, match="BatchNorm"):
        ft.per_sample_grads(loss_fn, params, batch)
    # Through model.apply, each example meets BatchNorm alone, as a batch of one.
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        ft.per_sample_grads(loss_with_buffers, params, batch, buffers=buffers)

    net = make().eval()
    frozen, params, _ = ft.functionalize(net)
    grads = ft.per_sample_grads(
        lambda p, b: F.cross_entropy(frozen(p, b["x"]), b["y"]), params, batch
    )
    for i in range(8):
        out = net(batch["x"][i : i + 1])
        ref = torch.autograd.grad(
            F.cross_entropy(out, batch["y"][i : i + 1]), list(net.parameters())
        )
        for (name, _), r in zip(net.named_parameters(), ref):
            torch.testing.assert_close(grads[name][i], r, rtol=0, atol=1e-12)
