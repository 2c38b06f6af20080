"""A sharded (ZeRO-1) optimizer state names its shard: rank, world size and a layout fingerprint.

Before, a rank's shard carried no identity: a checkpoint of rank 1's state restored on rank 0
(same piece shapes) trained on, and ``full_state`` gathered it, silently with the wrong rows;
a shard saved on 2 ranks resumed on 1 likewise whenever the shapes happened to agree. The
identity now lives in ``state.extra["zero_shard"]`` (plain ints and a string, which checkpoints
store as they are), and the step and ``full_state`` refuse another rank's, another world size's
or another layout's shard with a ``RankMismatchError`` naming both ranks, before any collective.
"""

from __future__ import annotations

from pathlib import Path

import gloo_jobs
import pytest
import torch

import functrain as ft
from functrain import distributed as dist

KEY = "zero_shard"


def _loss(p: dict[str, torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    return ((p["w"] * b).sum() + p["s"]) ** 2


def _params() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([1.0, -2.0, 0.5]), "s": torch.tensor(0.25)}


def _step(**kwargs) -> dist.DataParallelTrainStep:
    return dist.make_data_parallel_train_step(
        _loss, ft.adam(0.1), shard_optimizer=True, donate=False, **kwargs
    )


def _with_identity(state: ft.TrainState, **changes) -> ft.TrainState:
    return state.replace(extra={**state.extra, KEY: {**state.extra[KEY], **changes}})


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Runs the worker on 2 ranks once; each rank's results (with its exit code and stderr)."""
    return gloo_jobs.run_job(
        "_zero_identity_worker.py", 2, tmp_path_factory.mktemp("zero_identity"), timeout=30
    )


def test_init_and_shard_state_record_the_identity_as_plain_values() -> None:
    step = _step()
    state = step.init_state(_params())
    ident = state.extra[KEY]
    assert ident["rank"] == 0 and ident["world_size"] == 1
    assert type(ident["layout"]) is str and ident["layout"]
    whole = ft.TrainState.create(params=_params(), tx=ft.adam(0.1))
    assert step.shard_state(whole).extra[KEY] == ident
    assert KEY not in whole.extra  # the input state is not modified


def test_full_state_drops_the_identity_and_the_step_keeps_it() -> None:
    step = _step()
    state, _ = step(step.init_state(_params()), torch.ones(3))
    assert state.extra[KEY] == step.init_state(_params()).extra[KEY]
    full = step.full_state(state)
    assert KEY not in full.extra
    assert KEY in state.extra  # full_state does not modify its input


def test_identity_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    step = _step()
    state, _ = step(step.init_state(_params()), torch.ones(3))
    path = tmp_path / "shard.safetensors"
    ft.checkpoint.save(path, _with_identity(state, rank=1, world_size=2))
    restored = ft.checkpoint.restore(path, target=step.init_state(_params()))
    assert restored.extra[KEY]["rank"] == 1 and restored.extra[KEY]["world_size"] == 2
    # Standing for a 2-rank run's shard whose shapes match this 1-rank run's (as a 0-d
    # parameter's do): refused, naming both ranks and world sizes.
    with pytest.raises(dist.RankMismatchError, match=r"rank 1's shard \(world size 2\).*rank 0"):
        step(restored, torch.ones(3))
    with pytest.raises(dist.RankMismatchError, match="rank 1's shard"):
        step.full_state(restored)


def test_another_layout_is_refused() -> None:
    step = _step()
    state = _with_identity(step.init_state(_params()), layout="0123456789abcdef")
    with pytest.raises(dist.RankMismatchError, match="other parameter shapes"):
        step(state, torch.ones(3))


@pytest.mark.parametrize(
    "bad", ["rank 0", {"rank": 0}, {"rank": "0", "world_size": 1, "layout": "x"}]
)
def test_a_malformed_identity_is_refused(bad: object) -> None:
    step = _step()
    state = step.init_state(_params())
    state = state.replace(extra={**state.extra, KEY: bad})
    with pytest.raises(dist.RankMismatchError, match="not a shard identity"):
        step(state, torch.ones(3))


def test_one_rank_accepts_a_state_without_identity() -> None:
    # On one rank the shard is the whole state: a TrainState.create state still trains.
    step = _step()
    state, _ = step(ft.TrainState.create(params=_params(), tx=ft.adam(0.1)), torch.ones(3))
    assert int(state.step) == 1


def test_unsharded_steps_are_unchanged() -> None:
    step = dist.make_data_parallel_train_step(_loss, ft.adam(0.1), donate=False)
    state = step.init_state(_params())
    assert KEY not in state.extra
    assert KEY not in step.shard_state(state).extra


def test_two_ranks_refuse_each_others_shards(job: list[dict]) -> None:
    for rank, r in enumerate(job):
        assert r["exit"] == 0 and "error" not in r, r.get("error", r["stderr"])
        assert r["shapes_equal"]  # the checkpoint's shapes cannot tell the shards apart
        for key in ("step_error", "gather_error"):
            err = r[key]
            assert err["type"] == "RankMismatchError", (key, err)
            assert f"rank {1 - rank}'s shard" in err["message"]
            assert f"this is rank {rank} of world size 2" in err["message"]
        assert r["identity"]["rank"] == rank and r["identity"]["world_size"] == 2
        assert r["other_identity"]["rank"] == 1 - rank
    assert job[0]["identity"]["layout"] == job[1]["identity"]["layout"]


def test_two_ranks_resume_their_own_shards_bit_for_bit(job: list[dict]) -> None:
    for r in job:
        assert r["exit"] == 0 and "error" not in r, r.get("error", r["stderr"])
        assert r["resumed_same"]
        assert KEY not in r["full_extra"]
