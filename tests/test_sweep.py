"""Hydra multiruns: per-job results and the sweep summary, DDP jobs inside a sweep, W&B grouping, SLURM launcher."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONF, run_cli
from omegaconf import OmegaConf, open_dict, read_write

from lightgen.utils import ddp_launch
from lightgen.utils.sweep import read_results, write_summary

# A few steps of the tiny DiT on synthetic data, nothing but the CSV logger and checkpoints.
TINY = [
    "experiment=smoke",
    "logger=csv",
    "trainer.max_steps=2",
    "callbacks.progress=null",
    "callbacks.sample_grid=null",
]

# What a user types: sweeps (comma lists) mixed with values that hold commas, quotes, spaces, lists and dicts,
# appended (+), forced (++) and deleted (~) keys.
TRICKY = [
    "experiment=smoke",
    "model.patch_size=2,4",
    "tags=[a,'b,c']",
    "+extra.labels=[1,2]",
    "+extra.note='hello, world = \"x\"'",
    "++seed=3",
    "~callbacks.progress",
    "paths.data_dir='/tmp/dir with space,comma'",
    "optim.optimizer.lr=1e-4,3e-4",
    "+extra.esc='it\\'s'",
    "+extra.d={a: 1, b: 'x,y'}",
    "+extra.e=a\\ b",
]
ODD_DIR = "/tmp/sweep dir,x=1/it's \"q\"/back\\slash\\'/0"


def _hydra_compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def _sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of a command line, as it stores them in hydra.overrides.task."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _task_part(cfg) -> dict:
    cfg = OmegaConf.to_container(cfg, resolve=False)
    cfg.pop("hydra")
    return cfg


# ------------------------------------------------------------------------------------------- argv rebuilding
@pytest.mark.parametrize("text", [ODD_DIR, "/plain/path/3", "C:\\x\\", "a'b", "a\\'b", "x=1,y=[2]"])
def test_hydra_quote_parses_back_to_the_same_string(text):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_override(f"hydra.run.dir={ddp_launch.hydra_quote(text)}")
    assert override.value() == text


def test_child_command_rebuilds_each_job_of_the_sweep_exactly():
    jobs = _sweep_jobs(TRICKY)
    assert len(jobs) == 4
    prefix = [sys.executable, "-m", "lightgen.train"]
    for job in jobs:
        cmd = ddp_launch.multirun_child_command(
            1,
            prefix=prefix,
            task_overrides=job,
            hydra_overrides=[
                "hydra.mode=MULTIRUN",
                "hydra.sweep.dir=/old",
                "hydra.job.chdir=false",
                "hydra/launcher=slurm",
                "hydra.launcher.timeout_min=5",
                "hydra.sweeper.max_batch_size=2",
            ],
            output_dir=ODD_DIR,
            sweep_dir="/tmp/sweep dir,x=1",
            config_args=["--config-name=train"],
        )
        assert cmd[:4] == [*prefix, "--config-name=train"]
        args = cmd[4:]
        assert "-m" not in args and "--multirun" not in args
        assert args[: len(job)] == job, "the job's own overrides, one value each, verbatim"
        assert "hydra.mode=MULTIRUN" not in args and "hydra.sweep.dir=/old" not in args
        assert not any(a.startswith(("hydra/launcher", "hydra.launcher", "hydra.sweeper")) for a in args)
        assert "hydra.job.chdir=false" in args  # the user's other hydra overrides are kept
        child, direct = _hydra_compose(args), _hydra_compose(job)
        assert _task_part(child) == _task_part(direct)
        assert child.hydra.run.dir == ODD_DIR and child.hydra.sweep.dir == "/tmp/sweep dir,x=1"
        assert child.hydra.mode.name == "RUN" and child.hydra.output_subdir is None
        assert child.hydra.job.name == "train_ddp_process_1"
        assert list(child.hydra.overrides.task) == job
    # the values survived the round trip
    assert list(direct.tags) == ["a", "b,c"] and list(direct.extra.labels) == [1, 2]
    assert direct.extra.note == 'hello, world = "x"' and direct.extra.esc == "it's" and direct.extra.e == "a b"
    assert direct.extra.d == {"a": 1, "b": "x,y"} and direct.seed == 3 and "progress" not in direct.callbacks
    assert direct.paths.data_dir == "/tmp/dir with space,comma"


@pytest.fixture
def hydra_runtime(tmp_path):
    """Set HydraConfig as inside job 3 of a sweep (MULTIRUN) or a single run (RUN); restored afterwards."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    saved = HydraConfig.instance().cfg

    def make(mode: str, overrides: list[str]):
        cfg = _hydra_compose(overrides)
        with read_write(cfg.hydra), open_dict(cfg.hydra):
            cfg.hydra.mode = RunMode[mode]
            cfg.hydra.sweep.dir = str(tmp_path / "sweep_2024")
            cfg.hydra.run.dir = str(tmp_path / "single")
            cfg.hydra.runtime.output_dir = str(tmp_path / ("sweep_2024/3" if mode == "MULTIRUN" else "single"))
            cfg.hydra.job.num = 3
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield make
    HydraConfig.instance().cfg = saved


def test_patch_is_where_lightning_looks_and_rebuilds_the_job(hydra_runtime, tmp_path, monkeypatch):
    import importlib.machinery

    import lightning.fabric.strategies.launchers.subprocess_script as fabric_launcher
    import lightning.pytorch.strategies.launchers.subprocess_script as pl_launcher

    import __main__

    assert ddp_launch.install()
    assert pl_launcher._hydra_subprocess_cmd is ddp_launch.hydra_subprocess_cmd
    assert fabric_launcher._hydra_subprocess_cmd is ddp_launch.hydra_subprocess_cmd
    assert ddp_launch.install(), "idempotent"

    job = _sweep_jobs(["experiment=smoke", "model.patch_size=2,4", "tags=[x,'y,z']", "+extra.q='${hydra:job.name}'"])[1]
    job_dir = ddp_launch.hydra_quote(str(tmp_path / "sweep_2024" / "3"))
    # as started by `python -m lightgen.train -m --config-dir=/extra experiment=smoke model.patch_size=2,4 ...`
    monkeypatch.setattr(__main__, "__spec__", importlib.machinery.ModuleSpec("lightgen.train", None))
    argv = ["/x/lightgen/train.py", "-m", "--config-dir=/extra", "experiment=smoke", "model.patch_size=2,4"]
    monkeypatch.setattr(sys, "argv", [*argv, "tags=[x,'y,z']"])
    hydra_runtime("MULTIRUN", job)
    cmd, cwd = pl_launcher._hydra_subprocess_cmd(1)
    entry = [sys.executable, "-m", "lightgen.train"]
    assert cmd[:5] == [*entry, "--config-dir=/extra", "--config-name=train"]
    assert cmd[5:9] == job and cwd == os.getcwd(), "verbatim: interpolations are the child's to resolve"
    assert f"hydra.run.dir={job_dir}" in cmd and "hydra.mode=RUN" in cmd and "hydra.output_subdir=null" in cmd
    assert not any(",4" in a for a in cmd) and "-m" not in cmd[3:] and "--multirun" not in cmd

    # run by a launcher's worker (e.g. submitit): sys.argv is not ours; the entry module is started
    monkeypatch.setattr(__main__, "__spec__", importlib.machinery.ModuleSpec("submitit.core._submit", None))
    monkeypatch.setattr(sys, "argv", ["/x/submitit/core/_submit.py", "/folder"])
    cmd, _ = pl_launcher._hydra_subprocess_cmd(1)
    assert cmd[:4] == [*entry, "--config-name=train"] and cmd[4:8] == job and "/folder" not in cmd

    # a single run keeps Lightning's own command (sys.argv + hydra.run.dir)
    monkeypatch.setattr(sys, "argv", ["/x/lightgen/train.py", "experiment=smoke", "tags=[x,'y,z']"])
    monkeypatch.setattr(__main__, "__spec__", importlib.machinery.ModuleSpec("lightgen.train", None))
    hydra_runtime("RUN", ["experiment=smoke"])
    cmd, _ = pl_launcher._hydra_subprocess_cmd(1)
    assert cmd == [
        *entry,
        "experiment=smoke",
        "tags=[x,'y,z']",
        f'hydra.run.dir="{tmp_path / "single"}"',
        "hydra.job.name=train_ddp_process_1",
        "hydra.output_subdir=null",
    ]


def test_multirun_job_restores_the_process_for_the_next_job(monkeypatch):
    for k in ddp_launch.DIST_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")  # set before the job: kept
    with pytest.raises(RuntimeError, match="boom"), ddp_launch.multirun_job():
        os.environ.update(LOCAL_RANK="0", WORLD_SIZE="2", MASTER_PORT="1234", MASTER_ADDR="127.0.0.1")
        raise RuntimeError("boom")
    assert os.environ["MASTER_ADDR"] == "10.0.0.1"
    assert not {"LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"} & set(os.environ)


# ------------------------------------------------------------------------------------------- W&B group
def test_wandb_group_is_per_sweep_and_none_for_a_single_run(hydra_runtime):
    from lightgen.utils.loggers import sweep_group

    assert sweep_group("train") is None  # not under Hydra
    hydra_runtime("MULTIRUN", ["experiment=smoke"])
    assert sweep_group("quickstart") == "quickstart-sweep_2024"
    assert sweep_group("sweep") == "sweep_2024"
    hydra_runtime("RUN", ["experiment=smoke"])
    assert sweep_group("quickstart") is None


# ------------------------------------------------------------------------------------------- summary
def _result(run: Path, **record):
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps(record))


def test_summary_lists_varying_overrides_fid_and_failures(tmp_path):
    sweep = tmp_path / "sweep"
    base = ["experiment=quickstart", "trainer.max_steps=10"]
    _result(
        sweep / "0",
        status="ok",
        job_num=0,
        overrides=[*base, "model.patch_size=2"],
        metrics={"train/loss": 0.5, "val/fid1k": 12.5, "lr-AdamW": 1e-4},
        global_step=10,
    )
    _result(
        sweep / "1",
        status="failed",
        job_num=1,
        overrides=[*base, "model.patch_size=3"],
        metrics={},
        error="JobFailed: patch_size=3 does not divide 32",
    )
    (sweep / "2").mkdir()  # killed before writing anything; its overrides.yaml is still there
    (sweep / "2" / "overrides.yaml").write_text(
        "- experiment=quickstart\n- trainer.max_steps=10\n- model.patch_size=4\n"
    )
    (sweep / ".submitit" / "1").mkdir(parents=True)

    csv_path, md_path = write_summary(sweep)
    rows = list(csv.DictReader(open(csv_path)))
    assert list(rows[0]) == [
        "job",
        "model.patch_size",
        "train/loss",
        "val/fid1k",
        "global_step",
        "status",
        "run_dir",
        "error",
    ]
    assert [(r["job"], r["model.patch_size"], r["status"]) for r in rows] == [
        ("0", "2", "ok"),
        ("1", "3", "failed"),
        ("2", "4", "failed"),
    ]
    assert (
        float(rows[0]["train/loss"]) == 0.5 and float(rows[0]["val/fid1k"]) == 12.5 and rows[0]["global_step"] == "10"
    )
    assert "does not divide" in rows[1]["error"] and "no result.json" in rows[2]["error"]
    md = md_path.read_text()
    assert "- `experiment=quickstart`" in md and "- `trainer.max_steps=10`" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0] == "| job | model.patch_size | train/loss | val/fid1k | global_step | status | run_dir |"
    assert table[1] == "| 0 | 2 | 0.5 | 12.5 | 10 | ok | 0 |"
    assert len(table) == 4 and "3 jobs: 1 ok, 2 failed." in md


# ------------------------------------------------------------------------------------------- CLI sweeps
def _summary(sweep: Path) -> tuple[list[dict], str]:
    return list(csv.DictReader(open(sweep / "summary.csv"))), (sweep / "summary.md").read_text()


@pytest.mark.slow
def test_2x2_multirun_writes_a_summary(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli("train", "-m", *TINY, "model.patch_size=2,4", "optim.optimizer.lr=1e-4,3e-4", f"hydra.sweep.dir={sweep}")
    rows, md = _summary(sweep)
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert list(rows[0])[:3] == ["job", "model.patch_size", "optim.optimizer.lr"]
    assert "experiment" not in rows[0] and "trainer.max_steps" not in rows[0]
    assert [(r["model.patch_size"], r["optim.optimizer.lr"]) for r in rows] == [
        ("2", "0.0001"),
        ("2", "0.0003"),
        ("4", "0.0001"),
        ("4", "0.0003"),
    ]
    for r in rows:
        assert r["status"] == "ok" and r["global_step"] == "2" and float(r["train/loss"]) > 0
        assert Path(r["run_dir"]) == sweep / r["job"]
        result = json.loads((sweep / r["job"] / "result.json").read_text())
        assert result["world_size"] == 1 and f"model.patch_size={r['model.patch_size']}" in result["overrides"]
        assert result["metrics"]["train/loss"] == float(r["train/loss"])
    assert "- `experiment=smoke`" in md and "- `trainer.max_steps=2`" in md
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + 4


@pytest.mark.slow
def test_a_failed_job_is_recorded_and_the_others_run(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("train", "-m", *TINY, "model.patch_size=3,4", f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1, "a sweep with a failed job ends with an error status, after every job ran"
    assert "lightgen.train: error: DiT: patch_size=3 does not divide" in proc.stderr
    rows, md = _summary(sweep)
    assert [(r["model.patch_size"], r["status"]) for r in rows] == [("3", "failed"), ("4", "ok")]
    assert "patch_size=3 does not divide" in rows[0]["error"] and not rows[0]["train/loss"]
    assert rows[1]["global_step"] == "2" and (sweep / "1" / "checkpoints" / "last.ckpt").is_file()
    assert not (sweep / "0" / "checkpoints").exists()
    assert "1 ok, 1 failed" in md and "job 0: JobFailed: DiT: patch_size=3" in md
    assert [r["status"] for r in read_results(sweep)] == ["failed", "ok"]


@pytest.mark.slow
def test_ddp_jobs_in_a_multirun_run_once_each(tmp_path):
    sweep, logs = tmp_path / "sweep", tmp_path / "logs"
    proc = run_cli(
        "train",
        "-m",
        *TINY,
        "trainer=ddp_cpu",
        "data.batch_size=8",
        "tags=[ddp,'a,b']",
        "model.patch_size=2,4",
        f"paths.log_dir={logs}",  # where a stray sweep started by a DDP child would go
        f"hydra.sweep.dir={sweep}",
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert out.count("Launching 2 jobs") == 1, "a DDP child started a sweep of its own"
    assert out.count("#1 : ") == 1
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert not logs.exists()
    rows, _ = _summary(sweep)
    assert [(r["model.patch_size"], r["status"], r["global_step"]) for r in rows] == [
        ("2", "ok", "2"),
        ("4", "ok", "2"),
    ]
    for job, patch in (("0", 2), ("1", 4)):
        run = sweep / job
        result = json.loads((run / "result.json").read_text())
        assert result["world_size"] == 2 and result["global_step"] == 2
        assert (run / "train_ddp_process_1.log").exists(), "rank 1 ran as a single job in this job's dir"
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == 2 and len(ckpt["lightgen"]["rng_states"]) == 2
        assert ckpt["lightgen"]["config"]["model"]["patch_size"] == patch
        assert ckpt["lightgen"]["config"]["tags"] == ["ddp", "a,b"]


def _wandb_run_record(path: Path):
    """The run record (project, group, name) of an offline run's .wandb file."""
    from conftest import wandb_records

    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise AssertionError(f"no run record in {path}")


@pytest.mark.slow
def test_wandb_runs_of_a_sweep_share_a_group_and_are_named_by_overrides(tmp_path):
    sweep = tmp_path / "my_sweep"
    run_cli(
        "train",
        "-m",
        *[a for a in TINY if a != "logger=csv"],
        "logger=wandb",
        "trainer.max_steps=1",
        "model.patch_size=2,4",
        f"hydra.sweep.dir={sweep}",
        env={"WANDB_MODE": "offline"},
    )
    runs = []
    for job in ("0", "1"):
        files = list((sweep / job / "wandb").glob("offline-run-*/*.wandb"))
        assert len(files) == 1, files
        runs.append(_wandb_run_record(files[0]))
    assert [r.run_group for r in runs] == ["train-my_sweep"] * 2
    assert "model.patch_size=2" in runs[0].display_name and "model.patch_size=4" in runs[1].display_name
    assert "experiment=smoke" in runs[0].display_name and runs[0].run_id != runs[1].run_id


# ------------------------------------------------------------------------------------------- SLURM launcher
def test_slurm_launcher_config_follows_the_trainer(monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")
    from hydra.utils import instantiate

    for var in ("SLURM_NTASKS_PER_NODE", "SLURM_JOB_NUM_NODES"):
        monkeypatch.delenv(var, raising=False)
    cfg = _hydra_compose(["hydra/launcher=slurm", "trainer=slurm", "hydra.sweep.dir=/scratch/sweep"])
    launcher = instantiate(cfg.hydra.launcher)  # what Hydra does; submitit itself is imported only to launch
    assert type(launcher).__name__ == "SlurmLauncher"
    p = launcher.params
    assert (p["tasks_per_node"], p["gpus_per_node"], p["nodes"]) == (8, 8, 1)
    assert p["submitit_folder"] == "/scratch/sweep/.submitit/%j"
    assert p["partition"] is None and p["account"] is None and p["timeout_min"] > 0

    cfg = _hydra_compose(["hydra/launcher=slurm", "trainer=slurm", "trainer.devices=4", "trainer.num_nodes=2"])
    p = instantiate(cfg.hydra.launcher).params
    assert (p["tasks_per_node"], p["gpus_per_node"], p["nodes"]) == (4, 4, 2)
    assert int(cfg.trainer.devices) * int(cfg.trainer.num_nodes) == 8

    # inside the job SLURM says how many tasks there are: the trainer agrees with what was asked for
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    cfg = _hydra_compose(["hydra/launcher=slurm", "trainer=slurm"])
    assert cfg.trainer.devices == 8 and any("SLURMEnvironment" in str(pl.get("_target_")) for pl in cfg.trainer.plugins)


@pytest.mark.slow
def test_slurm_sweep_command_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")
    proc = run_cli("train", "hydra/launcher=slurm", "trainer=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra")
    hydra_cfg = yaml.safe_load(proc.stdout)["hydra"]
    launcher = hydra_cfg["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] == "gpu"
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == "${trainer.devices}"
    assert launcher["nodes"] == "${trainer.num_nodes}"
    assert launcher["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    assert "sweep_summary" in hydra_cfg["callbacks"]
