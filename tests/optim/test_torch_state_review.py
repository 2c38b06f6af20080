"""Review of ft.opt_state_from_torch / ft.opt_state_to_torch: runs as a migrating user has them.

Each case continues a torch.optim run (float64) in torch and, from the converted state, in
functrain, and compares the parameters; options whose state has no exact functrain counterpart
must be refused by name.
"""

from __future__ import annotations

import io

import _torch_runs
import pytest
import torch
from _torch_runs import functional, make_batches, mse

import functrain as ft
from functrain.testing import assert_trees_all_close, assert_trees_all_equal

RTOL = 1e-12


class Net(torch.nn.Module):
    """Four layers; l2 and l3 have the same shapes, so a swapped order passes shape checks."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(4, 6)
        self.l2 = torch.nn.Linear(6, 6)
        self.l3 = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 2)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.l1(x.to(self.l1.weight.dtype)))
        x = torch.tanh(self.l2(x))
        return self.head(torch.tanh(self.l3(x)))


BATCHES = make_batches(3, 10)
_loss = mse


def torch_steps(net, opt, start: int, stop: int, sched=None, clip=None) -> None:
    _torch_runs.torch_steps(BATCHES, net, opt, start, stop, sched, clip)


def ft_steps(model, tx, params, state, start: int, stop: int):
    return _torch_runs.ft_steps(BATCHES, model, tx, params, state, start, stop)


def resume(net, opt, tx, n: int = 3, m: int = 3, sched=None, **kw) -> None:
    """Torch takes n steps; then m more in torch and, from the converted state, in functrain."""
    torch_steps(net, opt, 0, n, sched)
    model, params = functional(net)
    state = ft.opt_state_from_torch(tx, params, opt, **kw)
    params, _ = ft_steps(model, tx, params, state, n, n + m)
    torch_steps(net, opt, n, n + m, sched)
    assert_trees_all_close(params, dict(net.named_parameters()), rtol=RTOL)


def _stepped(make_opt, n: int = 2):
    net = Net()
    opt = make_opt(net.parameters())
    torch_steps(net, opt, 0, n)
    return net, opt, functional(net)[1]


# --- scalings before a stateful transform ------------------------------------------------------


def test_scale_before_adam_refused() -> None:
    # Old code: exp_avg_sq times -1 (a negative second moment, NaN updates), silently.
    _, opt, params = _stepped(lambda p: torch.optim.Adam(p, lr=1e-2))
    tx = ft.chain(ft.scale(-1.0), ft.adam(1e-2))
    with pytest.raises(ValueError, match=r"opt_state\[1\]\[0\].*scales.*by -1 before it"):
        ft.opt_state_from_torch(tx, params, opt)
    with pytest.raises(ValueError, match=r"scales.*by -1 before it"):
        ft.opt_state_to_torch(tx, tx.init(params), params, opt)


def test_schedule_before_adam_refused_by_name() -> None:
    # Old code: TypeError from multiplying a tensor by the marker string.
    _, opt, params = _stepped(lambda p: torch.optim.Adam(p, lr=1e-2))
    tx = ft.chain(ft.scale_by_schedule(ft.linear_schedule(1.0, 0.0, 10)), ft.adam(1e-2))
    with pytest.raises(ValueError, match=r"opt_state\[1\]\[0\].*scheduled"):
        ft.opt_state_from_torch(tx, params, opt)


def test_injected_clip_before_adamw_resumes() -> None:
    # Old code: TypeError (the clip under inject_hyperparams made the scaling 'unknown').
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    # max_norm far above the gradients' norm: torch's clip_grad_norm_ and ft's do nothing.
    tx = ft.chain(
        ft.inject_hyperparams(ft.clip_by_global_norm)(max_norm=1e3),
        ft.adamw(1e-2, weight_decay=0.1),
    )
    resume(net, opt, tx)


def test_partition_of_clips_before_adam_resumes() -> None:
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    labels = {k: "a" if k.startswith("l1.") else "b" for k, _ in net.named_parameters()}
    clips = ft.partition({"a": ft.clip_by_global_norm(1e3), "b": ft.identity()}, labels)
    resume(net, opt, ft.chain(clips, ft.adam(1e-2)))


# --- tx state that torch lacks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tx", "field"),
    [
        (ft.rmsprop(1e-2, 0.99, eps_in_sqrt=False, momentum=0.9), "momentum_buffer"),
        (ft.rmsprop(1e-2, 0.99, eps_in_sqrt=False, centered=True), "grad_avg"),
    ],
)
def test_tx_state_torch_lacks_is_a_named_error(tx, field: str) -> None:
    # Old code: KeyError: 'momentum_buffer' / 'grad_avg'.
    _, opt, params = _stepped(lambda p: torch.optim.RMSprop(p, lr=1e-2))
    with pytest.raises(
        ValueError, match=rf"params\['head.bias'\] \(torch parameter 7\).*no '{field}'"
    ):
        ft.opt_state_from_torch(tx, params, opt)


# --- options that change what the state means ---------------------------------------------------


@pytest.mark.parametrize(
    ("make_opt", "tx"),
    [
        (lambda p: torch.optim.Adam(p, lr=1e-2, maximize=True), ft.adam(1e-2)),
        (lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, maximize=True), ft.sgd(1e-2, 0.9)),
        (
            lambda p: torch.optim.RMSprop(p, lr=1e-2, centered=True, maximize=True),
            ft.rmsprop(1e-2, 0.99, eps_in_sqrt=False, centered=True),
        ),
    ],
)
def test_maximize_refused(make_opt, tx) -> None:
    # Old code: the moments of the negated gradient continued a minimisation silently.
    net, opt, params = _stepped(make_opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\] has maximize=True"):
        ft.opt_state_from_torch(tx, params, opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\] has maximize=True"):
        ft.opt_state_from_torch(tx, params, opt.state_dict())
    _, state = ft_steps(functional(net)[0], tx, params, tx.init(params), 0, 1)
    with pytest.raises(ValueError, match=r"param_groups\[0\] has maximize=True"):
        ft.opt_state_to_torch(tx, state, params, opt, step=1)


def test_maximize_with_sign_free_state_resumes() -> None:
    # Adagrad's sum of squares is the same either way: functrain minimising the negated
    # objective continues torch's maximisation exactly.
    net = Net()
    opt = torch.optim.Adagrad(net.parameters(), lr=0.1, eps=0.0, maximize=True)
    torch_steps(net, opt, 0, 3)
    model, params = functional(net)
    tx = ft.adagrad(0.1, 0.0, eps=0.0)
    state = ft.opt_state_from_torch(tx, params, opt)
    # Minimising the negated loss is torch's maximisation of the loss.
    grad = torch.func.grad(lambda p, x, y: -_loss(model(p, x), y))
    for x, y in BATCHES[3:6]:
        updates, state = tx.update(grad(params, x, y), state, params)
        params = ft.apply_updates(params, updates)
    torch_steps(net, opt, 3, 6)
    assert_trees_all_close(params, dict(net.named_parameters()), rtol=RTOL)


def test_sgd_dampening_refused() -> None:
    # Old code: converted; ft.trace's t <- m t + g is not torch's b <- m b + (1 - d) g.
    net, opt, params = _stepped(lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, dampening=0.3))
    tx = ft.sgd(1e-2, 0.9)
    with pytest.raises(ValueError, match=r"param_groups\[0\] has dampening=0.3"):
        ft.opt_state_from_torch(tx, params, opt.state_dict())
    _, state = ft_steps(functional(net)[0], tx, params, tx.init(params), 0, 1)
    with pytest.raises(
        ValueError, match=r"params\['head.bias'\] \(torch parameter 7\).*dampening=0.3"
    ):
        ft.opt_state_to_torch(tx, state, params, opt)
    # Without momentum dampening is unused: nothing to refuse.
    net = Net()
    resume(net, torch.optim.SGD(net.parameters(), lr=1e-2, dampening=0.3), ft.sgd(1e-2))


@pytest.mark.parametrize(
    ("make_opt", "tx"),
    [
        (
            lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
            ft.adamw(1e-2, weight_decay=0.1),
        ),
        (lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False), ft.adam(1e-2)),
        (
            lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
            ft.chain(ft.add_decayed_weights(0.1), ft.adam(1e-2)),
        ),
        (lambda p: torch.optim.Adamax(p, lr=1e-2, eps=1e-3), ft.adamax(1e-2, eps=1e-3)),
        (lambda p: torch.optim.Adadelta(p, lr=0.5, rho=0.9), ft.adadelta(0.5, 0.9, 1e-6)),
        (
            lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.05, eps=0.0),
            ft.chain(
                ft.scale_by_rss(0.0, eps=0.0),
                ft.scale_by_learning_rate(lambda c: 0.1 / (1 + c.double() * 0.05)),
            ),
        ),
        (
            lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.9, centered=True),
            ft.rmsprop(1e-2, 0.99, eps_in_sqrt=False, centered=True, momentum=0.9),
        ),
    ],
)
def test_exact_options_resume(make_opt, tx) -> None:
    net = Net()
    resume(net, make_opt(net.parameters()), tx)


def test_fused_round_trip_step_placement() -> None:
    net = Net()
    model, params = functional(net)
    tx = ft.adamw(1e-2, weight_decay=0.1)
    params, state = ft_steps(model, tx, params, tx.init(params), 0, 3)
    with torch.no_grad():
        for p, v in zip(net.parameters(), params.values(), strict=True):
            p.copy_(v)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    sd = ft.opt_state_to_torch(tx, state, params, opt)
    assert all(e["step"].dtype == torch.float32 for e in sd["state"].values())
    opt.load_state_dict(sd)
    torch_steps(net, opt, 3, 5)
    params, _ = ft_steps(model, tx, params, state, 3, 5)
    assert_trees_all_close(params, dict(net.named_parameters()), rtol=RTOL)


# --- steps --------------------------------------------------------------------------------------


def test_stateless_sgd_takes_step_for_schedule() -> None:
    # Old code: SGD without momentum keeps no state, and step= was ignored: count 0.
    schedule = ft.linear_schedule(0.1, 0.01, 8)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    lam = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: float(schedule(torch.tensor(t, dtype=torch.int32)))
    )
    resume(net, opt, ft.sgd(schedule), sched=lam, step=3)
    with pytest.raises(ValueError, match="pass step="):
        ft.opt_state_from_torch(ft.sgd(schedule), functional(net)[1], opt)


def test_step_argument_contradicting_torch_refused() -> None:
    # Old code: step=7 silently lost to torch's 2 (from) or overriding the counters (to).
    _, opt, params = _stepped(lambda p: torch.optim.Adam(p, lr=1e-2))
    tx = ft.adam(1e-2)
    with pytest.raises(ValueError, match=r"step=7.*step 2"):
        ft.opt_state_from_torch(tx, params, opt, step=7)
    state = ft.opt_state_from_torch(tx, params, opt, step=2)
    with pytest.raises(ValueError, match=r"step=7.*2"):
        ft.opt_state_to_torch(tx, state, params, opt, step=7)
    assert float(ft.opt_state_to_torch(tx, state, params, opt, step=2)["state"][0]["step"]) == 2


def test_checkpoint_through_torch_save_with_int_steps_and_odd_ids() -> None:
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    torch_steps(net, opt, 0, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, map_location="cpu", weights_only=True)
    # Ids as an old or hand-made checkpoint may have them, and steps as Python ints.
    ids = {i: 100 - 7 * i for i in range(8)}
    sd = {
        "state": {ids[i]: {**e, "step": int(e["step"])} for i, e in sd["state"].items()},
        "param_groups": [dict(g, params=[ids[i] for i in g["params"]]) for g in sd["param_groups"]],
    }
    model, params = functional(net)
    tx = ft.adam(1e-2)
    state = ft.opt_state_from_torch(tx, params, sd)
    params, _ = ft_steps(model, tx, params, state, 3, 6)
    torch_steps(net, opt, 3, 6)
    assert_trees_all_close(params, dict(net.named_parameters()), rtol=RTOL)


# --- parameter order ----------------------------------------------------------------------------


def _named_groups(net):
    named = dict(net.named_parameters())
    sub = lambda prefix: [(k, v) for k, v in named.items() if k.startswith(prefix)]  # noqa: E731
    return [
        {"params": sub("l1.")},
        {"params": sub("l3."), "lr": 1e-3},
        {"params": sub("l2.") + sub("head.")},
    ]


def test_param_names_give_the_order() -> None:
    # Old code: l3's moments went to l2 (same shapes, no error), a silently wrong continuation.
    net = Net()
    opt = torch.optim.Adam(_named_groups(net), lr=1e-2)
    labels = {k: "slow" if k.startswith("l3.") else "fast" for k, _ in net.named_parameters()}
    tx = ft.partition({"fast": ft.adam(1e-2), "slow": ft.adam(1e-3)}, labels)
    torch_steps(net, opt, 0, 3)
    model, params = functional(net)
    for source in (opt, opt.state_dict()):
        state = ft.opt_state_from_torch(tx, params, source)
        got, _ = ft_steps(model, tx, params, state, 3, 5)
        inner = state.inner_states["slow"].inner_state[0]
        assert torch.equal(inner.mu["l3.weight"], opt.state[net.l3.weight]["exp_avg"])
    torch_steps(net, opt, 3, 5)
    assert_trees_all_close(got, dict(net.named_parameters()), rtol=RTOL)
    # And back: each entry is the named parameter's.
    sd = ft.opt_state_to_torch(tx, state, params, opt)
    assert torch.equal(sd["state"][2]["exp_avg"], inner.mu["l3.weight"])


def test_order_contradicting_param_names_refused() -> None:
    net = Net()
    opt = torch.optim.Adam(_named_groups(net), lr=1e-2)
    torch_steps(net, opt, 0, 2)
    params = functional(net)[1]
    with pytest.raises(ValueError, match=r"order\[2\] = 'l2.weight'.*'l3.weight'"):
        ft.opt_state_from_torch(ft.adam(1e-2), params, opt, order=list(params))


# --- the functrain side -------------------------------------------------------------------------


def test_donated_train_step_leaves_torch_state_alone() -> None:
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    torch_steps(net, opt, 0, 3)
    before = {k: {f: v.clone() for f, v in e.items()} for k, e in opt.state_dict()["state"].items()}
    model, params = functional(net)
    tx = ft.adam(1e-2)
    state = ft.TrainState.create(params=params, tx=tx)
    state = state.replace(opt_state=ft.opt_state_from_torch(tx, params, opt))
    step = ft.make_train_step(lambda p, b: _loss(model(p, b[0]), b[1]), tx, donate=True)
    for batch in BATCHES[3:5]:
        state, _ = step(state, batch)
    assert_trees_all_equal(opt.state_dict()["state"], before)
    # ... and the dict handed to torch is not functrain's memory either.
    sd = ft.opt_state_to_torch(tx, state.opt_state, state.params, opt)
    opt.load_state_dict(sd)
    held = {k: {f: v.clone() for f, v in e.items()} for k, e in opt.state_dict()["state"].items()}
    state, _ = step(state, BATCHES[5])
    assert_trees_all_equal(opt.state_dict()["state"], held)


def test_to_torch_param_groups_are_the_optimizers_current() -> None:
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    torch_steps(net, opt, 0, 2, sched)
    model, params = functional(net)
    tx = ft.adam(1e-2)
    _, state = ft_steps(model, tx, params, tx.init(params), 0, 2)
    sd = ft.opt_state_to_torch(tx, state, params, opt)
    assert sd["param_groups"][0]["lr"] == opt.param_groups[0]["lr"] == 1e-2 * 0.25
    sd["param_groups"][0]["lr"] = 5.0
    assert opt.param_groups[0]["lr"] == 1e-2 * 0.25


def test_float32_model_under_float64_default() -> None:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        net = Net(torch.float32)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        torch_steps(net, opt, 0, 2)
        params = functional(net)[1]
        tx = ft.adam(1e-2)
        state = ft.opt_state_from_torch(tx, params, opt)
        assert state[0].mu["l1.weight"].dtype == torch.float32
        sd = ft.opt_state_to_torch(tx, state, params, opt)
        assert sd["state"][0]["step"].dtype == opt.state[net.l1.weight]["step"].dtype
        assert_trees_all_equal(sd["state"], opt.state_dict()["state"])
    finally:
        torch.set_default_dtype(old)


def test_bfloat16_params_take_torch_moments() -> None:
    net = Net(torch.bfloat16)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    torch_steps(net, opt, 0, 2)
    params = functional(net)[1]
    state = ft.opt_state_from_torch(ft.adam(1e-2), params, opt)
    assert torch.equal(state[0].nu["l2.bias"], opt.state[net.l2.bias]["exp_avg_sq"])


def test_inject_adamw_schedules_resume() -> None:
    schedule = ft.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1.0, weight_decay=0.1)
    lam = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: float(schedule(torch.tensor(t, dtype=torch.int32)))
    )
    tx = ft.inject_hyperparams(ft.adamw)(learning_rate=schedule, weight_decay=0.1)
    resume(net, opt, tx, n=3, m=4, sched=lam)


def test_nested_and_list_params_order() -> None:
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    torch_steps(net, opt, 0, 2)
    flat = functional(net)[1]
    nested = {"l1": {}, "l2": {}, "l3": {}, "head": {}}  # insertion order = torch's, not sorted
    for k, v in flat.items():
        layer, field = k.split(".")
        nested[layer][field] = v
    state = ft.opt_state_from_torch(ft.adam(1e-2), nested, opt)
    assert torch.equal(state[0].mu["head"]["weight"], opt.state[net.head.weight]["exp_avg"])
    as_list = list(flat.values())
    state = ft.opt_state_from_torch(ft.adam(1e-2), as_list, opt)
    assert torch.equal(state[0].nu[5], opt.state[net.l3.bias]["exp_avg_sq"])


def test_empty_params() -> None:
    tx = ft.adam(1e-2)
    sd = {"state": {}, "param_groups": [{"params": [], "lr": 1e-2, "amsgrad": False}]}
    assert_trees_all_equal(ft.opt_state_from_torch(tx, {}, sd), tx.init({}))


def test_multisteps_refused_by_name() -> None:
    _, opt, params = _stepped(lambda p: torch.optim.Adam(p, lr=1e-2))
    with pytest.raises(ValueError, match="MultiStepsState"):
        ft.opt_state_from_torch(ft.MultiSteps(ft.adam(1e-2), 2), params, opt)


def test_a_tx_without_any_state_torch_needs_is_refused_going_back() -> None:
    """``ft.sgd`` keeps nothing torch's Adam needs: handing its state to Adam would restart
    every moment silently."""
    net = Net()
    _, params = functional(net)
    tx = ft.sgd(0.1)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"holds none of what torch.optim.Adam keeps.*exp_avg"):
        ft.opt_state_to_torch(tx, tx.init(params), params, opt)
    # A plain SGD keeps nothing either: nothing to refuse.
    plain = torch.optim.SGD(net.parameters(), lr=0.1)
    assert ft.opt_state_to_torch(tx, tx.init(params), params, plain)["state"] == {}


def test_adagrads_frozen_parameter_is_named_with_its_step_0_state() -> None:
    """torch's Adagrad makes every parameter's state (step 0) in ``__init__``: a parameter
    that never gets a gradient keeps it, and the refusal says so rather than "no state"."""
    net = Net()
    net.head.bias.requires_grad_(False)
    opt = torch.optim.Adagrad(net.parameters(), lr=0.1)
    torch_steps(net, opt, 0, 2)
    assert float(opt.state[net.head.bias]["step"]) == 0
    _, params = functional(net)
    with pytest.raises(ValueError, match=r"params\['head.bias'\].*one at step 0 as Adagrad"):
        ft.opt_state_from_torch(ft.adagrad(0.1), params, opt)
