"""Cluster runs proven on one machine: 2 processes as 2 "nodes" on 127.0.0.1 (gloo), started as a SLURM job's
``srun`` (the variables srun sets and an ``scontrol`` stub) or as ``torchrun --nnodes 2`` would start them, on a
shared ``LIGHTGEN_ROOT``. Each scenario is compared with an uninterrupted 2-node run: a stop signal costs at most
the current step, a lost node the steps since the last checkpoint, and a re-run of the same command resumes in the
same run directory and ends with the same weights and AdamW state, bit for bit.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from conftest import SMOKE
from subprocs import ckpt_dir_ok, same_training_state, start_nodes, stops_cleanly

pytestmark = pytest.mark.slow

# at most 10 steps/s (0.1 s per batch in the first stage), so a signal sent after step 5 lands well before END
SLOW = ["first_stage._target_=lightgen_test_probes.SlowIdentity", "+first_stage.delay=0.1"]
ARGS = [*SMOKE, "callbacks.sample_grid=null", "callbacks.checkpoint.every_n_train_steps=5", *SLOW]
END = 20


def run_dir(root: Path, job: str) -> Path:
    return root / "runs" / "train" / job


def finish(procs, timeout: float = 300) -> None:
    for p in procs:
        code, err = p.wait(timeout)
        assert code == 0, err[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """last.ckpt of a 2-node run (torchrun) trained straight to END."""
    root = tmp_path_factory.mktemp("straight")
    finish(start_nodes("torchrun", [*ARGS, f"trainer.max_steps={END}"], root, "straight"))
    return run_dir(root, "straight") / "checkpoints" / "last.ckpt"


def wait_for_step_5(procs, root: Path, job: str) -> None:
    ckpt = run_dir(root, job) / "checkpoints" / "step_0000005.ckpt"
    assert procs[0].until(ckpt.exists, timeout=240), procs[0].wait(60)[1][-3000:]


SUBMITIT = {"SUBMITIT_EXECUTOR": "slurm"}  # what a job started by hydra/launcher=slurm (submitit) has


@pytest.mark.parametrize(
    "launcher, sig, env",
    [
        ("slurm", signal.SIGUSR1, {}),
        ("slurm", signal.SIGUSR2, SUBMITIT),
        ("slurm", signal.SIGTERM, {}),
        ("torchrun", signal.SIGTERM, {}),
    ],
    ids=["slurm-SIGUSR1-requeue", "submitit-SIGUSR2-requeue", "slurm-SIGTERM", "torchrun-SIGTERM"],
)
def test_a_stop_signal_to_every_node_saves_that_step_once_and_the_rerun_ends_bit_identical(
    uninterrupted, tmp_path, launcher, sig, env
):
    """What ``sbatch --signal=USR1@90 --requeue`` (SIGUSR1), ``scancel`` / a time limit / pre-emption (SIGTERM)
    do, and submitit's SIGUSR2 in a job of a ``hydra/launcher=slurm`` sweep (lightgen takes it over from
    submitit: one owner of the requeue): the signal reaches every process of every node (for torchrun: the agent
    and its worker, one process group). The ranks agree at the end of the step, rank 0 writes last.ckpt, SLURM's
    requeue is asked once (not for SIGTERM), every process exits within seconds, and re-running the same command
    -- the requeued job, or torchrun again with the same --rdzv-id -- resumes in the same run directory and ends
    as the uninterrupted run.
    """
    root, job = tmp_path / "shared", "4242"
    procs = start_nodes(launcher, [*ARGS, "trainer.max_steps=100000"], root, job, env=env)
    wait_for_step_5(procs, root, job)
    for p in procs:
        p.send_group(sig)
    t0 = time.monotonic()
    results = [p.wait(60) for p in procs]
    seconds = time.monotonic() - t0
    assert seconds < 20, f"the nodes took {seconds:.1f} s to stop"
    for code, err in results:
        if launcher == "slurm":  # the task is lightgen itself
            stops_cleanly(code, err, "lightgen.train", sig)
        else:  # torchrun's agent reports the signal its own way; its worker said what it kept
            assert f"lightgen.train: stopped by {signal.Signals(sig).name}" in err, err[-3000:]
    step = ckpt_dir_ok(run_dir(root, job))
    assert step is not None and 5 <= step < END, step
    print(f"{launcher} {signal.Signals(sig).name}: all nodes exited {seconds:.1f} s after the signal, at step {step}")
    requeues = (root / "scontrol.log").read_text().splitlines() if (root / "scontrol.log").exists() else []
    assert requeues == (["requeue 4242"] if sig != signal.SIGTERM else []), requeues

    finish(start_nodes(launcher, [*ARGS, f"trainer.max_steps={END}"], root, job, env=env))
    assert sorted(p.name for p in (root / "runs" / "train").iterdir()) == [job], "one run directory, re-used"
    same_training_state(uninterrupted, run_dir(root, job) / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["node-died", "node-hung"])
def test_a_lost_node_stops_the_other_with_one_sentence_and_the_rerun_resumes(uninterrupted, tmp_path, fault):
    """SIGKILL to one node (a node that died): the other leaves its next collective at once; SIGSTOP (a node that
    hangs): the other gives up after trainer.strategy.timeout (10 s here). Either way it exits 1 with one line
    naming the newest checkpoint, every checkpoint written stays readable, and (died) the re-run resumes from the
    newest one and ends as the uninterrupted run."""
    root, job = tmp_path / "shared", "777"
    timeout = 30 if fault == signal.SIGKILL else 10
    args = [*ARGS, f"trainer.strategy.timeout.seconds={timeout}"]
    procs = start_nodes("slurm", [*args, "trainer.max_steps=100000"], root, job)
    wait_for_step_5(procs, root, job)
    procs[1].send_group(fault)
    t0 = time.monotonic()
    code, err = procs[0].wait(90)
    seconds = time.monotonic() - t0
    procs[1].send_group(signal.SIGKILL)
    assert seconds < timeout + 15, seconds
    print(f"lost node ({signal.Signals(fault).name}): the other exited {seconds:.1f} s later")
    lines = [line for line in err.splitlines() if line.startswith("lightgen.train")]
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert lines and "lost contact with another process of the run" in lines[-1], err[-3000:]
    assert "re-run the same command to resume" in lines[-1], lines[-1]
    ckpt_dir_ok(run_dir(root, job))  # every checkpoint file there loads (last.ckpt may not be linked yet)
    assert (run_dir(root, job) / "checkpoints" / "step_0000005.ckpt").is_file()
    if fault == signal.SIGKILL:
        finish(start_nodes("slurm", [*args, f"trainer.max_steps={END}"], root, job))
        same_training_state(uninterrupted, run_dir(root, job) / "checkpoints" / "last.ckpt")


def test_a_sweep_through_the_submitit_launcher_writes_both_jobs_and_its_summary(tmp_path):
    """``hydra/launcher=submitit_local`` runs the same launcher code as ``hydra/launcher=slurm`` (each job in its
    own process, started by submitit): both jobs train, and the sweep summary lists both."""
    import csv

    from conftest import run_cli

    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", *SMOKE, "callbacks.sample_grid=null", "seed=0,1"]
    run_cli("train", *args, f"hydra.sweep.dir={sweep}", env={"LIGHTGEN_ROOT": str(tmp_path)})
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert sorted(r["seed"] for r in rows) == ["0", "1"] and {r["status"] for r in rows} == {"ok"}, rows
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    assert (sweep / "summary.md").is_file()
