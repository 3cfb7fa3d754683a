"""The train and sample entry points, end to end, through subprocesses as a user runs them."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMOKE, run_cli

pytestmark = pytest.mark.slow


def _ckpt(run: Path, name="last.ckpt") -> dict:
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=False)


def _digest(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("smoke") / "run"
    run_cli("train", *SMOKE, f"hydra.run.dir={run}")
    return run


def test_train_writes_config_checkpoints_logs_and_grid(smoke_run):
    run = smoke_run
    assert (run / "config.yaml").is_file() and (run / "overrides.yaml").is_file()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    logged = {k for r in rows for k, v in r.items() if v}
    for key in ("train/loss", "train/mse", "train/vb", "train/grad_norm", "train/images_per_sec", "lr-AdamW"):
        assert key in logged, key
    assert (run / "samples" / "step_0000004.png").is_file()


def test_checkpoint_holds_net_ema_optimizer_step_rng_and_config(smoke_run):
    ckpt = _ckpt(smoke_run)
    sd = ckpt["state_dict"]
    assert ckpt["global_step"] == 4
    assert any(k.startswith("net.") for k in sd) and any(k.startswith("ema.") for k in sd)
    assert ckpt["optimizer_states"][0]["state"], "AdamW moments are saved"
    extra = ckpt["lightgen"]
    assert len(extra["rng_states"]) == 1 and "torch" in extra["rng_states"][0]
    assert extra["config"]["model"]["_target_"] == "lightgen.nets.dit.DiT"
    # EMA moved away from the net (decay 0.9999 after 4 steps) but not equal to it
    k = "blocks.0.attn.qkv.weight"
    assert not torch.equal(sd[f"net.{k}"], sd[f"ema.{k}"])


def test_resume_follows_the_uninterrupted_trajectory(tmp_path):
    """2N steps in one go == N steps, stop, resume from last.ckpt, N more steps (bit-exact on CPU)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [*SMOKE, "data.random_flip=true", "data.num_samples=40"]  # 5 batches/epoch: crosses epochs
    run_cli("train", *common, "trainer.max_steps=8", f"hydra.run.dir={straight}")
    run_cli("train", *common, "trainer.max_steps=4", f"hydra.run.dir={resumed}")
    proc = run_cli("train", *common, "trainer.max_steps=8", f"hydra.run.dir={resumed}")  # auto-resume
    assert "resuming from" in proc.stdout + proc.stderr
    a, b = _ckpt(straight), _ckpt(resumed)
    assert a["global_step"] == b["global_step"] == 8
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    rows = list(csv.DictReader(open(resumed / "metrics.csv")))
    steps = sorted({int(r["step"]) for r in rows if r.get("train/loss")})
    assert steps == list(range(8)), "metrics.csv is appended to on resume, not replaced"


def test_explicit_ckpt_path_resumes(smoke_run, tmp_path):
    run = tmp_path / "fromckpt"
    run_cli(
        "train",
        *SMOKE,
        "trainer.max_steps=6",
        f"ckpt_path={smoke_run / 'checkpoints' / 'step_0000004.ckpt'}",
        f"hydra.run.dir={run}",
    )
    assert _ckpt(run)["global_step"] == 6


def test_ddp_cpu_two_processes(tmp_path):
    run = tmp_path / "ddp"
    run_cli("train", *SMOKE, "trainer=ddp_cpu", "data.batch_size=8", f"hydra.run.dir={run}", timeout=900)
    ckpt = _ckpt(run)
    assert ckpt["global_step"] == 4
    assert len(ckpt["lightgen"]["rng_states"]) == 2, "one RNG state per rank"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert any(r.get("train/loss") for r in rows)


def _sample(smoke_run, out, *extra):
    return run_cli(
        "sample",
        f"ckpt={smoke_run / 'checkpoints' / 'last.ckpt'}",
        "num_samples=20",
        "cfg_scale=4.0",
        "steps=3",
        f"out={out}",
        *extra,
    )


def test_sample_cli_writes_grid_and_adm_npz(smoke_run, tmp_path):
    out = tmp_path / "samples"
    _sample(smoke_run, out, "png=true")
    data = np.load(out / "samples.npz")
    assert data["arr_0"].shape == (20, 32, 32, 1) and data["arr_0"].dtype == np.uint8
    labels = data["arr_1"].tolist()
    assert sorted(labels) == sorted(list(range(10)) * 2), "balanced: every class twice"
    assert labels != sorted(labels), "balanced labels come in a seeded random order (ADM's IS splits see all classes)"
    assert (out / "grid.png").is_file() and len(list((out / "png").glob("*.png"))) == 20
    # same seed -> same samples
    out2 = tmp_path / "samples2"
    _sample(smoke_run, out2)
    np.testing.assert_array_equal(np.load(out2 / "samples.npz")["arr_0"], data["arr_0"])


def _fails_cleanly(args, phrase, run: Path | None = None):
    before = _digest(run) if run else None
    proc = run_cli("train", *args, check=False)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert any(phrase in line for line in err), proc.stderr[-2000:]
    if run is not None:
        assert _digest(run) == before, "a failed start must not touch an existing run"
    return proc


def test_bad_patch_size_fails_at_startup_and_keeps_the_run(smoke_run):
    proc = _fails_cleanly(
        [*SMOKE, "model.patch_size=3", f"hydra.run.dir={smoke_run}"], "patch_size=3 does not divide", smoke_run
    )
    assert "Traceback" not in proc.stderr


def test_unknown_model_fails_at_startup(smoke_run):
    _fails_cleanly([*SMOKE, "model=dit_q", f"hydra.run.dir={smoke_run}"], "Could not find 'model/dit_q'", smoke_run)


def test_missing_data_directory_fails_at_startup_and_names_the_places(smoke_run, tmp_path):
    proc = _fails_cleanly(
        [
            "experiment=smoke",
            "data=fashion_mnist",
            f"data.root={tmp_path / 'nope'}",
            "data.system_dirs=[]",
            f"hydra.run.dir={smoke_run}",
        ],
        "apt-get install dataset-fashion-mnist",
        smoke_run,
    )
    assert proc.returncode == 2 and str(tmp_path / "nope") in proc.stderr


def test_checkpoint_of_another_architecture_fails_at_startup(smoke_run, tmp_path):
    run = tmp_path / "other"
    _fails_cleanly(
        [
            *SMOKE,
            "model.hidden_size=32",
            f"ckpt_path={smoke_run / 'checkpoints' / 'last.ckpt'}",
            f"hydra.run.dir={run}",
        ],
        "holds a DiT(",
    )
    _fails_cleanly([*SMOKE, "model.depth=3", f"hydra.run.dir={smoke_run}"], "holds a DiT(", smoke_run)


def test_tensorboard_and_wandb_offline_write_their_files(tmp_path):
    run = tmp_path / "loggers"
    run_cli(
        "train",
        "experiment=smoke",
        "logger=many",
        "trainer.max_steps=2",
        f"hydra.run.dir={run}",
        env={"WANDB_MODE": "", "WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc")},
    )
    assert list((run / "tensorboard").rglob("events.out.tfevents*"))
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, "W&B runs offline without credentials"
    assert list(offline[0].glob("*.wandb"))
