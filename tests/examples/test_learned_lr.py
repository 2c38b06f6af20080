"""examples/learned_lr.py: hypergradient descent through train steps raises a too-small learning
rate, beats the fixed one on the validation split, and logs both runs to TensorBoard."""

import itertools
import math

from test_examples import load_run, run_example, values


def test_learned_lr_fast(tmp_path):
    proc = run_example("learned_lr.py", "--fast", "--logdir", tmp_path, "--outer-steps", 8)
    assert "learning rate 0.001 ->" in proc.stdout
    learned, fixed = load_run(tmp_path / "learned"), load_run(tmp_path / "fixed")
    assert {"train/loss", "train/lr", "val/loss", "meta/hypergradient"} <= set(
        learned.Tags()["scalars"]
    )
    assert [e.step for e in learned.Scalars("val/loss")] == [5 * i for i in range(1, 9)]
    lr = values(learned, "train/lr")
    assert all(b > a for a, b in itertools.pairwise(lr))  # each hypergradient said "larger"
    assert all(h < 0 for h in values(learned, "meta/hypergradient"))
    assert all(math.isclose(v, 1e-3, rel_tol=1e-6) for v in values(fixed, "train/lr"))
    assert values(learned, "val/loss")[-1] < values(fixed, "val/loss")[-1]
