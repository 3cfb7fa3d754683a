"""Every config composes; `instantiate(cfg.model)` is the network; the documented command lines compose."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF, compose, run_cli
from hydra.utils import instantiate
from torch import nn

OFFICIAL_LATENT = ["data=synthetic", "data.channels=4", "data.num_classes=1000", "data.image_size=32"]
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_instantiates_the_network(model):
    cfg = compose([f"model={model}"])
    with torch.device("meta"):
        net = instantiate(cfg.model)
    assert isinstance(net, nn.Module)
    assert not hasattr(net, "trainer"), "the network must be a plain nn.Module, not a LightningModule"


@pytest.mark.parametrize(
    ("model", "patch", "count"),
    [("dit_xl", 2, 675_129_632), ("dit_xl", 4, 675_074_432), ("dit_s", 8, 33_148_160), ("dit_b", 4, 130_475_648)],
)
def test_model_configs_give_official_parameter_counts_on_imagenet_latent_shapes(model, patch, count):
    cfg = compose([f"model={model}", f"model.patch_size={patch}", *OFFICIAL_LATENT])
    with torch.device("meta"):
        net = instantiate(cfg.model)
    assert net.patch_size == patch
    assert sum(p.numel() for p in net.parameters()) == count


def test_model_follows_data_and_first_stage():
    cfg = compose(["model=dit_tiny"])  # default data: Fashion-MNIST, 1 x 32 x 32, 10 classes
    net = instantiate(cfg.model)
    assert (net.in_channels, net.input_size, net.num_classes, net.out_channels) == (1, 32, 10, 2)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose([f"experiment={experiment}"])
    assert cfg.trainer.max_steps > 0
    if cfg.get("model") is not None:  # stage-1 experiments train the first stage, not a generator
        with torch.device("meta"):
            assert isinstance(instantiate(cfg.model), nn.Module)


@pytest.mark.parametrize("trainer", ["cpu", "ddp_cpu"])
def test_cpu_trainer_configs_instantiate(trainer, tmp_path):
    cfg = compose([f"trainer={trainer}", "logger=none"])
    t = instantiate(cfg.trainer, default_root_dir=str(tmp_path), logger=False)
    assert t.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("trainer", ["gpu", "ddp8", "slurm"])
def test_gpu_trainer_configs_compose(trainer):
    cfg = compose([f"trainer={trainer}"])
    assert cfg.trainer.accelerator == "gpu"
    if trainer == "ddp8":
        assert cfg.trainer.devices == 8 and cfg.trainer.precision == "bf16-mixed"


def test_imagenet_experiment_composes_with_ddp8():
    out = run_cli("train", "experiment=dit_xl2_imagenet256", "trainer=ddp8", "--cfg", "job").stdout
    assert "hidden_size: 1152" in out and "batch_size: 256" in out and "sd-vae-ft-ema" in out
    cfg = compose(["experiment=dit_xl2_imagenet256", "trainer=ddp8"])
    with torch.device("meta"):
        net = instantiate(cfg.model)
    assert sum(p.numel() for p in net.parameters()) == 675_129_632


def test_cfg_job_composes_for_the_line_users_type():
    out = run_cli("train", "model=dit_xl", "trainer=ddp8", "--cfg", "job").stdout
    assert "devices: 8" in out and "precision: bf16-mixed" in out and "hidden_size: 1152" in out


def test_slurm_run_dir_is_the_job_id_so_requeue_resumes(monkeypatch):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=["trainer=slurm"], return_hydra_config=True)
    assert cfg.hydra.run.dir.endswith("/train/4242")
    plugins = [p["_target_"] for p in cfg.trainer.plugins]
    assert "lightning.pytorch.plugins.environments.SLURMEnvironment" in plugins


def test_groups_exist_in_train_defaults():
    cfg = compose([])
    for group in ("model", "diffusion", "schedule", "masking", "trainer", "data", "first_stage", "optim"):
        assert group in cfg, group
    assert cfg.seed == 0 and cfg.ckpt_path is None


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb"])
def test_logger_configs_instantiate(logger, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose([f"logger={logger}", f"paths.output_dir={tmp_path}"])
    for node in cfg.logger.values():
        assert instantiate(node) is not None
