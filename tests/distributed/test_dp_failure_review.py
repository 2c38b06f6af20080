"""Second look at the data-parallel step's failure agreement (review of its edge cases).

A 2-rank gloo job (``_dp_failure_review_worker.py``) makes rank 1's (or both ranks') own part of
a step raise in ways the first tests did not: an error whose ``str`` raises, a 10 MB message, an
unpicklable error, a chained error with notes, different errors on both ranks, a
``NonFiniteError`` on one rank while the other's own checks raise first, a failure after the
aux metrics' names changed, seeded runs of failing and healthy calls (random failing ranks and
batch sizes, empty batches, ZeRO-1, DP-SGD with Poisson-sized batches, a ``grad_stats``
accumulator, ``donate=False``) compared bit for bit with runs that never failed, ``compile=``
after a first-call failure, and a rank that leaves a call alone (``KeyboardInterrupt`` or
``GeneratorExit`` mid-step, a failure it cannot tell the others of). Every failing call must
raise on every rank, promptly, with no collective left behind; a rank that left a call alone
must refuse its later calls instead of pairing their collectives with the others' pending ones.
"""

from __future__ import annotations

from pathlib import Path

import _dp_failure_review_worker as w
import gloo_jobs
import pytest

import functrain as ft
from functrain.distributed import DistributedStepError, _agree

DSE = "functrain.distributed.errors.DistributedStepError"
NOTE = "rank(s) [1], this rank (1) among them"  # the failing rank's note
PROMPT = 15.0  # seconds for a failing call: far below the group's timeout (30 s)
REFUSED = "refused on rank"


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out: Path = tmp_path_factory.mktemp("dp_failure_review")
    return gloo_jobs.run_job("_dp_failure_review_worker.py", 2, out, timeout=150)


def test_the_job_exits_cleanly(job) -> None:
    # A collective mismatch aborts a gloo process (SIGABRT) instead of raising.
    assert [r["exit"] for r in job] == [0, 0], [r["stderr"][-2000:] for r in job]


def _failed_on_rank_1(name: str, job: list[dict], kind: str, text: str) -> tuple[dict, dict]:
    """Rank 1 raised its own ``kind`` error with the note, rank 0 a DistributedStepError
    naming rank 1, ``kind``'s name and ``text``; both promptly, with no collective left
    behind, the state untouched, and the retry went on as a fresh run."""
    r0, r1 = gloo_jobs.probe_results(job, name)
    own, other = r1["raised"], r0["raised"]
    assert own is not None and other is not None, (r0, r1)
    assert own["type"] == kind, own
    assert any(NOTE in note for note in own["notes"]), own["notes"]
    assert other["type"] == DSE, other
    assert "rank(s) [1]" in other["message"] and kind.rsplit(".", 1)[-1] in other["message"]
    assert text in other["message"], other
    for r in (r0, r1):
        assert r["seconds"] < PROMPT, r["seconds"]
        assert r["in_step"] == 3.0 and r["untouched"] is True and r["same_as_fresh"] is True
    return own, other


@pytest.mark.parametrize("name", ["unrenderable_later", "unrenderable_first"])
def test_an_error_whose_message_cannot_be_rendered(job, name: str) -> None:
    # Old code: describing it raised on rank 1 before the exchange rank 0 waited in (a hang).
    _failed_on_rank_1(name, job, "__main__.Unrenderable", "could not be rendered")


def test_a_huge_message_travels_as_its_first_600_characters(job) -> None:
    own, other = _failed_on_rank_1("huge_message", job, "builtins.RuntimeError", "x" * 600)
    assert own["length"] == w.HUGE  # the failing rank's own error is unchanged
    assert other["length"] < 2000, other["length"]


def test_an_unpicklable_error(job) -> None:
    _failed_on_rank_1("unpicklable", job, "__main__.Unpicklable", "an unpicklable error")


def test_a_chained_error_keeps_its_cause_notes_and_traceback(job) -> None:
    own, _ = _failed_on_rank_1("chained_with_notes", job, "builtins.ValueError", "the outer error")
    assert own["cause"] == "KeyError"
    assert own["notes"][0] == "a note added by the user's code" and len(own["notes"]) == 2
    assert own["frames"][-1] == "_maybe_fail"  # raised where the loss raised it


def test_different_errors_on_both_ranks(job) -> None:
    r0, r1 = gloo_jobs.probe_results(job, "different_types")
    for r, kind in ((r0, "builtins.ValueError"), (r1, "builtins.IndexError")):
        assert r["raised"]["type"] == kind, r
        assert any("rank(s) [0, 1]" in note for note in r["raised"]["notes"]), r
        assert r["in_step"] == 3.0 and r["untouched"] is True and r["same_as_fresh"] is True


def test_nonfinite_error_on_every_rank(job) -> None:
    for r in gloo_jobs.probe_results(job, "nonfinite"):
        assert r["both_skipped"] == 1
        assert r["both"]["raised"]["type"] == "functrain.train.faults.NonFiniteError", r
        assert "max_consecutive_skips=0" in r["both"]["raised"]["message"]
        assert r["both"]["in_step"] == 3.0


def test_nonfinite_error_on_one_rank_while_the_other_raises_first(job) -> None:
    # Old code: rank 0 raised NonFiniteError alone while rank 1 joined the collectives, and
    # the next collective mismatched (a gloo abort).
    r0, r1 = gloo_jobs.probe_results(job, "nonfinite")
    assert r0["mixed"]["raised"]["type"] == "functrain.train.faults.NonFiniteError", r0
    kind = ft.tree.TreeMismatchError
    assert r1["mixed"]["raised"]["type"] == f"{kind.__module__}.{kind.__qualname__}", r1
    for r in (r0, r1):
        assert any("rank(s) [0, 1]" in n for n in r["mixed"]["raised"]["notes"]), r
        assert r["mixed"]["seconds"] < PROMPT and r["mixed"]["in_step"] == 3.0


def test_a_failure_after_the_aux_metrics_gained_a_name(job) -> None:
    # Old code: rank 1 joined on zeros shaped as the first call's metrics (one fewer), the
    # counts' all-reduce mismatched in size and rank 0 waited until the group's timeout.
    r0, r1 = gloo_jobs.probe_results(job, "aux_names_change")
    assert r1["raised"]["type"] == "builtins.RuntimeError", r1
    assert r0["raised"]["type"] == DSE and "rank(s) [1]" in r0["raised"]["message"], r0
    for r in (r0, r1):
        assert r["seconds"] < PROMPT and r["in_step"] == 3.0
        assert "late" in r["names"]


def test_a_failure_on_the_call_after_a_rank_mismatch(job) -> None:
    r0, r1 = gloo_jobs.probe_results(job, "after_mismatch")
    for r in (r0, r1):
        assert r["mismatch"]["raised"]["type"] == "functrain.distributed.errors.RankMismatchError"
        assert r["untouched"] is True and r["same_as_fresh"] is True and r["in_step"] == 3.0
    assert r1["failure"]["raised"]["type"] == "builtins.RuntimeError", r1
    assert any(NOTE in n for n in r1["failure"]["raised"]["notes"]), r1
    assert r0["failure"]["raised"]["type"] == DSE and "after the mismatch" in str(r0["failure"])


@pytest.mark.parametrize("config", sorted(w.SEEDED))
@pytest.mark.parametrize("seed", [1, 2])
def test_seeded_failing_and_healthy_calls(job, config: str, seed: int) -> None:
    r0, r1 = (r[f"{config}/{seed}"] for r in gloo_jobs.probe_results(job, "seeded_runs"))
    # Every call either succeeded on every rank or raised on every rank.
    assert [o == "ok" for o in r0["outcomes"]] == [o == "ok" for o in r1["outcomes"]], (r0, r1)
    assert "ok" in r0["outcomes"] and set(r0["outcomes"]) - {"ok"}, r0["outcomes"]
    for r in (r0, r1):
        assert r["untouched"] is True  # every failed call left its state as it was
        assert r["same_as_fresh"] is True and r["metrics_as_fresh"] is True
        assert r["in_step"] == 3.0


def test_compile_after_a_first_call_failure_compiles_as_a_run_that_never_failed(job) -> None:
    r0, r1 = gloo_jobs.probe_results(job, "compiled_after_first_failure")
    assert r1["failure"]["raised"]["type"] == "builtins.IndexError", r1
    assert r0["failure"]["raised"]["type"] == DSE, r0
    for r in (r0, r1):
        assert r["graphs"] == r["fresh_graphs"], r
        assert r["same_as_fresh"] is True


LONE = {
    "interrupt_later": ("builtins.KeyboardInterrupt", True),
    "interrupt_first": ("builtins.KeyboardInterrupt", True),
    "generator_exit": ("builtins.GeneratorExit", False),
    "device_failure": ("builtins.IndexError", True),
}


@pytest.mark.parametrize("name", sorted(LONE))
def test_a_rank_that_left_a_call_alone_refuses_its_later_calls(job, name: str) -> None:
    kind, sharded = LONE[name]
    r0, r1 = (r[name] for r in gloo_jobs.probe_results(job, "lone_exits"))
    # Rank 1: its error propagated at once, told to nobody.
    assert r1["first"]["raised"]["type"] == kind, r1
    assert not r1["first"]["raised"]["notes"] and r1["first"]["seconds"] < 2.0
    # Rank 0 waited in that call's collectives until its group's timeout.
    assert r0["first"]["raised"]["type"] == DSE, r0
    assert r0["first"]["seconds"] < w.SHORT_TIMEOUT + PROMPT
    # Old code: rank 1's next call paired with rank 0's pending one (both "succeeded").
    for r in (r0, r1):
        again = r["again"]["raised"]
        assert again is not None and again["type"] == DSE, r
        assert REFUSED in again["message"], again
        assert r["again"]["seconds"] < 1.0
        if sharded:  # full_state's gather, refused too (unsharded: no collective)
            assert r["full_state"]["type"] == DSE and REFUSED in r["full_state"]["message"]
            assert r["full_state_seconds"] < 1.0
        else:
            assert r["full_state"] is None
    assert kind.rsplit(".", 1)[-1] in r1["again"]["raised"]["message"]


# -- in one process: the error exchange's own edge cases ---------------------------------


def _chained() -> ValueError:
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise ValueError("outer") from inner
    except ValueError as err:
        return err


def test_a_lost_exchange_raises_the_error_with_its_cause_and_context(monkeypatch) -> None:
    # Old code: ``raise error from None`` dropped the error's cause (and its context).
    def lost(*args, **kwargs):
        raise DistributedStepError("the peer died")

    monkeypatch.setattr(_agree, "_gather", lost)
    err = _chained()
    with pytest.raises(ValueError, match="outer") as info:
        _agree.check_no_rank_failed(err, None, "the test's part")
    assert info.value is err
    assert isinstance(err.__cause__, KeyError) and err.__suppress_context__
    assert "telling the other ranks failed too" in err.__notes__[-1]
    assert "the peer died" in err.__notes__[-1]
    try:
        try:
            raise OSError("the earlier error")
        except OSError:
            raise RuntimeError("raised while handling it")
    except RuntimeError as err:
        implicit = err
    with pytest.raises(RuntimeError):
        _agree.check_no_rank_failed(implicit, None, "the test's part")
    assert isinstance(implicit.__context__, OSError)  # not replaced by the exchange's error


def test_a_lost_exchange_is_reported_before_anything_is_raised(monkeypatch) -> None:
    def lost(*args, **kwargs):
        raise DistributedStepError("the peer died")

    monkeypatch.setattr(_agree, "_gather", lost)
    seen: list[BaseException] = []
    with pytest.raises(DistributedStepError, match="the peer died"):
        _agree.check_no_rank_failed(None, None, "the test's part", on_lost=seen.append)
    with pytest.raises(KeyError):
        _agree.check_no_rank_failed(KeyError("own"), None, "x", on_lost=seen.append)
    assert [str(e) for e in seen] == ["the peer died"] * 2


def test_an_error_whose_notes_are_not_a_list_is_still_raised(monkeypatch) -> None:
    monkeypatch.setattr(_agree, "_gather", lambda mine, group, what: [mine])
    err = IndexError("own")
    err.__notes__ = ("not a list",)  # add_note refuses it with a TypeError
    with pytest.raises(IndexError, match="own"):
        _agree.check_no_rank_failed(err, None, "the test's part")


def test_describing_an_error_never_raises() -> None:
    assert _agree._describe(w.Unrenderable()).startswith("_dp_failure_review_worker.")
    assert "could not be rendered" in _agree._describe(w.Unrenderable())
    assert _agree._describe(KeyboardInterrupt()) == "KeyboardInterrupt"
    described = _agree._describe(RuntimeError("y" * w.HUGE))
    assert described.endswith("[...]") and len(described) < 700
