"""Review of activation checkpointing inside functionalized modules (``train/_recompute.py``).

The recompute must run as the call ran: in the call's mode (``model.eval()`` of a module in
training mode), with the call's tensors even when the checkpointed function reads a parameter
without running a submodule, and calls under ``no_grad`` (a teacher) or repeated calls with the
same parameters and buffers must not make it refuse. Reference: the classic torch loop on a deep
copy of the module, float64, bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.parametrizations import weight_norm
from torch.utils.checkpoint import checkpoint

import functrain as ft

F64 = torch.float64
LR = 0.5


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def _batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {
            "x": torch.randn(6, 4, generator=g, dtype=F64),
            "y": torch.randn(6, 1, generator=g, dtype=F64),
        }
        for _ in range(n)
    ]


class Net(torch.nn.Module):
    """``block`` runs under ``checkpoint``; ``extra`` goes into it (dropout, BatchNorm, ...)."""

    def __init__(self, *extra: torch.nn.Module, bn: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(4, 8)
        self.bn = torch.nn.BatchNorm1d(8) if bn else torch.nn.Identity()
        self.block = torch.nn.Sequential(torch.nn.Linear(8, 8), *extra, torch.nn.Tanh())
        self.head = torch.nn.Linear(8, 1)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(torch.tanh(self.l1(x)))
        return self.head(checkpoint(self.block, h, use_reentrant=False))


def _torch_loop(net: torch.nn.Module, loss, batches, seed: int | None = None) -> torch.nn.Module:
    if seed is not None:
        torch.manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for b in batches:
        opt.zero_grad()
        loss(net, b).backward()
        opt.step()
    return net


def _steps(loss_fn, params, batches, seed: int | None = None, buffers=None, **options):
    tx = ft.sgd(LR)
    step = ft.make_train_step(loss_fn, tx, **options)
    # seed=None: dropout draws from the global generator, as the torch loop's does
    state = ft.TrainState.create(params=params, tx=tx, buffers=buffers, seed=None)
    if seed is not None:
        torch.manual_seed(seed)
    for b in batches:
        state, _ = step(state, b)
    return state


def _close(got, net: torch.nn.Module) -> None:
    ft.testing.assert_trees_all_close(got, dict(net.named_parameters()), rtol=1e-13, atol=0)


def _norms_hook() -> ft.GradStatsHook:
    """Needs whole micro-batch gradients: the step takes the torch.autograd.grad loop."""
    return ft.GradStatsHook(
        init=lambda p: None,
        per_micro_batch=lambda g, b: {"sq": ft.tree.norm(g, squared=True)},
        update=lambda stats, g, s: ({}, s),
    )


OPTIONS = pytest.mark.parametrize(
    "options",
    [{}, {"micro_batches": 2}, {"micro_batches": 2, "grad_stats": _norms_hook()}],
    ids=["K1", "K2", "K2-autograd-grad"],
)


def _no_global_hooks() -> None:
    assert not torch.nn.modules.module._global_forward_pre_hooks


@OPTIONS
def test_an_eval_model_recomputes_in_eval_mode(options: dict) -> None:
    # The module is in training mode; model.eval() switches it only during the call. Old code:
    # the recompute ran dropout (training mode) and the gradients were wrong from step 1 on.
    net = Net(torch.nn.Dropout(0.5))
    ref = _torch_loop(copy.deepcopy(net).eval(), lambda n, b: _mse(n(b["x"]), b["y"]), _batches())
    model, params, _ = ft.functionalize(net)
    evaluated = model.eval()
    state = _steps(lambda p, b: _mse(evaluated(p, b["x"]), b["y"]), params, _batches(), **options)
    _close(state.params, ref)
    assert net.training and all(m.training for m in net.modules())
    _no_global_hooks()


def test_a_train_model_of_an_eval_module_recomputes_in_training_mode() -> None:
    # Dropout inside the checkpoint draws from the global generator; torch's checkpoint restores
    # its state for the recompute, so the recompute's mask is the forward's, if it runs dropout.
    net = Net(torch.nn.Dropout(0.5)).eval()
    ref = _torch_loop(
        copy.deepcopy(net).train(), lambda n, b: _mse(n(b["x"]), b["y"]), _batches(), seed=7
    )
    model, params, _ = ft.functionalize(net)
    trained = model.train()
    state = _steps(lambda p, b: _mse(trained(p, b["x"]), b["y"]), params, _batches(), seed=7)
    _close(state.params, ref)
    assert not any(m.training for m in net.modules())


class Direct(torch.nn.Module):
    """The checkpointed function reads a parameter without running any submodule."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(0.5 * torch.randn(4, 8, dtype=F64))
        self.head = torch.nn.Linear(8, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(lambda t: torch.tanh(t @ self.w), x, use_reentrant=False))


@OPTIONS
def test_a_checkpointed_function_reading_a_parameter_directly(options: dict) -> None:
    net = Direct()
    ref = _torch_loop(copy.deepcopy(net), lambda n, b: _mse(n(b["x"]), b["y"]), _batches())
    model, params, _ = ft.functionalize(net)
    state = _steps(lambda p, b: _mse(model(p, b["x"]), b["y"]), params, _batches(), **options)
    _close(state.params, ref)


class WithBuffer(Net):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(2.0, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.scale)


def test_a_model_with_buffers_called_twice_with_the_same_params() -> None:
    # model(params, x) copies the snapshot buffers per call: old code took the copies for two
    # parameter sets and refused the recompute.
    def loss(n, b):
        return _mse(n(b["x"]), b["y"]) + _mse(n(2 * b["x"]), b["y"])

    net = WithBuffer()
    ref = _torch_loop(copy.deepcopy(net), loss, _batches())
    model, params, _ = ft.functionalize(net)
    state = _steps(lambda p, b: loss(lambda x: model(p, x), b), params, _batches())
    _close(state.params, ref)


@pytest.mark.parametrize("teacher_first", [True, False])
@pytest.mark.parametrize("mode", ["same", "eval"])
def test_a_teacher_call_under_no_grad_does_not_count(teacher_first: bool, mode: str) -> None:
    # One module, the teacher's parameters under no_grad (an EMA teacher): no graph, no
    # recompute. Old code refused (same model) or recomputed with the teacher's tensors.
    net = Net()
    teacher = copy.deepcopy(net)
    with torch.no_grad():
        for q in teacher.parameters():
            q.mul_(1.5)

    def loss(student, b):
        if teacher_first:
            with torch.no_grad():
                target = teacher_fn(b["x"])
            return _mse(student(b["x"]), target)
        out = student(b["x"])
        with torch.no_grad():
            target = teacher_fn(b["x"])
        return _mse(out, target)

    teacher_fn = teacher
    ref = _torch_loop(copy.deepcopy(net), loss, _batches())
    model, params, _ = ft.functionalize(net)
    other = model if mode == "same" else model.eval()
    t_params = {k: v.detach().clone() for k, v in teacher.named_parameters()}
    teacher_fn = lambda x: other(t_params, x)  # noqa: E731
    state = _steps(lambda p, b: loss(lambda x: model(p, x), b), params, _batches())
    _close(state.params, ref)


def test_a_model_of_a_submodule_of_another_model_is_refused() -> None:
    # Both calls recompute net.block with different parameters; old code gave the outer
    # model's recompute the submodule model's tensors, silently.
    net = Net()
    model, params, _ = ft.functionalize(net)
    block_model, block_params, _ = ft.functionalize(net.block, copy=True)

    def loss_fn(p, b):
        h = 2 * torch.tanh(b["x"] @ p["m"]["l1.weight"].T + p["m"]["l1.bias"])
        inner = checkpoint(lambda t: block_model(p["b"], t), h, use_reentrant=False)
        return _mse(model(p["m"], b["x"]), b["y"]) + _mse(inner.sum(1, keepdim=True), b["y"])

    with pytest.raises(RuntimeError, match="two different sets of parameters"):
        _steps(loss_fn, {"m": params, "b": block_params}, _batches(1))
    assert all(type(v) is torch.nn.Parameter for v in net.parameters())
    _no_global_hooks()
    # The same loss without the outer model's recompute (no checkpoint in it) is fine.
    net.forward = lambda x: net.head(net.block(net.bn(torch.tanh(net.l1(x)))))
    _steps(loss_fn, {"m": params, "b": block_params}, _batches(1))


def test_two_parameter_sets_checkpointed_around_the_call_are_fine() -> None:
    # checkpoint(lambda t: model(p, t)) recomputes through the model's own call, which swaps
    # its tensors in: no ambiguity (old code refused it).
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    net.double()
    other = copy.deepcopy(net)
    ref_a, ref_b = copy.deepcopy(net), copy.deepcopy(other)
    with torch.no_grad():
        for q in other.parameters():
            q.mul_(-1.0)
        for q in ref_b.parameters():
            q.mul_(-1.0)
    opt = torch.optim.SGD([*ref_a.parameters(), *ref_b.parameters()], lr=LR)
    for b in _batches():
        opt.zero_grad()
        (
            _mse(checkpoint(ref_a, b["x"], use_reentrant=False), b["y"])
            + _mse(checkpoint(ref_b, b["x"], use_reentrant=False), b["y"])
        ).backward()
        opt.step()
    model, pa, _ = ft.functionalize(net, copy=True)
    pb = {k: v.detach().clone() for k, v in other.named_parameters()}

    def loss_fn(p, b):
        out_a = checkpoint(lambda t: model(p["a"], t), b["x"], use_reentrant=False)
        out_b = checkpoint(lambda t: model(p["b"], t), b["x"], use_reentrant=False)
        return _mse(out_a, b["y"]) + _mse(out_b, b["y"])

    state = _steps(loss_fn, {"a": pa, "b": pb}, _batches())
    _close(state.params["a"], ref_a)
    _close(state.params["b"], ref_b)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_batchnorm_inside_and_outside_the_checkpoint_follows_torch(micro_batches: int) -> None:
    # torch's checkpoint updates the running statistics again in the recompute: so must we.
    net = Net(torch.nn.BatchNorm1d(8), bn=True)
    ref = copy.deepcopy(net)
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for b in _batches():
        opt.zero_grad()
        for x, y in zip(b["x"].chunk(micro_batches), b["y"].chunk(micro_batches)):
            (_mse(ref(x), y) / micro_batches).backward()
        opt.step()
    model, params, buffers = ft.functionalize(net)

    def loss_fn(p, b, buffers):
        out, new = model.apply(p, buffers, b["x"])
        return ft.LossOutput(_mse(out, b["y"]), buffers=new)

    state = _steps(loss_fn, params, _batches(), buffers=buffers, micro_batches=micro_batches)
    _close(state.params, ref)
    ft.testing.assert_trees_all_close(state.buffers, dict(ref.named_buffers()), rtol=1e-13, atol=0)


class Recurrent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = torch.nn.GRU(4, 8, batch_first=True)
        self.head = torch.nn.Linear(8, 1)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.unsqueeze(1).expand(-1, 3, -1)
        return self.head(checkpoint(lambda t: self.rnn(t)[0], seq, use_reentrant=False)[:, -1])


class Tied(Net):
    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(8, 8).double()
        self.inner.weight = self.block[0].weight  # tied, the tied module checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(torch.tanh(self.l1(x))))
        return self.head(checkpoint(self.block, h, use_reentrant=False))


def _weight_normed() -> torch.nn.Module:
    net = Net()
    net.block[0] = weight_norm(net.block[0])
    return net


@pytest.mark.parametrize("factory", [Recurrent, Tied, _weight_normed], ids=["gru", "tied", "wn"])
def test_other_modules_follow_torch(factory) -> None:
    net = factory()
    ref = _torch_loop(copy.deepcopy(net), lambda n, b: _mse(n(b["x"]), b["y"]), _batches())
    model, params, _ = ft.functionalize(net)
    state = _steps(lambda p, b: _mse(model(p, b["x"]), b["y"]), params, _batches())
    _close(state.params, ref)
    own = dict(factory().named_parameters())
    assert all(type(v) is torch.nn.Parameter for v in net.parameters())
    assert own.keys() == dict(net.named_parameters()).keys()


class Failing(torch.nn.Module):
    """Raises in its second forward: the recompute."""

    def __init__(self, error: type[BaseException]) -> None:
        super().__init__()
        self.calls = 0
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls % 2 == 0:
            raise self.error("in the recompute")
        return x


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
@pytest.mark.parametrize("eval_model", [False, True])
def test_an_error_in_the_recompute_leaves_the_module_as_it_was(error, eval_model: bool) -> None:
    net = Net(Failing(error))
    own = {k: v for k, v in net.named_parameters()}
    model, params, _ = ft.functionalize(net)
    model = model.eval() if eval_model else model
    tx = ft.sgd(LR)
    step = ft.make_train_step(lambda p, b: _mse(model(p, b["x"]), b["y"]), tx, donate=False)
    state = ft.TrainState.create(params=params, tx=tx)
    with pytest.raises(error, match="in the recompute"):
        step(state, _batches(1)[0])
    assert all(v is own[k] for k, v in net.named_parameters())
    assert all(m.training for m in net.modules())
    _no_global_hooks()
    net.block[1].calls = 1  # the next forward is a first one again: the step works
    net.block[1].error = RuntimeError
    net.block[1].forward = lambda x: x
    step(state, _batches(1)[0])
