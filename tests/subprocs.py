"""Subprocesses of the real entry points for the fault tests: start, wait for a condition, signal, compare."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from conftest import ROOT
from lightgen_test_probes import PROBES_ENV


class Proc:
    """A ``python -m lightgen.<entry>`` subprocess whose stderr is collected by a thread while it runs."""

    def __init__(
        self, entry: str, *args: str, env: dict | None = None, launcher: tuple[str, ...] = (), session: bool = False
    ):
        """``python [launcher...] -m lightgen.<entry> args``, e.g. launcher ``("-m", "torch.distributed.run", ...)``."""
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **PROBES_ENV, **(env or {})}
        self.p = subprocess.Popen(
            [sys.executable, *launcher, "-m", f"lightgen.{entry}", *args],
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=session,  # its own process group: send_group() reaches a launcher and its workers
        )
        self.err: list[str] = []
        self._reader = threading.Thread(target=lambda: self.err.extend(self.p.stderr), daemon=True)
        self._reader.start()

    def until(self, condition, timeout: float = 120.0) -> bool:
        """Wait until ``condition()`` holds (True) or the process ended (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.p.poll() is not None:
                return False
            time.sleep(0.005)
        raise AssertionError(f"condition not reached in {timeout} s; stderr: {''.join(self.err)[-2000:]}")

    def send(self, sig: int) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def send_group(self, sig: int) -> None:
        """The signal to the process and everything it started (what SLURM and most schedulers do)."""
        if self.p.poll() is None:
            os.killpg(self.p.pid, sig)

    def wait(self, timeout: float = 120.0) -> tuple[int, str]:
        code = self.p.wait(timeout)
        self._reader.join(10)
        return code, "".join(self.err)


def stops_cleanly(code: int, err: str, prog: str, sig=signal.SIGTERM) -> None:
    assert code == 128 + sig, (code, err[-3000:])
    lines = [line for line in err.splitlines() if line.startswith(prog)]
    assert lines and f"stopped by {signal.Signals(sig).name}" in lines[-1], err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def weights(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return {"step": ckpt["global_step"], **ckpt["state_dict"], "adam": ckpt["optimizer_states"][0]["state"]}


def same_training_state(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa["step"] == wb["step"]
    for k in wa:
        if k not in ("step", "adam"):
            assert torch.equal(wa[k], wb[k]), k
    for i, state in wa["adam"].items():
        for name, value in state.items():
            assert torch.equal(value, wb["adam"][i][name]), (i, name)


def ckpt_dir_ok(run: Path) -> int | None:
    """Every checkpoint present loads; returns last.ckpt's step (None without one)."""
    step = None
    for path in sorted((run / "checkpoints").glob("*.ckpt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if path.name == "last.ckpt":
            step = ckpt["global_step"]
    return step


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The trainer settings of a multi-node run on CPU, per launcher (the cluster configs with gloo instead of NCCL).
CLUSTER_TRAINER = {
    "slurm": [
        "trainer=slurm",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.strategy.process_group_backend=gloo",
    ],
    "torchrun": ["trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2"],
}


def scontrol_stub(bin_dir: Path) -> Path:
    """An ``scontrol`` on PATH that appends its arguments to ``$SCONTROL_LOG`` (one line per call)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    stub = bin_dir / "scontrol"
    stub.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    stub.chmod(0o755)
    return stub


def start_nodes(launcher: str, args: list[str], root: Path, job_id: str, nodes: int = 2, env=None) -> list[Proc]:
    """``nodes`` processes on 127.0.0.1, each a "node" with one process, as ``srun`` (a simulated SLURM job: the
    variables srun sets, an ``scontrol`` stub logging to ``root/scontrol.log``) or ``torchrun`` (static
    rendezvous, ``--rdzv-id=job_id``) would start them; ``LIGHTGEN_ROOT=root`` is the shared file system."""
    port = free_port()
    procs = []
    for rank in range(nodes):
        node_env = {"LIGHTGEN_ROOT": str(root), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **(env or {})}
        cmd = ()
        if launcher == "slurm":
            bin_dir = root / "bin"
            scontrol_stub(bin_dir)
            node_env.update(
                PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                SCONTROL_LOG=str(root / "scontrol.log"),
                SLURM_JOB_ID=job_id,
                SLURM_JOB_NAME="lightgen-test",
                SLURM_NTASKS=str(nodes),
                SLURM_NNODES=str(nodes),
                SLURM_JOB_NUM_NODES=str(nodes),
                SLURM_NTASKS_PER_NODE="1",
                SLURM_PROCID=str(rank),
                SLURM_NODEID=str(rank),
                SLURM_LOCALID="0",
                SLURM_NODELIST="localhost",
            )
        else:
            cmd = ("-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc-per-node=1", f"--node-rank={rank}")
            cmd += ("--master-addr=127.0.0.1", f"--master-port={port}", f"--rdzv-id={job_id}", "--max-restarts=0")
        procs.append(Proc("train", *CLUSTER_TRAINER[launcher], *args, env=node_env, launcher=cmd, session=True))
    return procs
