"""MaskGIT end to end: the token module, the CLIs (train, extract, sample) and the start-up checks.

The net (tests/test_maskgit_net.py) and the process (tests/test_maskgit_process.py) have their own
specifications; here they are composed by config and run through the real entry points.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, run_cli
from hydra.utils import instantiate

from lightgen.compose import check_composition
from lightgen.diffusion import Guider
from lightgen.diffusion.mask_schedules import MaskSchedule
from lightgen.diffusion.maskgit import MaskGITProcess
from lightgen.nets.maskgit import MaskGIT
from lightgen.utils.errors import LightgenConfigError
from lightgen.utils.instantiate import root_cause

# 4 steps of maskgit_tiny on tokens of a random vq_fashion tokenizer (synthetic 32x32 images -> 8x8 codes)
SMOKE = [
    "experiment=smoke",
    "model=maskgit_tiny",
    "first_stage=vq_fashion",
    "method.sampling.steps=4",
    "optim.scheduler.warmup_steps=1",
    "optim.optimizer.lr=1e-2",
    "method.ema_decay=0.5",
    "logger=csv",
]


def _ckpt(run: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=False)


# -- composition ------------------------------------------------------------------------------------------
def test_a_maskgit_model_selects_the_maskgit_recipe_and_the_command_line_wins():
    cfg = compose(["model=maskgit_base", "trainer=ddp8"])
    assert cfg.diffusion._target_ == "lightgen.diffusion.maskgit.MaskGITProcess"
    assert cfg.schedule.name == "cosine" and cfg.schedule.kind == "mask"
    assert cfg.method._target_ == "lightgen.methods.TokenModule" and cfg.method.ema_decay == 0.999
    assert cfg.method.sampling.steps == 8 and cfg.method.sampling.choice_temperature == 4.5
    opt = cfg.optim.optimizer
    assert opt._target_ == "torch.optim.AdamW" and list(opt.betas) == [0.9, 0.96] and opt.lr == 1e-4
    assert opt.weight_decay == 4.5e-2 and cfg.optim.scheduler.warmup_steps == 5000
    assert cfg.trainer.devices == 8
    cfg = compose(["model=maskgit_s", "schedule=mask_linear", "optim=adamw_constant"])
    assert (
        cfg.schedule.name == "linear"
        and cfg.optim.optimizer.lr == 1e-4
        and "scheduler" not in cfg.optim
        or (cfg.optim.get("scheduler") is None)
    )


def test_the_imagenet_recipe_composes_with_ddp8_and_builds_the_official_sizes():
    cfg = compose(["experiment=maskgit_imagenet256", "trainer=ddp8"])
    assert cfg.first_stage.name == "vqgan_f16_1024" and cfg.first_stage.codebook_size == 1024
    assert (
        cfg.first_stage.token_size == 16
        and cfg.data.batch_size == 256
        and cfg.data._target_.endswith("TokenDataModule")
    )
    assert cfg.trainer.devices == 8 and cfg.trainer.max_steps == 2_000_000
    model = dict(cfg.model)
    assert (model["hidden_size"], model["depth"], model["num_heads"], model["mlp_dim"]) == (768, 24, 16, 3072)
    net = MaskGIT(codebook_size=1024, num_classes=1000, token_size=16, depth=1)  # sizes only; depth 1 to keep it fast
    assert net.seq_len == 257 and net.vocab_size == 2025


def test_the_quickstart_composes_with_image_reference_data_for_fid():
    cfg = compose(["experiment=quickstart_maskgit"])
    assert cfg.data._target_ == "lightgen.data.tokens.TokenDataModule" and cfg.first_stage.name == "vq_fashion"
    assert cfg.callbacks.fid.at_end and cfg.callbacks.fid.ref_data._target_ == "lightgen.data.FashionMNISTDataModule"
    assert cfg.model.hidden_size == 192 and cfg.model.cfg_dropout == 0.1 and cfg.trainer.max_time == "00:00:10:00"


# -- the module in-process ----------------------------------------------------------------------------------
def _tiny_module(**net_kw):
    cfg = compose(["model=maskgit_tiny", "first_stage=vq_fashion", "data=synthetic", "model.dropout=0"])
    module = instantiate(cfg.method)
    return module, cfg


def test_token_module_trains_on_tokens_and_on_images_and_generates_decoded_images():
    torch.manual_seed(0)
    module, _ = _tiny_module()
    module.train()
    assert not module.first_stage.training and not any(p.requires_grad for p in module.first_stage.parameters())
    images = torch.rand(4, 1, 32, 32) * 2 - 1
    tokens = module.first_stage.encode_to_indices(images)
    assert tokens.shape == (4, 8, 8) and tokens.dtype == torch.long
    labels = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    a = module.training_step({"tokens": tokens, "label": labels}, 0)
    torch.manual_seed(1)
    b = module.training_step({"image": images, "label": labels}, 0)
    assert torch.isfinite(a) and torch.equal(a, b), "tokens of the images and the images give the same loss"
    gen = torch.Generator().manual_seed(0)
    out = module.generate(labels, generator=gen)
    assert out.shape == (4, 1, 32, 32) and out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6
    codes = module.generate(labels, generator=torch.Generator().manual_seed(0), decode=False)
    assert codes.shape == (4, 8, 8) and codes.min() >= 0 and codes.max() < 512
    torch.testing.assert_close(module.first_stage.decode_indices(codes), out)


def test_a_token_module_refuses_latent_batches_and_a_diffusion_module_token_batches():
    module, _ = _tiny_module()
    with pytest.raises(ValueError, match="data=tokens") as err:
        module.training_step({"latent": torch.zeros(2, 64, 8, 8), "label": torch.zeros(2, dtype=torch.long)}, 0)
    assert "\n" not in str(err.value)
    dit = instantiate(compose(["experiment=smoke"]).method)
    with pytest.raises(ValueError, match="VQ tokens") as err:
        dit.training_step({"tokens": torch.zeros(2, 8, 8, dtype=torch.long), "label": torch.zeros(2).long()}, 0)
    assert "\n" not in str(err.value)


def test_tiny_maskgit_overfits_a_handful_of_token_maps():
    """Four 4x4 code maps, one per class: after training, 8-step decoding of each label gives its map."""
    torch.manual_seed(0)
    k, side = 16, 4
    maps = torch.randint(0, k, (4, side, side))
    net = MaskGIT(
        codebook_size=k,
        num_classes=4,
        token_size=side,
        hidden_size=64,
        depth=2,
        num_heads=4,
        mlp_dim=128,
        dropout=0.0,
        attention_dropout=0.0,
    )
    process = MaskGITProcess(MaskSchedule("cosine"), label_smoothing=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    labels = torch.arange(4).repeat(8)
    for _ in range(300):
        loss, terms = process.training_losses(net, maps[labels], {"y": labels})
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert terms["acc"] > 0.99, terms
    net.eval()
    with torch.no_grad():
        out = process.sample(net, (4, side, side), {"y": torch.arange(4)}, Guider(), torch.Generator().manual_seed(0))
    assert torch.equal(out, maps), (out, maps)


# -- through the CLIs --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def maskgit_run(token_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("maskgit_run")
    run_cli("train", *SMOKE, "data=tokens", f"data.path={token_dir}", "data.batch_size=8", f"hydra.run.dir={run}")
    return run


@pytest.mark.slow
def test_train_on_extracted_tokens_logs_the_maskgit_terms_and_writes_a_grid(maskgit_run):
    rows = list(csv.DictReader(open(maskgit_run / "metrics.csv")))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"train/loss", "train/acc", "train/mask_ratio", "train/grad_norm"} <= logged, logged
    ck = _ckpt(maskgit_run)
    assert ck["global_step"] == 4 and ck["lightgen"]["net_class"] == "lightgen.nets.maskgit.MaskGIT"
    assert ck["lightgen"]["config"]["diffusion"]["_target_"].endswith("MaskGITProcess")
    assert list((maskgit_run / "samples").glob("step_*.png")), "the end-of-training grid"


@pytest.mark.slow
def test_two_sampling_processes_give_the_same_images_as_one(maskgit_run, tmp_path):
    ckpt = maskgit_run / "checkpoints" / "last.ckpt"
    args = [f"ckpt={ckpt}", "num_samples=10", "batch_size=4", "steps=4"]
    run_cli("sample", *args, f"out={tmp_path / 'one'}")
    run_cli("sample", *args, f"out={tmp_path / 'two'}", "trainer=ddp_cpu")
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert a["arr_0"].shape == (10, 32, 32, 1) and a["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert len({x.tobytes() for x in a["arr_0"]}) == 10, "every sample is different"
    info = json.loads((tmp_path / "two" / "sample_info.json").read_text())
    assert info["sampler"] == "maskgit" and info["steps"] == 4 and info["choice_temperature"] == 4.5
    run_cli("sample", *args, "choice_temperature=0", f"out={tmp_path / 'greedy'}")
    c = np.load(tmp_path / "greedy" / "samples.npz")["arr_0"]
    assert not np.array_equal(a["arr_0"], c), "the choice temperature reaches the decoder"


@pytest.mark.slow
def test_resume_continues_bit_for_bit(token_dir, tmp_path):
    """4 steps, then a re-run to 6 in the same directory (auto-resume) equals 6 steps in one go."""
    data = ["data=tokens", f"data.path={token_dir}", "data.batch_size=8", "callbacks.sample_grid=null"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli("train", *SMOKE, *data, "trainer.max_steps=6", f"hydra.run.dir={straight}")
    run_cli("train", *SMOKE, *data, "trainer.max_steps=4", f"hydra.run.dir={resumed}")
    run_cli("train", *SMOKE, *data, "trainer.max_steps=6", f"hydra.run.dir={resumed}")
    a, b = _ckpt(straight), _ckpt(resumed)
    assert a["global_step"] == b["global_step"] == 6
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


# -- bad input: one sentence, before work --------------------------------------------------------------------
def _fails(args, phrase, entry="train"):
    proc = run_cli(entry, *args, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert any(phrase in line for line in lines), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["model=maskgit_tiny", "schedule=linear"], "needs a mask schedule but schedule=linear is a gaussian"),
        (["schedule=mask_cosine"], "needs a gaussian schedule but schedule=cosine is a mask"),
        (["model=maskgit_tiny", "first_stage=identity"], "is not a VQ tokenizer"),
    ],
)
def test_groups_that_cannot_work_together_are_refused_before_anything_is_built(args, phrase):
    with pytest.raises(LightgenConfigError) as err:
        check_composition(compose(["experiment=smoke", *args]))
    assert phrase in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["model.token_size=4"], "position table holds 16; set model.token_size=8"),
        (["schedule.name=sine"], "sine"),
        (["method.sampling.steps=0"], "steps=0"),
        (["method.sampling.choice_temperature=-1"], ">= 0"),
        (["model.codebook_size=256"], "models 256 codes but the tokenizer first_stage=vq_fashion has 512"),
    ],
)
def test_bad_maskgit_settings_fail_when_the_method_is_built(args, phrase):
    cfg = compose(["experiment=smoke", "model=maskgit_tiny", "first_stage=vq_fashion", *args])
    with pytest.raises(Exception) as err:
        instantiate(cfg.method)
    cause = root_cause(err.value)
    assert phrase in str(cause) and "\n" not in str(cause), str(cause)


def test_a_bad_composition_stops_the_cli_with_one_line_naming_the_choices(tmp_path):
    proc = _fails(
        ["experiment=smoke", "model=maskgit_tiny", "schedule=linear", f"hydra.run.dir={tmp_path / 'run'}"],
        "diffusion=maskgit needs a mask schedule but schedule=linear is a gaussian schedule; select "
        "schedule=mask_cosine",
    )
    assert proc.returncode == 2 and not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.slow
def test_tokens_of_another_codebook_are_refused_before_work(token_dir, tmp_path):
    _fails(
        [*SMOKE, "data=tokens", f"data.path={token_dir}", "first_stage.codebook_size=256", f"hydra.run.dir={tmp_path}"],
        "256",
    )
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_bad_sampling_settings_fail_in_one_sentence(maskgit_run, tmp_path):
    ckpt = maskgit_run / "checkpoints" / "last.ckpt"
    _fails([f"ckpt={ckpt}", "steps=0", f"out={tmp_path / 'a'}"], "steps=0", entry="sample")
    _fails([f"ckpt={ckpt}", "choice_temperature=-1", f"out={tmp_path / 'b'}"], "choice_temperature=-1", entry="sample")
    _fails([f"ckpt={ckpt}", "sampler=ddpm", f"out={tmp_path / 'c'}"], "not a MaskGIT sampler", entry="sample")
    assert not (tmp_path / "a" / "samples.npz").exists()
