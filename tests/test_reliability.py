"""Reliability under faults: SIGKILL at any moment, SIGTERM, a full disk, a damaged last.ckpt, NaNs, disk use.

Every scenario runs the real entry points in subprocesses and compares with an uninterrupted run: a kill
loses at most the steps (sample batches, shards) since the last write, and never what was written.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMOKE, run_cli
from lightgen_test_probes import PROBES_ENV
from subprocs import Proc
from subprocs import ckpt_dir_ok as _ckpt_dir_ok
from subprocs import same_training_state as _same_training_state
from subprocs import stops_cleanly as _stops_cleanly

pytestmark = pytest.mark.slow

SLOW_DISK = "trainer.plugins.0._target_=lightgen_test_probes.SlowDiskCheckpointIO"
TRAIN = [*SMOKE, "callbacks.sample_grid=null", "callbacks.checkpoint.every_n_train_steps=1", SLOW_DISK]


# -- 1. SIGKILL at any moment, also mid-write ------------------------------------------------------------------
def test_sigkill_at_random_moments_and_mid_write_then_rerun_ends_with_the_uninterrupted_weights(tmp_path):
    args = [*TRAIN, "trainer.max_steps=6", "data.num_samples=40"]  # 5 batches an epoch: the kills cross epochs
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli("train", *args, f"hydra.run.dir={straight}", env=PROBES_ENV)
    ckpts = killed / "checkpoints"
    rng = random.Random(15)
    moments = [
        ("mid-write", lambda: any(ckpts.glob("*.tmp"))),  # a checkpoint half written (slow-disk probe)
        ("random", lambda: (ckpts / "step_0000003.ckpt").exists()),  # then 0-0.6 s later
        ("mid-write", lambda: any(ckpts.glob("*.tmp"))),  # (stale ones are removed at start, before any write)
    ]
    kills = 0
    for name, condition in moments:
        proc = Proc("train", *args, f"hydra.run.dir={killed}")
        if proc.until(condition):
            if name == "random":
                time.sleep(rng.uniform(0.0, 0.6))
            proc.send(signal.SIGKILL)
            kills += 1
        proc.wait()
        _ckpt_dir_ok(killed)  # every checkpoint that is there loads: nothing corrupted
    assert kills == 3, "each kill landed before the run could finish"
    run_cli("train", *args, f"hydra.run.dir={killed}", env=PROBES_ENV)
    _same_training_state(straight / "checkpoints" / "last.ckpt", ckpts / "last.ckpt")
    assert not list(ckpts.glob("*.tmp")), "half-written files of killed writes are cleaned up on resume"


# -- 2. a write that fails half-way (full disk) -----------------------------------------------------------------
def test_a_full_disk_mid_write_keeps_last_ckpt_and_stops_with_one_sentence(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(
        "train",
        *SMOKE,
        "callbacks.sample_grid=null",
        "callbacks.checkpoint.every_n_train_steps=1",
        "trainer.max_steps=6",
        "trainer.plugins.0._target_=lightgen_test_probes.FullDiskCheckpointIO",
        "+trainer.plugins.0.fail_at=3",
        f"hydra.run.dir={run}",
        env=PROBES_ENV,
        check=False,
    )
    err = proc.stderr.strip()
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    line = err.splitlines()[-1]
    assert line.startswith("lightgen.train: error: writing ") and "step_0000003.ckpt failed: No space left" in line
    assert f"{run / 'checkpoints' / 'last.ckpt'} is kept" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step_0000001.ckpt",
        "step_0000002.ckpt",
    ], "no partial file is left"
    assert _ckpt_dir_ok(run) == 2


# -- 3. a damaged last.ckpt on re-run -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("four") / "run"
    run_cli("train", *SMOKE, "callbacks.sample_grid=null", "trainer.max_steps=4", f"hydra.run.dir={run}")
    return run


@pytest.mark.parametrize("damage", ["truncated", "zero-bytes", "text"])
def test_a_damaged_last_ckpt_resumes_from_the_newest_periodic_one_with_one_warning(four_steps, tmp_path, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    last = run / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.unlink()  # last.ckpt is a hard link to step_0000004.ckpt: damage only last.ckpt
    last.write_bytes({"truncated": data[: len(data) // 3], "zero-bytes": b"", "text": b"hello\n"}[damage])
    proc = run_cli("train", *SMOKE, "callbacks.sample_grid=null", "trainer.max_steps=6", f"hydra.run.dir={run}")
    warnings = [line for line in proc.stderr.splitlines() if "lightgen.train: warning:" in line]
    assert len(warnings) == 1, proc.stderr[-2000:]
    assert str(last) in warnings[0] and str(run / "checkpoints" / "step_0000004.ckpt") in warnings[0]
    assert f"resuming from {run / 'checkpoints' / 'step_0000004.ckpt'}" in proc.stdout + proc.stderr
    assert _ckpt_dir_ok(run) == 6, "the damaged last.ckpt was replaced by the resumed run's"


def test_no_readable_checkpoint_stops_instead_of_starting_afresh(four_steps, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    for path in (run / "checkpoints").glob("*.ckpt"):
        path.unlink()
        path.write_bytes(b"")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_cli("train", *SMOKE, "trainer.max_steps=6", f"hydra.run.dir={run}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("lightgen.train: error: no checkpoint in ")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# -- 4. NaN guard, and disk use -----------------------------------------------------------------------------------
def test_a_nan_batch_is_skipped_counted_and_never_checkpointed_and_keep_last_prunes(tmp_path):
    run = tmp_path / "run"
    run_cli(
        "train",
        *SMOKE,
        "callbacks.sample_grid=null",
        "callbacks.checkpoint.every_n_train_steps=1",
        "callbacks.checkpoint.keep_last=2",
        "callbacks.checkpoint.keep_every=2",
        "trainer.max_steps=6",
        "+callbacks.nan._target_=lightgen_test_probes.NaNBatches",
        "+callbacks.nan.start=2",  # the batch of step 3
        f"hydra.run.dir={run}",
        env=PROBES_ENV,
    )
    # step 3 was skipped (no checkpoint); keep_last=2 keeps 5 and 6, keep_every=2 pins 2 and 4; 1 is pruned
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt", "step_0000005.ckpt", "step_0000006.ckpt"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    adam_steps = {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert adam_steps == {5.0}, "the optimiser took 5 of the 6 steps"
    assert ckpt["callbacks"]["NonFiniteGuard"]["total"] == 1
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
    col = rows[0].index("train/nonfinite_skips")
    logged = {int(r[rows[0].index("step")]): float(r[col]) for r in rows[1:] if r[col]}
    assert logged == {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0}, "the running total of skipped steps"


def test_nan_for_n_steps_in_a_row_stops_with_one_sentence_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(
        "train",
        *SMOKE,
        "callbacks.sample_grid=null",
        "callbacks.checkpoint.every_n_train_steps=1",
        "callbacks.nonfinite.max_consecutive=3",
        "trainer.max_steps=8",
        "+callbacks.nan._target_=lightgen_test_probes.NaNBatches",
        "+callbacks.nan.start=2",
        "+callbacks.nan.count=100",
        f"hydra.run.dir={run}",
        env=PROBES_ENV,
        check=False,
    )
    err = proc.stderr.strip()
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert "not finite for 3 optimiser steps in a row (steps 3-5)" in err.splitlines()[-1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step_0000001.ckpt",
        "step_0000002.ckpt",
    ]
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == (run / "checkpoints" / "step_0000002.ckpt").read_bytes()


def test_a_short_disk_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    from lightgen.callbacks import StepCheckpoint

    cb = StepCheckpoint(str(tmp_path), every_n_train_steps=1)
    cb._last_size = 8 * 2**30  # an 8 GiB checkpoint was written before
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=0, used=0, free=5 * 2**30))
    with pytest.raises(OSError, match=r"not enough free space to write .*8.00 GiB needed, 5.00 GiB free"):
        cb._check_free_space(SimpleNamespace(is_global_zero=True), tmp_path / "step_0000002.ckpt")


# -- 5. signals ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1-in-a-SLURM-job"])
def test_sigterm_mid_training_writes_last_ckpt_at_the_end_of_the_step_and_exits(tmp_path, sig):
    run = tmp_path / "run"
    args = [
        *SMOKE,
        "callbacks.sample_grid=null",
        "trainer.max_steps=100000",
        "callbacks.checkpoint.every_n_train_steps=3",
    ]
    env = {"SLURM_JOB_ID": "4242"} if sig == signal.SIGUSR1 else None  # SLURM's warning signal (--signal=USR1@90)
    proc = Proc("train", *args, f"hydra.run.dir={run}", env=env)
    assert proc.until(lambda: (run / "checkpoints" / "step_0000003.ckpt").exists())
    proc.send(sig)
    t0 = time.monotonic()
    code, err = proc.wait(60)
    assert time.monotonic() - t0 < 20
    _stops_cleanly(code, err, "lightgen.train", sig)
    assert f"{run / 'checkpoints' / 'last.ckpt'} is kept" in err
    step = _ckpt_dir_ok(run)
    assert step >= 3 and (run / "checkpoints" / f"step_{step - step % 3:07d}.ckpt").exists()
    again = run_cli("train", *args[:-2], f"trainer.max_steps={step + 1}", f"hydra.run.dir={run}")
    assert "resuming from" in again.stdout + again.stderr and _ckpt_dir_ok(run) == step + 1


def test_sigterm_during_the_end_of_training_fid_stops_within_seconds(tmp_path):
    run = tmp_path / "run"
    args = [
        *SMOKE,
        "callbacks.sample_grid=null",
        "callbacks.fid.at_end=true",
        "callbacks.fid.num_samples=2000",
        "callbacks.fid.ref_num=64",
        f"callbacks.fid.cache_dir={tmp_path / 'refs'}",
    ]
    proc = Proc("train", *args, f"hydra.run.dir={run}")
    # last.ckpt at step 4 is written when training ends, before the FID starts
    assert proc.until(lambda: _step_of(run / "checkpoints" / "last.ckpt") == 4)
    time.sleep(1.0)
    proc.send(signal.SIGTERM)
    t0 = time.monotonic()
    code, err = proc.wait(60)
    assert time.monotonic() - t0 < 10, "the FID phase stops within seconds"
    _stops_cleanly(code, err, "lightgen.train")
    assert _ckpt_dir_ok(run) == 4
    assert not list((tmp_path / "refs").glob("*.tmp")) if (tmp_path / "refs").exists() else True


def _step_of(path: Path) -> int | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    except Exception:
        return None


@pytest.fixture(scope="module")
def smoke_ckpt(four_steps) -> Path:
    return four_steps / "checkpoints" / "last.ckpt"


def test_sample_stopped_by_sigterm_and_sigkill_resumes_to_the_uninterrupted_npz(smoke_ckpt, tmp_path):
    args = [f"ckpt={smoke_ckpt}", "num_samples=96", "batch_size=8", "steps=20"]
    run_cli("sample", *args, f"out={tmp_path / 'straight'}")
    out = tmp_path / "stopped"
    parts = out / ".parts"
    for sig, n in ((signal.SIGTERM, 2), (signal.SIGKILL, 5)):
        proc = Proc("sample", *args, f"out={out}")
        assert proc.until(lambda n=n: len(list(parts.glob("batch_*.npy"))) >= n)
        proc.send(sig)
        t0 = time.monotonic()
        code, err = proc.wait(60)
        assert time.monotonic() - t0 < 10
        if sig == signal.SIGTERM:
            _stops_cleanly(code, err, "lightgen.sample")
            assert "finished batch file(s) kept in" in err
        assert not (out / "samples.npz").exists()
    run_cli("sample", *args, f"out={out}")
    a, b = np.load(tmp_path / "straight" / "samples.npz"), np.load(out / "samples.npz")
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])


def test_extract_killed_and_terminated_resumes_with_no_shard_lost_or_duplicated(tmp_path):
    args = [
        "data=synthetic",
        "first_stage=identity",
        "first_stage._target_=lightgen_test_probes.SlowIdentity",
        "+first_stage.delay=0.1",
        "shard_size=16",
        "batch_size=8",
        "progress=false",
    ]
    run_cli("extract", *args, f"out={tmp_path / 'straight'}", f"hydra.run.dir={tmp_path}/h1", env=PROBES_ENV)
    out = tmp_path / "stopped"
    for sig, n in ((signal.SIGKILL, 2), (signal.SIGTERM, 5)):
        proc = Proc("extract", *args, f"out={out}", f"hydra.run.dir={tmp_path}/h2")
        assert proc.until(lambda n=n: len(list(out.glob("latents_*.npy"))) >= n)
        proc.send(sig)
        code, err = proc.wait(60)
        if sig == signal.SIGTERM:
            _stops_cleanly(code, err, "lightgen.extract")
            assert "finished shard file(s) kept in" in err
    proc = run_cli("extract", *args, f"out={out}", f"hydra.run.dir={tmp_path}/h2", env=PROBES_ENV)
    straight = {p.name: p.read_bytes() for p in (tmp_path / "straight").iterdir() if p.suffix == ".npy"}
    resumed = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".npy"}
    assert resumed == straight and len(straight) == 2 * 16, "256 samples: 16 shards of latents, 16 of labels"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == json.loads((tmp_path / "straight" / "manifest.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "straight").iterdir())


def _has_open(pid: int, path: Path) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.readlink(fd) == str(path) for fd in fds.iterdir())
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see the file being read")
def test_evaluate_stops_within_seconds_on_sigterm_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(0)
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=rng.integers(0, 256, (400, 32, 32, 3), dtype=np.uint8))
    # a small reference (its statistics come first), then 400 samples to be interrupted in
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    proc = Proc("evaluate", f"samples={samples}", f"ref={tmp_path / 'ref.npz'}", "batch_size=16")
    assert proc.until(lambda: _has_open(proc.p.pid, samples)), "evaluate started reading the samples"
    time.sleep(0.5)
    proc.send(signal.SIGTERM)
    t0 = time.monotonic()
    code, err = proc.wait(60)
    assert time.monotonic() - t0 < 10
    _stops_cleanly(code, err, "lightgen.evaluate")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz", "samples.npz"], "no results, no partial file"


def test_sigterm_to_rank_0_of_a_ddp_run_stops_both_ranks_at_one_step_and_resumes_bit_exactly(tmp_path):
    """What ``timeout`` or a scheduler does to ``trainer=ddp_cpu``: rank 0 passes the signal on, the ranks agree
    at the end of the step, last.ckpt holds that step, and the resumed run equals an uninterrupted one."""
    args = [*SMOKE, "callbacks.sample_grid=null", "trainer=ddp_cpu", "callbacks.checkpoint.every_n_train_steps=3"]
    run = tmp_path / "run"
    proc = Proc("train", *args, "trainer.max_steps=100000", f"hydra.run.dir={run}")
    assert proc.until(lambda: (run / "checkpoints" / "step_0000003.ckpt").exists())
    proc.send(signal.SIGTERM)
    t0 = time.monotonic()
    code, err = proc.wait(60)
    assert time.monotonic() - t0 < 20
    _stops_cleanly(code, err, "lightgen.train")
    step = _ckpt_dir_ok(run)
    assert step >= 3
    end = [f"trainer.max_steps={step + 2}"]
    run_cli("train", *args, *end, f"hydra.run.dir={run}")
    run_cli("train", *args, *end, f"hydra.run.dir={tmp_path / 'straight'}")
    _same_training_state(tmp_path / "straight" / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")


def test_a_full_disk_during_extraction_keeps_the_finished_shards_and_names_the_file(tmp_path, monkeypatch, capsys):
    import errno

    from conftest import compose

    from lightgen.extract import extract
    from lightgen.utils.errors import work_errors

    out = tmp_path / "lat"
    cfg = compose(
        ["data=synthetic", "first_stage=identity", f"out={out}", "shard_size=64", "progress=false"], "extract"
    )
    real, calls = np.lib.format.write_array, [0]

    def full_after_two_shards(f, array, *args, **kwargs):
        calls[0] += 1
        if calls[0] > 4:  # latents + labels of two shards, then the disk is full half-way through a write
            f.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(f, array, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", full_after_two_shards)
    with pytest.raises(SystemExit) as stop, work_errors("lightgen.extract"):
        extract(cfg)
    assert stop.value.code == 1
    line = capsys.readouterr().err.strip()
    assert (
        line.startswith("lightgen.extract: error: writing ") and "latents_r00_00002.npy failed: No space left" in line
    )
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".npy"}
    assert sorted(kept) == [
        "labels_r00_00000.npy",
        "labels_r00_00001.npy",
        "latents_r00_00000.npy",
        "latents_r00_00001.npy",
    ]
    assert not list(out.glob("*.tmp"))
    monkeypatch.setattr(np.lib.format, "write_array", real)
    extract(cfg)  # the disk has space again: the same command finishes, the two shards kept as they were
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in kept} == kept
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 256
