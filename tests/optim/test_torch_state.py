"""ft.opt_state_from_torch / ft.opt_state_to_torch against torch.optim's own trajectories (float64)."""

from __future__ import annotations

import _torch_runs
import pytest
import torch
from _torch_runs import functional, make_batches, mse
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain.testing import assert_trees_all_close, assert_trees_all_equal

RTOL = 1e-12


class Net(torch.nn.Module):
    """A small MLP whose third layer's weight is tied to the second's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(4, 6)
        self.l2 = torch.nn.Linear(6, 6)
        self.l3 = torch.nn.Linear(6, 6)
        self.l3.weight = self.l2.weight
        self.head = torch.nn.Linear(6, 2)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.l1(x))
        x = torch.tanh(self.l2(x))
        return self.head(torch.tanh(self.l3(x)))


BATCHES = make_batches(1, 12)
_loss = mse


def torch_steps(net, opt, start: int, stop: int, sched=None, clip=None) -> None:
    _torch_runs.torch_steps(BATCHES, net, opt, start, stop, sched, clip)


def ft_steps(model, tx, params, state, start: int, stop: int):
    return _torch_runs.ft_steps(BATCHES, model, tx, params, state, start, stop)


CASES = {
    "adam": (
        lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99)),
        lambda: ft.adam(1e-2, 0.8, 0.99),
    ),
    "adamw": (
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda: ft.adamw(1e-2, weight_decay=0.1),
    ),
    "adam_l2": (
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
        lambda: ft.chain(ft.add_decayed_weights(0.1), ft.adam(1e-2)),
    ),
    "sgd_momentum": (
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda: ft.sgd(0.05, 0.9),
    ),
    "sgd_nesterov": (
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
        lambda: ft.sgd(0.05, 0.9, nesterov=True),
    ),
    "rmsprop": (
        lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.9),
        lambda: ft.rmsprop(1e-2, 0.9, 1e-8, eps_in_sqrt=False),
    ),
    "rmsprop_centered": (
        lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.9, centered=True),
        lambda: ft.rmsprop(1e-2, 0.9, 1e-8, eps_in_sqrt=False, centered=True),
    ),
    "rmsprop_momentum": (
        lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.9, momentum=0.5, centered=True),
        lambda: ft.rmsprop(1e-2, 0.9, 1e-8, eps_in_sqrt=False, centered=True, momentum=0.5),
    ),
    "adagrad": (
        lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.1, eps=0.0),
        lambda: ft.adagrad(0.1, 0.1, eps=0.0),
    ),
    "adamax": (lambda p: torch.optim.Adamax(p, lr=1e-2), lambda: ft.adamax(1e-2)),
    "radam": (lambda p: torch.optim.RAdam(p, lr=1e-2, eps=0.0), lambda: ft.radam(1e-2, eps=0.0)),
    "adadelta": (
        lambda p: torch.optim.Adadelta(p, lr=1.0, rho=0.9),
        lambda: ft.adadelta(1.0, 0.9, 1e-6),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=4, deadline=None)
@given(n=st.integers(1, 7), m=st.integers(1, 3))
def test_resume_matches_torch(name: str, n: int, m: int) -> None:
    make_opt, make_tx = CASES[name]
    net = Net()
    opt = make_opt(net.parameters())
    torch_steps(net, opt, 0, n)
    model, params = functional(net)
    tx = make_tx()
    state = ft.opt_state_from_torch(tx, params, opt)
    params, _ = ft_steps(model, tx, params, state, n, n + m)
    torch_steps(net, opt, n, n + m)
    assert_trees_all_close(params, dict(net.named_parameters()), rtol=RTOL)


def test_resume_through_train_step() -> None:
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    torch_steps(net, opt, 0, 3)
    model, params = functional(net)
    tx = ft.adamw(1e-2, weight_decay=0.1)
    state = ft.TrainState.create(params=params, tx=tx)
    state = state.replace(opt_state=ft.opt_state_from_torch(tx, params, opt))
    step = ft.make_train_step(lambda p, b: _loss(model(p, b[0]), b[1]), tx)
    for batch in BATCHES[3:6]:
        state, _ = step(state, batch)
    torch_steps(net, opt, 3, 6)
    assert_trees_all_close(state.params, dict(net.named_parameters()), rtol=RTOL)


def test_functionalize_order_is_torch_order_with_tied_weights() -> None:
    net = Net()
    _, params = functional(net)
    assert len(params) == len(list(net.parameters())) == 7  # the tied weight counted once
    for (name, a), b in zip(params.items(), net.parameters(), strict=True):
        assert a.shape == b.shape and torch.equal(a, b), name


@pytest.mark.parametrize("inject", [False, True])
def test_schedule_continues_at_torch_step(inject: bool) -> None:
    schedule = ft.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 10)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1.0)
    lam = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: float(schedule(torch.tensor(t, dtype=torch.int32)))
    )
    torch_steps(net, opt, 0, 4, lam)
    model, params = functional(net)
    tx = ft.inject_hyperparams(ft.adam)(learning_rate=schedule) if inject else ft.adam(schedule)
    state = ft.opt_state_from_torch(tx, params, opt)
    params, _ = ft_steps(model, tx, params, state, 4, 8)
    torch_steps(net, opt, 4, 8, lam)
    assert_trees_all_close(params, dict(net.named_parameters()), rtol=RTOL)


@pytest.mark.parametrize(
    "name",
    [
        "adam",
        "adamw",
        "sgd_nesterov",
        "rmsprop_centered",
        "rmsprop_momentum",
        "adagrad",
        "adamax",
        "radam",
        "adadelta",
    ],
)
@settings(max_examples=3, deadline=None)
@given(n=st.integers(1, 5), m=st.integers(1, 3))
def test_round_trip(name: str, n: int, m: int) -> None:
    make_opt, make_tx = CASES[name]
    net = Net()
    model, params = functional(net)
    tx = make_tx()
    params, state = ft_steps(model, tx, params, tx.init(params), 0, n)
    with torch.no_grad():
        for p, v in zip(net.parameters(), params.values(), strict=True):
            p.copy_(v)
    opt = make_opt(net.parameters())
    step = n if name.startswith(("rmsprop", "sgd", "adadelta", "adagrad")) else None
    sd = ft.opt_state_to_torch(tx, state, params, opt, step=step)
    opt.load_state_dict(sd)
    # Back again: the same state (RMSprop's momentum goes through one division by -lr).
    again = ft.opt_state_from_torch(tx, params, sd, step=step)
    if name == "rmsprop_momentum":
        assert_trees_all_close(again, state, rtol=1e-15)
    else:
        assert_trees_all_equal(again, state)
    torch_steps(net, opt, n, n + m)
    params, _ = ft_steps(model, tx, params, state, n, n + m)
    assert_trees_all_close(params, dict(net.named_parameters()), rtol=RTOL)


def test_to_torch_step_storage() -> None:
    net = Net()
    model, params = functional(net)
    tx = ft.adam(1e-2)
    _, state = ft_steps(model, tx, params, tx.init(params), 0, 2)
    sd = ft.opt_state_to_torch(tx, state, params, torch.optim.Adam(net.parameters()))
    assert sorted(sd["state"]) == list(range(7))
    for entry in sd["state"].values():
        assert entry["step"].dtype == torch.float32 and entry["step"].device.type == "cpu"
        assert entry["step"].ndim == 0 and float(entry["step"]) == 2.0
    tx = ft.sgd(0.1, 0.9)
    _, state = ft_steps(model, tx, params, tx.init(params), 0, 2)
    sgd = torch.optim.SGD(net.parameters(), 0.1, momentum=0.9)
    sd = ft.opt_state_to_torch(tx, state, params, sgd)
    assert all(set(entry) == {"momentum_buffer"} for entry in sd["state"].values())


def test_param_groups_to_partition() -> None:
    net = Net()
    first, rest = list(net.parameters())[:2], list(net.parameters())[2:]
    opt = torch.optim.Adam([{"params": first, "lr": 1e-2}, {"params": rest, "lr": 1e-3}])
    torch_steps(net, opt, 0, 3)
    model, params = functional(net)
    labels = {k: "a" if k.startswith("l1.") else "b" for k in params}
    tx = ft.partition({"a": ft.adam(1e-2), "b": ft.adam(1e-3)}, labels)
    state = ft.opt_state_from_torch(tx, params, opt)
    params, _ = ft_steps(model, tx, params, state, 3, 6)
    torch_steps(net, opt, 3, 6)
    assert_trees_all_close(params, dict(net.named_parameters()), rtol=RTOL)


def test_order_overrides_insertion_order() -> None:
    net = Net()
    named = list(net.named_parameters())
    rev = [p for _, p in reversed(named)]
    opt = torch.optim.Adam(rev, lr=1e-2)
    torch_steps(net, opt, 0, 2)
    model, params = functional(net)
    tx = ft.adam(1e-2)
    with pytest.raises(ValueError, match="shape"):
        ft.opt_state_from_torch(tx, params, opt)
    state = ft.opt_state_from_torch(tx, params, opt, order=[k for k, _ in reversed(named)])
    params, _ = ft_steps(model, tx, params, state, 2, 4)
    torch_steps(net, opt, 2, 4)
    assert_trees_all_close(params, dict(net.named_parameters()), rtol=RTOL)


def test_frozen_parameter() -> None:
    net = Net()
    net.l1.bias.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    torch_steps(net, opt, 0, 3)
    model, params = functional(net)
    with pytest.raises(
        ValueError, match=r"params\['l1.bias'\] \(torch parameter 1: .*selective_transform"
    ):
        ft.opt_state_from_torch(ft.adam(1e-2), params, opt)
    freeze = {k: k == "l1.bias" for k in params}
    tx = ft.selective_transform(ft.adam(1e-2), freeze_mask=freeze)
    state = ft.opt_state_from_torch(tx, params, opt)
    params, _ = ft_steps(model, tx, params, state, 3, 6)
    torch_steps(net, opt, 3, 6)
    assert_trees_all_close(params, dict(net.named_parameters()), rtol=RTOL)
    sd = ft.opt_state_to_torch(tx, state, params, opt)
    assert 1 not in sd["state"] and len(sd["state"]) == 6


def test_never_stepped_gives_init() -> None:
    net = Net()
    _, params = functional(net)
    tx = ft.adagrad(0.1, 0.1, eps=0.0)
    state = ft.opt_state_from_torch(tx, params, torch.optim.Adagrad(net.parameters(), lr=0.1))
    assert_trees_all_equal(state, tx.init(params))


def test_result_does_not_alias_torch() -> None:
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    torch_steps(net, opt, 0, 2)
    _, params = functional(net)
    state = ft.opt_state_from_torch(ft.adam(1e-2), params, opt)
    before = ft.tree.map(torch.clone, state)
    torch_steps(net, opt, 2, 3)
    assert_trees_all_equal(state, before)


def test_moments_take_init_dtype() -> None:
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    torch_steps(net, opt, 0, 2)
    _, params = functional(net)
    params32 = {k: v.float() for k, v in params.items()}
    state = ft.opt_state_from_torch(ft.adam(1e-2), params32, opt)
    assert all(v.dtype == torch.float32 for v in state[0].mu.values())
    assert torch.equal(state[0].nu["l2.weight"], opt.state[net.l2.weight]["exp_avg_sq"].float())


def _adam_after(n: int = 2):
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    torch_steps(net, opt, 0, n)
    return net, opt, functional(net)[1]


def test_error_unequal_steps() -> None:
    _, opt, params = _adam_after()
    sd = opt.state_dict()
    sd["state"][3]["step"] = torch.tensor(5.0)
    with pytest.raises(ValueError, match=r"params\['l1.weight'\].*step 2.*params\['l2.bias'\].*5"):
        ft.opt_state_from_torch(ft.adam(1e-2), params, sd)


def test_error_missing_state() -> None:
    _, opt, params = _adam_after()
    sd = opt.state_dict()
    del sd["state"][4]
    with pytest.raises(
        ValueError, match=r"no stepped state for params\['l3.bias'\] \(torch parameter 4: none"
    ):
        ft.opt_state_from_torch(ft.adam(1e-2), params, sd)


def test_error_shape_mismatch() -> None:
    _, opt, params = _adam_after()
    params["l2.bias"] = torch.zeros(7, dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=r"params\['l2.bias'\] has shape \(7,\) but torch parameter 3 has shape \(6,\)",
    ):
        ft.opt_state_from_torch(ft.adam(1e-2), params, opt)
    with pytest.raises(
        ValueError,
        match=r"params\['l2.bias'\] has shape \(7,\) but torch parameter 3's 'exp_avg' has shape \(6,\)",
    ):
        ft.opt_state_from_torch(ft.adam(1e-2), params, opt.state_dict())


def test_error_wrong_parameter_count() -> None:
    _, opt, params = _adam_after()
    params["extra"] = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="torch optimizer has 7 parameters but params has 8"):
        ft.opt_state_from_torch(ft.adam(1e-2), params, opt)


@pytest.mark.parametrize(
    ("make_opt", "tx", "match"),
    [
        (
            lambda p: torch.optim.SGD(p, 0.1, momentum=0.9),
            ft.adamw(1e-2),
            "sgd state, which tx's adam cannot take",
        ),
        (
            lambda p: torch.optim.Adam(p, 0.1),
            ft.sgd(0.1, 0.9),
            "adam state, which tx's TraceState cannot take",
        ),
        (
            lambda p: torch.optim.Adam(p, 0.1),
            ft.sgd(0.1),
            r"\['exp_avg', 'exp_avg_sq'\].*no place in tx's state",
        ),
        (
            lambda p: torch.optim.Adamax(p, 0.1),
            ft.adam(0.1),
            "adamax state, which tx's adam cannot take",
        ),
        (
            lambda p: torch.optim.Adam(p, 0.1),
            ft.adamax(0.1),
            "adam state, which tx's adamax cannot take",
        ),
        (
            lambda p: torch.optim.RMSprop(p, 0.1, centered=True),
            ft.rmsprop(0.1, eps_in_sqrt=False),
            r"\['grad_avg'\].*no place",
        ),
        (
            lambda p: torch.optim.SGD(p, 0.1, momentum=0.9),
            ft.sgd(ft.linear_schedule(0.1, 0.0, 9), 0.9),
            "pass step=",
        ),
    ],
)
def test_error_wrong_family(make_opt, tx, match: str) -> None:
    net = Net()
    opt = make_opt(net.parameters())
    torch_steps(net, opt, 0, 2)
    with pytest.raises(ValueError, match=match):
        ft.opt_state_from_torch(tx, functional(net)[1], opt)


def test_error_unsupported() -> None:
    net = Net()
    params = functional(net)[1]
    opt = torch.optim.Adam(net.parameters(), lr=0.1, amsgrad=True)
    torch_steps(net, opt, 0, 1)
    with pytest.raises(ValueError, match="amsgrad"):
        ft.opt_state_from_torch(ft.adam(0.1), params, opt)
    with pytest.raises(ValueError, match="amsgrad"):
        ft.opt_state_from_torch(ft.adam(0.1), params, opt.state_dict())
    nadam = torch.optim.NAdam(net.parameters(), lr=0.1)
    torch_steps(net, nadam, 0, 1)
    with pytest.raises(ValueError, match="NAdam is not supported"):
        ft.opt_state_from_torch(ft.nadam(0.1), params, nadam)
    with pytest.raises(ValueError, match="mu_product"):
        ft.opt_state_from_torch(ft.nadam(0.1), params, nadam.state_dict())
    with pytest.raises(ValueError, match=r"ft\.amsgrad"):
        ft.opt_state_from_torch(ft.amsgrad(0.1), params, torch_adam_state(net))
    with pytest.raises(ValueError, match=r"RMSprop.*keeps.*grad_avg"):
        tx = ft.rmsprop(0.1, eps_in_sqrt=False)
        ft.opt_state_to_torch(
            tx,
            tx.init(params),
            params,
            torch.optim.RMSprop(net.parameters(), centered=True),
            step=1,
        )


def torch_adam_state(net: Net) -> dict:
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    torch_steps(net, opt, 0, 1)
    return opt.state_dict()
