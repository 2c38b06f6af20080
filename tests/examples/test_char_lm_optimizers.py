"""``char_lm.py --optimizer``: each optimizer learns; schedule-free evaluates at its average."""

import pytest
import torch
from example_files import load_example

import functrain as ft
from functrain.logging import read_scalars


def run(tmp_path, monkeypatch, optimizer):
    """Runs ``--fast`` in-process; returns the module, the loop's arguments and its result."""
    char_lm = load_example("char_lm")
    seen = {}
    train_loop, sample = ft.train_loop, char_lm.sample

    def spy_loop(step, state, batches, **kwargs):
        seen.update(kwargs)
        seen["result"] = train_loop(step, state, batches, **kwargs)
        return seen["result"]

    def spy_sample(model, params, *args):
        seen["sample_params"] = params
        return sample(model, params, *args)

    monkeypatch.setattr(ft, "train_loop", spy_loop)
    monkeypatch.setattr(char_lm, "sample", spy_sample)
    argv = ["--fast", "--no-progress", "--optimizer", optimizer, "--logdir", str(tmp_path)]
    assert char_lm.main(argv) == 0
    return char_lm, seen


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "schedule_free"])
def test_each_optimizer_learns(tmp_path, monkeypatch, capsys, optimizer):
    run(tmp_path, monkeypatch, optimizer)
    capsys.readouterr()
    curves = read_scalars(tmp_path)["."]
    loss, eval_loss = curves["train/loss"][1], curves["eval/loss"][1]
    assert sum(loss[-5:]) / 5 < loss[0] - 0.5
    assert eval_loss[-1] < eval_loss[0]
    assert "train/lr" in curves  # every choice keeps its learning rate in the state


def test_muon_gets_the_block_matrices_only(tmp_path, monkeypatch, capsys):
    char_lm, seen = run(tmp_path, monkeypatch, "muon")
    capsys.readouterr()
    params = seen["result"].state.params
    muon_names = {k for k, d in char_lm.muon_dims(params).items() if d is not None}
    assert muon_names == {
        f"blocks.{i}.{name}.weight" for i in range(2) for name in ("qkv", "out", "mlp.0", "mlp.2")
    }
    inner = seen["result"].state.opt_state[1].inner_state.inner_states
    assert set(inner) == {"muon", "adam"}


def test_schedule_free_evaluates_and_samples_at_the_average(tmp_path, monkeypatch, capsys):
    char_lm, seen = run(tmp_path, monkeypatch, "schedule_free")
    capsys.readouterr()
    state = seen["result"].state
    x = ft.schedule_free_eval_params(state.opt_state[1].inner_state, state.params)
    assert any(not torch.equal(x[k], state.params[k]) for k in x)  # the average is elsewhere
    batch = seen["eval_batches"][0]
    model, _, _ = ft.functionalize(
        char_lm.CharTransformer(len(x["embed.weight"]), 64, 96, heads=char_lm.HEADS, layers=2)
    )
    loss_fn = char_lm.make_loss(model)
    at_x = ft.make_eval_step(loss_fn)(state.replace(params=x), batch)["loss"]
    at_y = ft.make_eval_step(loss_fn)(state, batch)["loss"]
    got = seen["eval_step"](state, batch)["loss"]
    torch.testing.assert_close(got, at_x, rtol=0, atol=0)
    assert not torch.equal(got, at_y)
    for k in x:
        torch.testing.assert_close(seen["sample_params"][k], x[k], rtol=0, atol=0)
