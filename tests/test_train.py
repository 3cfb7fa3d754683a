"""The train and sample entry points, end to end, through subprocesses as a user runs them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMOKE, run_cli, tree_digest

pytestmark = pytest.mark.slow


def _ckpt(run: Path, name="last.ckpt") -> dict:
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=False)


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


def test_explicit_ckpt_path_resumes_where_the_checkpoint_left_off(smoke_run, tmp_path):
    """A fresh run directory with ckpt_path=<step 4 of smoke_run>, trained to step 6, is bit for bit
    smoke_run's config trained 6 steps in one go (net, EMA, AdamW moments).

    The resumed run is launched with ``seed=1`` (the data stream's seed pinned to 0): everything it
    continues with must come from the checkpoint, and a run that ignored ckpt_path would start at step 0
    from seed 1's initialisation, i.e. log steps 0..5 and end on other weights.
    """
    straight, run = tmp_path / "straight", tmp_path / "fromckpt"
    run_cli("train", *SMOKE, "trainer.max_steps=6", f"hydra.run.dir={straight}")
    ckpt = smoke_run / "checkpoints" / "step_0000004.ckpt"
    run_cli(
        "train", *SMOKE, "trainer.max_steps=6", "seed=1", "data.seed=0", f"ckpt_path={ckpt}", f"hydra.run.dir={run}"
    )
    a, b = _ckpt(straight), _ckpt(run)
    assert a["global_step"] == b["global_step"] == 6
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    start = _ckpt(smoke_run, "step_0000004.ckpt")["state_dict"]
    assert not torch.equal(start["net.blocks.0.attn.qkv.weight"], b["state_dict"]["net.blocks.0.attn.qkv.weight"])
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert sorted({int(r["step"]) for r in rows if r.get("train/loss")}) == [4, 5], "training starts at step 4"


def test_ema_follows_its_closed_form_during_training(tmp_path):
    """With decay d the checkpointed EMA after step k is d * EMA_{k-1} + (1 - d) * net_k (DiT's
    update after every optimiser step), so it moves every step, lags the net, and equals neither."""
    run = tmp_path / "ema"
    run_cli(
        "train",
        *SMOKE,
        "trainer.max_steps=3",
        "method.ema_decay=0.5",
        "callbacks.checkpoint.every_n_train_steps=1",
        "callbacks.sample_grid=null",
        f"hydra.run.dir={run}",
    )
    sd = [_ckpt(run, f"step_{k:07d}.ckpt")["state_dict"] for k in (1, 2, 3)]
    names = [k[len("net.") :] for k in sd[0] if k.startswith("net.")]
    moved = 0
    for k in (1, 2):
        for n in names:
            net, ema, prev = sd[k][f"net.{n}"], sd[k][f"ema.{n}"], sd[k - 1][f"ema.{n}"]
            torch.testing.assert_close(ema, 0.5 * prev + 0.5 * net, rtol=0, atol=1e-7, msg=f"step {k + 1}: {n}")
            moved += not torch.equal(ema, prev)
    # the closed form is not vacuous: most tensors moved (41 of the 2 x 32 here; adaLN-Zero keeps the
    # attention and MLP weights of step 1 without gradient, DiT's pos_embed is frozen)
    assert moved > len(names), moved
    k = "final_layer.linear.weight"  # zero at init: after 3 steps the EMA is off zero, and behind the net
    assert sd[2][f"ema.{k}"].abs().max() > 1e-5 and (sd[2][f"ema.{k}"] - sd[2][f"net.{k}"]).abs().max() > 1e-5


PROBE = [
    *SMOKE,
    "diffusion._target_=lightgen_test_probes.per_sample_noise_process",  # noise per sample, not per rank
    "model.class_dropout_prob=0",  # label dropout draws from the rank's RNG: off
    "callbacks.sample_grid=null",  # (no null class to guide with)
    "method.ema_decay=0.5",  # an EMA that moves measurably in 4 steps
    "data.batch_size=8",  # the global batch: 8 on one process, 4 + 4 on two
]


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory) -> tuple[Path, Path]:
    from lightgen_test_probes import PROBES_ENV

    root = tmp_path_factory.mktemp("ddp")
    for name, extra in (("one", []), ("two", ["trainer=ddp_cpu"])):
        run = root / name
        run_cli(
            "train", *PROBE, *extra, f"+diffusion.loss_log={run / 'losses'}", f"hydra.run.dir={run}", env=PROBES_ENV
        )
    return root / "one", root / "two"


def _logged(run: Path, key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in csv.DictReader(open(run / "metrics.csv")) if r.get(key)}


def test_two_processes_train_the_same_weights_as_one_with_the_same_global_batch(one_and_two_processes):
    """1 process with batch 8 == 2 DDP processes with 4 + 4 (gradients all-reduced), after 4 steps.

    lightgen draws the diffusion noise per rank (seed * W + r), so by design a 1- and a 2-process run of
    the plain method differ; the probe process (tests/lightgen_test_probes.py) draws each sample's t and
    noise from the sample itself, leaving only the sharding of the global batch, the gradient averaging,
    AdamW and the EMA to differ -- which must not change the result beyond the order of float sums.
    Tolerance atol 1e-6 on net and EMA; measured max differences 1.5e-8 (net) and 3.7e-9 (EMA), while
    both move ~2e-4 between steps 2 and 4. Losses and gradient norms per step agree to rel 1e-5.
    """
    one, two = one_and_two_processes
    a, b = _ckpt(one), _ckpt(two)
    assert a["global_step"] == b["global_step"] == 4
    assert len(a["lightgen"]["rng_states"]) == 1 and len(b["lightgen"]["rng_states"]) == 2, "one RNG state per rank"
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=0, atol=1e-6, msg=k)
    mid = _ckpt(one, "step_0000002.ckpt")["state_dict"]
    for prefix in ("net.", "ema."):
        moved = max((a["state_dict"][k] - mid[k]).abs().max().item() for k in a["state_dict"] if k.startswith(prefix))
        assert moved > 1e-5, f"{prefix} barely moved between steps 2 and 4 ({moved}): the comparison says nothing"
    # the gradient norm is logged after the all-reduce: a sum instead of a mean would double it
    for key in ("train/loss", "train/grad_norm"):
        la, lb = _logged(one, key), _logged(two, key)
        assert sorted(la) == sorted(lb) == [0, 1, 2, 3], key
        for step in la:
            assert lb[step] == pytest.approx(la[step], rel=1e-5), (key, step)


@pytest.mark.parametrize("launcher", ["slurm", "torchrun"])
def test_two_nodes_train_the_same_weights_as_one_process_with_the_same_global_batch(
    one_and_two_processes, tmp_path, launcher
):
    """The same comparison with two "nodes" of one process each, started as a SLURM job's srun (simulated) or
    torchrun --nnodes 2 would start them (tests/subprocs.py): the cluster path trains what one process trains."""
    from subprocs import start_nodes

    one, _ = one_and_two_processes
    for p in start_nodes(launcher, PROBE, tmp_path, "101"):  # SLURM job ids are numbers
        code, err = p.wait(300)
        assert code == 0, err[-3000:]
    a, b = _ckpt(one), _ckpt(tmp_path / "runs" / "train" / "101")
    assert a["global_step"] == b["global_step"] == 4 and len(b["lightgen"]["rng_states"]) == 2
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=0, atol=1e-6, msg=k)


def test_logged_losses_are_the_mean_over_ranks(one_and_two_processes):
    """metrics.csv of a 2-process run holds, each step, the mean of the two ranks' batch losses
    (recorded by the probe process on each rank), not rank 0's own."""
    _, two = one_and_two_processes
    per_rank = []
    for r in (0, 1):
        lines = (two / "losses" / f"rank{r}.jsonl").read_text().splitlines()
        per_rank.append({d["step"]: d["loss"] for d in map(json.loads, lines)})
    logged = _logged(two, "train/loss")
    assert sorted(logged) == sorted(per_rank[0]) == sorted(per_rank[1]) == [0, 1, 2, 3]
    for step, value in logged.items():
        l0, l1 = per_rank[0][step], per_rank[1][step]
        assert abs(l0 - l1) > 1e-3, "the ranks saw the same loss: the check says nothing"
        assert value == pytest.approx((l0 + l1) / 2, rel=1e-6, abs=1e-7), (step, value, l0, l1)


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
    before = tree_digest(run) if run else None
    proc = run_cli("train", *args, check=False)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert any(phrase in line for line in err), proc.stderr[-2000:]
    if run is not None:
        assert tree_digest(run) == before, "a failed start must not touch an existing run"
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
