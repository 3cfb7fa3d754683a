"""Image and plot helpers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from lightgen.utils.image_grids import make_grid_array, to_uint8
from lightgen.utils.plots import plot_curves, smooth


def test_to_uint8_rounds_like_dit_sample_ddp():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 6)
    expected = np.clip(127.5 * x.numpy() + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(to_uint8(x).numpy(), expected)


def test_grid_puts_nrow_images_per_row():
    imgs = torch.stack([torch.full((1, 4, 4), v) for v in torch.linspace(-1, 1, 6)])
    grid = make_grid_array(imgs, nrow=3, padding=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1)
    assert grid[1, 1] == to_uint8(imgs[:1])[0, 0, 0, 0] and grid[6, 11] == to_uint8(imgs[5:])[0, 0, 0, 0]


def test_plot_curves_draws_each_series(tmp_path):
    path = plot_curves({"a": ([0, 1, 2], [1.0, 0.5, 0.2]), "b": ([0, 2], [0.3, 0.9])}, tmp_path / "p.png")
    arr = np.asarray(Image.open(path))
    assert arr.shape == (420, 720, 3)
    assert ((arr == (31, 119, 180)).all(-1)).sum() > 50 and ((arr == (255, 127, 14)).all(-1)).sum() > 50
    with pytest.raises(ValueError):
        plot_curves({}, tmp_path / "q.png")
    assert smooth([1.0, 0.0], 0.5) == [1.0, 0.5]


def test_plot_curves_logx_spaces_decades_evenly(tmp_path):
    blue = (31, 119, 180)
    log = np.asarray(Image.open(plot_curves({"a": ([10, 100, 1000], [3.0, 1.0, 2.0])}, tmp_path / "l.png", logx=True)))
    lin = np.asarray(Image.open(plot_curves({"a": ([1, 2, 3], [3.0, 1.0, 2.0])}, tmp_path / "n.png")))
    assert ((log == blue).all(-1) == (lin == blue).all(-1)).all()  # the same curve; only tick labels differ
    with pytest.raises(ValueError, match="positive"):
        plot_curves({"a": ([0, 1], [1.0, 2.0])}, tmp_path / "z.png", logx=True)


LAUNCH_VARS = (
    "LIGHTGEN_RUN_ID",
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "TORCHELASTIC_RUN_ID",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "SLURM_PROCID",
    "SLURM_CPUS_PER_TASK",
    "SLURM_NTASKS_PER_NODE",
    "OMP_NUM_THREADS",
)


@pytest.fixture
def bare_env(monkeypatch):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(threads)


def test_the_run_id_is_the_launchers_job_id_in_order_of_precedence(bare_env):
    from lightgen.utils import launch

    stamp = launch.run_id()
    assert stamp == launch.run_id(), "one timestamp per process"
    bare_env.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun without --rdzv-id: no shared id
    assert launch.run_id() == stamp
    bare_env.setenv("TORCHELASTIC_RUN_ID", "exp7")
    assert launch.run_id() == "exp7"
    bare_env.setenv("SLURM_JOB_ID", "1234")
    assert launch.run_id() == "1234"
    bare_env.setenv("SLURM_ARRAY_JOB_ID", "1200")
    bare_env.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert launch.run_id() == "1200_3", "an array task keeps its id across requeues; SLURM_JOB_ID is per task"
    bare_env.setenv("LIGHTGEN_RUN_ID", "mine")
    assert launch.run_id() == "mine"


def test_a_multi_process_torchrun_run_without_a_shared_id_is_refused_before_anything_is_written(bare_env, tmp_path):
    from conftest import run_cli

    from lightgen.utils import launch
    from lightgen.utils.errors import LightgenConfigError

    bare_env.setenv("TORCHELASTIC_RUN_ID", "none")
    bare_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(LightgenConfigError, match="--rdzv-id"):
        launch.check_run_id(["experiment=smoke"])
    launch.check_run_id(["paths.run_id=exp7"])  # given: fine
    launch.check_run_id(["hydra.run.dir=/somewhere"])
    env = {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2", "LIGHTGEN_ROOT": str(tmp_path)}
    proc = run_cli("train", "experiment=smoke", check=False, env=env)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "torchrun --rdzv-id=<name>" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == [], "no run directory was created"


def test_threads_per_process_follow_the_launcher_unless_omp_num_threads_is_set(bare_env):
    from lightgen.utils import launch

    assert launch.configure_threads() is None, "not started by a launcher: torch's default"
    bare_env.setenv("SLURM_PROCID", "0")
    bare_env.setenv("SLURM_CPUS_PER_TASK", "3")
    assert launch.configure_threads() == 3 == torch.get_num_threads()
    bare_env.delenv("SLURM_CPUS_PER_TASK")
    bare_env.delenv("OMP_NUM_THREADS")
    bare_env.setenv("SLURM_NTASKS_PER_NODE", "8(x2)")
    cores = len(os.sched_getaffinity(0))
    assert launch.configure_threads() == max(1, cores // 8)
    bare_env.delenv("SLURM_PROCID")
    bare_env.delenv("OMP_NUM_THREADS")
    bare_env.setenv("LOCAL_WORLD_SIZE", "1")  # torchrun, one process on this node
    assert launch.configure_threads() == cores and os.environ["OMP_NUM_THREADS"] == str(cores)
    bare_env.setenv("OMP_NUM_THREADS", "1")
    assert launch.configure_threads() is None, "the user's OMP_NUM_THREADS wins"


# -- progress of long phases (FID reference statistics, FID sampling, Inception) --------------------------------------
def _progress_lines(tmp_path, monkeypatch, interactive: bool, enabled: bool = True):
    import logging
    from types import SimpleNamespace

    import lightgen.utils.progress as progress

    clock = iter([0.0, 10.0, 40.0, 100.0])  # enter, two advances, exit
    monkeypatch.setattr(progress, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    handler = logging.FileHandler(tmp_path / "run.log")
    progress.log.addHandler(handler)
    try:
        with progress.PhaseProgress(
            "FID reference statistics", total=2000, enabled=enabled, interactive=interactive
        ) as p:
            p.advance(200)  # t = 10 s: under `every`, no line
            p.advance(600)  # t = 40 s: 800 of 2000 in 40 s -> 60 s left
    finally:
        progress.log.removeHandler(handler)
        handler.close()
    return (tmp_path / "run.log").read_text().splitlines()


def test_a_long_phase_writes_its_eta_to_the_log_file_and_to_stdout_only_without_a_terminal(
    tmp_path, capsys, monkeypatch
):
    lines = _progress_lines(tmp_path, monkeypatch, interactive=False)
    assert lines == [
        "FID reference statistics: 800/2000 images (40%), 0:00:40 elapsed, ETA 0:01:00",
        "FID reference statistics: 800 images in 0:01:40 (8.0 images/s)",
    ]
    assert capsys.readouterr().out.splitlines() == lines  # a piped `make demo` / SLURM log shows the same lines
    (tmp_path / "run.log").unlink()
    assert _progress_lines(tmp_path, monkeypatch, interactive=True) == lines  # the terminal has the Rich bar instead
    assert "ETA" not in capsys.readouterr().out
    (tmp_path / "run.log").unlink()
    assert _progress_lines(tmp_path, monkeypatch, interactive=False, enabled=False) == []  # other ranks: nothing
    assert capsys.readouterr().out == ""
