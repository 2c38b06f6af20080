"""examples/resume_from_torch.py: a torch.optim AdamW run saved with torch.save resumes in
functrain on torch's trajectory, and the TensorBoard runs show it beside the fresh-moments
restart."""

import re

from test_examples import load_run, run_example, values


def test_resume_from_torch_fast(tmp_path):
    proc = run_example(
        "resume_from_torch.py", "--fast", "--logdir", tmp_path, "--torch-steps", 12, "--steps", 6
    )
    drift, fresh = map(
        float, re.search(r"from torch: (\S+) \(fresh moments: (\S+)\)", proc.stdout).groups()
    )
    assert drift < 1e-12 < fresh  # float64 runs: the resumed one is torch's, the fresh one not
    assert (tmp_path / "torch_checkpoint.pt").is_file()
    torch_run = load_run(tmp_path / "torch")
    resumed = load_run(tmp_path / "functrain")
    restarted = load_run(tmp_path / "functrain_fresh_moments")
    assert [e.step for e in torch_run.Scalars("train/loss")] == list(range(1, 19))
    assert [e.step for e in resumed.Scalars("train/loss")] == list(range(13, 19))
    torch_losses = values(torch_run, "train/loss")[12:]
    # TensorBoard stores float32: equal to that precision, step by step.
    assert values(resumed, "train/loss") == torch_losses
    assert values(restarted, "train/loss")[0] == torch_losses[0]  # same params before a step
    assert values(restarted, "train/loss")[1:] != torch_losses[1:]
    for run in (torch_run, resumed, restarted):
        assert [e.step for e in run.Scalars("test/loss")] == [18]
