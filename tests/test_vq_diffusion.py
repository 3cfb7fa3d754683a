"""VQ-Diffusion end to end: the recipe configs, the token module with the discrete process, the CLIs
(train, sample), resume with the importance-sampling history, the pruned tokenizer and the start-up checks.

The net (tests/test_vq_diffusion_net.py) and the process (tests/test_vq_diffusion_process.py) have their own
specifications; here they are composed by config and run through the real entry points.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import compose, run_cli
from hydra.utils import instantiate

from lightgen.compose import check_composition
from lightgen.diffusion import Guider
from lightgen.diffusion.vq_diffusion import DiscreteSchedule, VQDiffusionProcess
from lightgen.first_stage.pruned import PrunedTokenizer
from lightgen.nets.vq_diffusion import VQDiffusion
from lightgen.utils.errors import LightgenConfigError
from lightgen.utils.instantiate import root_cause

# 4 steps of vq_diffusion_tiny on tokens of a random vq_fashion tokenizer, T = 10 so sampling is quick
SMOKE = [
    "experiment=smoke",
    "model=vq_diffusion_tiny",
    "first_stage=vq_fashion",
    "schedule.num_timesteps=10",
    "method.sampling.steps=5",
    "optim.scheduler.warmup_steps=1",
    "optim.optimizer.lr=1e-2",
    "method.ema_decay=0.5",
    "method.ema_every=2",
    "logger=csv",
]


def _ckpt(run: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=False)


# -- composition ------------------------------------------------------------------------------------------
def test_a_vq_diffusion_model_selects_the_official_recipe_and_the_command_line_wins():
    cfg = compose(["model=vq_diffusion_imagenet", "trainer=ddp8"])
    assert cfg.diffusion._target_ == "lightgen.diffusion.vq_diffusion.VQDiffusionProcess"
    assert cfg.schedule.kind == "discrete" and cfg.schedule.gamma_bar_end == 0.99999
    assert cfg.method._target_ == "lightgen.methods.TokenModule"
    assert (cfg.method.ema_decay, cfg.method.ema_every) == (0.99, 25)
    s = cfg.method.sampling
    assert (s.sampler, s.steps, s.truncation, s.posterior, s.cfg_scale) == ("ancestral", 100, 0.86, "official", 1.0)
    opt = cfg.optim.optimizer
    assert opt._target_ == "torch.optim.AdamW" and list(opt.betas) == [0.9, 0.96] and opt.lr == 4.5e-4
    assert opt.weight_decay == 4.5e-2 and cfg.optim.scheduler.warmup_steps == 5000
    assert cfg.model.num_timesteps == 100 and cfg.trainer.devices == 8
    cfg = compose(["model=vq_diffusion_tiny", "schedule=vqd_mask_replace", "schedule.num_timesteps=20"])
    assert cfg.schedule.gamma_bar_end == 0.899991 and cfg.model.num_timesteps == 20, "the step table follows T"


def test_the_imagenet_recipe_composes_with_ddp8_on_the_pruned_tokenizer():
    cfg = compose(["experiment=vq_diffusion_imagenet256", "trainer=ddp8"])
    assert cfg.first_stage.name == "vqgan_f16_16384_974" and cfg.first_stage.codebook_size == 974
    assert cfg.model.codebook_size == 974 and cfg.model.spatial_size == 32 and cfg.model.token_size == 16
    assert cfg.data.batch_size == 32 and cfg.trainer.devices == 8 and cfg.trainer.gradient_clip_val == 0.5
    assert cfg.diffusion.aux_weight == 1.0e-3 and cfg.trainer.max_steps == 500_000


def test_the_quickstart_composes_with_image_reference_data_for_fid():
    cfg = compose(["experiment=quickstart_vqdiffusion"])
    assert cfg.data._target_ == "lightgen.data.tokens.TokenDataModule" and cfg.first_stage.name == "vq_fashion"
    assert cfg.callbacks.fid.at_end and cfg.callbacks.fid.ref_data._target_ == "lightgen.data.FashionMNISTDataModule"
    assert cfg.model.learnable_null and cfg.model.cfg_dropout == 0.1 and cfg.trainer.max_time == "00:00:10:00"


# -- the module in-process ----------------------------------------------------------------------------------
def _tiny_module(*extra):
    cfg = compose(["model=vq_diffusion_tiny", "first_stage=vq_fashion", "data=synthetic", *extra])
    return instantiate(cfg.method), cfg


def test_token_module_trains_vq_diffusion_and_generates_decoded_images():
    torch.manual_seed(0)
    module, _ = _tiny_module("schedule.num_timesteps=10")
    module.train()
    assert "process.Lt_history" in module.state_dict() and "process.Lt_count" in module.state_dict()
    images = torch.rand(4, 1, 32, 32) * 2 - 1
    tokens = module.first_stage.encode_to_indices(images)
    labels = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    a = module.training_step({"tokens": tokens, "label": labels}, 0)
    assert torch.isfinite(a) and int(module.process.Lt_count.sum()) == 4
    out = module.generate(labels, generator=torch.Generator().manual_seed(0), steps=5)
    assert out.shape == (4, 1, 32, 32) and out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6
    codes = module.generate(labels, generator=torch.Generator().manual_seed(0), steps=5, decode=False)
    assert codes.shape == (4, 8, 8) and codes.min() >= 0 and codes.max() < 512, "never the mask id"
    torch.testing.assert_close(module.first_stage.decode_indices(codes), out)


def test_label_dropout_replaces_labels_by_the_null_class_in_training_only():
    net = VQDiffusion(codebook_size=8, num_classes=3, token_size=2, hidden_size=16, depth=1, num_heads=2,
                      num_timesteps=4, learnable_null=True, cfg_dropout=0.5)  # fmt: skip
    tokens, t, y = torch.randint(0, 9, (64, 4)), torch.randint(0, 4, (64,)), torch.randint(0, 3, (64,))
    torch.manual_seed(3)
    dropped = torch.rand(64) < 0.5
    net.train()
    torch.manual_seed(3)
    out = net(tokens, t, y)
    net.eval()
    expect = net(tokens, t, torch.where(dropped, torch.full_like(y, net.null_class), y))
    torch.testing.assert_close(out, expect)
    assert 0 < int(dropped.sum()) < 64
    with pytest.raises(ValueError, match="cfg_dropout"):
        VQDiffusion(codebook_size=8, num_classes=3, token_size=2, hidden_size=16, depth=1, num_heads=2, cfg_dropout=1.5)


def test_ema_every_n_steps_updates_only_after_every_nth_optimiser_step():
    """ema_decay 0 copies the net: with ema_every=2, after 3 steps the EMA is the net after step 2."""
    torch.manual_seed(0)
    module, _ = _tiny_module("schedule.num_timesteps=10", "method.ema_decay=0.0", "method.ema_every=2")
    snapshots = []

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots.append({k: v.clone() for k, v in pl_module.net.state_dict().items()})

    data = torch.utils.data.DataLoader(
        [{"tokens": torch.randint(0, 512, (8, 8)), "label": torch.tensor(i % 10)} for i in range(12)], batch_size=4
    )
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Snap()], accelerator="cpu")  # fmt: skip
    trainer.fit(module, data)
    ema = module.ema.state_dict()
    key = "to_logits.1.weight"
    assert torch.equal(ema[key], snapshots[1][key]) and not torch.equal(ema[key], snapshots[2][key])
    with pytest.raises(Exception) as err:
        _tiny_module("method.ema_every=0")
    assert "ema_every=0" in str(root_cause(err.value))


def test_tiny_vq_diffusion_overfits_a_handful_of_token_maps():
    """Four 4x4 code maps, one per class: after training, ancestral sampling of each label gives its map."""
    torch.manual_seed(0)
    k, side, steps = 16, 4, 10
    maps = torch.randint(0, k, (4, side, side))
    net = VQDiffusion(codebook_size=k, num_classes=4, token_size=side, num_timesteps=steps, hidden_size=64,
                      depth=2, num_heads=4)  # fmt: skip
    process = VQDiffusionProcess(DiscreteSchedule(num_timesteps=steps))
    process.prepare_net(net)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    labels = torch.arange(4).repeat(8)
    for _ in range(120):
        loss, terms = process.training_losses(net, maps[labels], {"y": labels})
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert terms["acc"] > 0.99, terms
    net.eval()
    with torch.no_grad():
        out = process.sample(net, (4, side, side), {"y": torch.arange(4)}, Guider(),
                             torch.Generator().manual_seed(0), sampler="ancestral", steps=steps)  # fmt: skip
    assert torch.equal(out, maps), (out, maps)


# -- the pruned tokenizer (VQ-Diffusion's ImageNet codes) ------------------------------------------------------
def _pruned(tmp_path, table=None, classes=5):
    cfg = compose(["first_stage=vq_fashion", "data=synthetic"])
    tokenizer = instantiate(cfg.first_stage)
    if table is None:
        table = torch.zeros(512, dtype=torch.long)
        table[torch.tensor([7, 3, 300, 11])] = torch.tensor([1, 2, 3, 4])
        table[100] = 3  # a second code of class 3: class 3 decodes to the first (100), as the official table
    path = tmp_path / "map.pt"
    torch.save(table, path)
    return PrunedTokenizer(tokenizer, codebook_size=classes, code_map=path, name="pruned"), tokenizer


def test_pruned_tokenizer_maps_codes_to_classes_and_decodes_each_class_as_its_first_code(tmp_path):
    pruned, full = _pruned(tmp_path)
    assert pruned.codebook_size == 5 and pruned.full_codebook_size == 512 and pruned.token_size == 8
    assert pruned.pruned_to_full.tolist() == [0, 7, 3, 100, 11]
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    codes = full.encode_to_indices(images)
    assert torch.equal(pruned.encode_to_indices(images), pruned.full_to_pruned[codes])
    classes = torch.tensor([[[0, 1], [3, 4]]]).expand(1, 2, 2).repeat(1, 4, 4)
    torch.testing.assert_close(pruned.decode_indices(classes), full.decode_indices(pruned.pruned_to_full[classes]))
    with pytest.raises(LightgenConfigError, match=r"\[0, 5\)"):
        pruned.decode_indices(torch.full((1, 8, 8), 5))


def test_the_imagenet_pruned_tokenizer_config_has_the_official_sizes():
    cfg = compose(["first_stage=vqgan_f16_16384_974", "data=imagenet", "data.image_size=256"])
    fs = instantiate(cfg.first_stage)
    assert (fs.codebook_size, fs.full_codebook_size, fs.token_size, fs.latent_channels) == (974, 16384, 16, 256)
    assert sum(p.numel() for p in fs.parameters()) == 76_073_859  # vqgan_f16_1024's 72,141,699 + 15,360 x 256
    with pytest.raises(LightgenConfigError, match="first_stage.code_map=<local file>"):
        fs.encode_to_indices(torch.zeros(1, 3, 256, 256))


@pytest.mark.parametrize(
    ("table", "classes", "phrase"),
    [
        (torch.zeros(100, dtype=torch.long), 1, "has 100 entries but first_stage=pruned has 512 codes"),
        (torch.arange(512) % 7, 5, "set first_stage.codebook_size=7"),
        (torch.arange(512) % 3, 5, "maps no code to class 3"),
    ],
)
def test_a_code_table_that_does_not_fit_is_refused_in_one_sentence(tmp_path, table, classes, phrase):
    with pytest.raises(LightgenConfigError) as err:
        _pruned(tmp_path, table, classes)
    assert phrase in str(err.value) and "\n" not in str(err.value), str(err.value)


# -- through the CLIs --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vqd_run(token_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("vqd_run")
    run_cli("train", *SMOKE, "data=tokens", f"data.path={token_dir}", "data.batch_size=8", f"hydra.run.dir={run}")
    return run


@pytest.mark.slow
def test_train_on_extracted_tokens_logs_the_vq_diffusion_terms_and_keeps_the_history(vqd_run):
    rows = list(csv.DictReader(open(vqd_run / "metrics.csv")))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"train/loss", "train/vb", "train/aux", "train/kl", "train/acc", "train/grad_norm"} <= logged, logged
    ck = _ckpt(vqd_run)
    assert ck["global_step"] == 4 and ck["lightgen"]["net_class"] == "lightgen.nets.vq_diffusion.VQDiffusion"
    count = ck["state_dict"]["process.Lt_count"]
    assert count.shape == (10,) and int(count.sum()) == 4 * 8, "every sample of every step is in the history"
    assert list((vqd_run / "samples").glob("step_*.png")), "the end-of-training grid"


@pytest.mark.slow
def test_two_sampling_processes_give_the_same_images_as_one(vqd_run, tmp_path):
    ckpt = vqd_run / "checkpoints" / "last.ckpt"
    args = [f"ckpt={ckpt}", "num_samples=10", "batch_size=4", "steps=5"]
    run_cli("sample", *args, f"out={tmp_path / 'one'}")
    run_cli("sample", *args, f"out={tmp_path / 'two'}", "trainer=ddp_cpu")
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert a["arr_0"].shape == (10, 32, 32, 1) and a["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    info = json.loads((tmp_path / "two" / "sample_info.json").read_text())
    assert info["sampler"] == "ancestral" and info["steps"] == 5 and info["truncation"] == 0.86
    run_cli("sample", *args, "truncation=1.0", f"out={tmp_path / 'untruncated'}")
    c = np.load(tmp_path / "untruncated" / "samples.npz")["arr_0"]
    assert not np.array_equal(a["arr_0"], c), "the truncation reaches the sampler"


@pytest.mark.slow
def test_two_training_processes_put_both_ranks_samples_in_the_history(token_dir, tmp_path):
    """Under DDP the importance-sampling history takes every rank's samples (the global batch of 4 is 2 per rank:
    rank 0's history alone would count 6)."""
    data = ["data=tokens", f"data.path={token_dir}", "data.batch_size=4", "callbacks.sample_grid=null"]
    run_cli("train", *SMOKE, *data, "trainer=ddp_cpu", "trainer.max_steps=3", f"hydra.run.dir={tmp_path}")
    count = _ckpt(tmp_path)["state_dict"]["process.Lt_count"]
    assert int(count.sum()) == 3 * 4, "3 steps x (2 samples x 2 ranks)"


@pytest.mark.slow
def test_resume_continues_bit_for_bit_with_the_loss_history(token_dir, tmp_path):
    """4 steps, then a re-run to 6 in the same directory (auto-resume) equals 6 steps in one go."""
    data = ["data=tokens", f"data.path={token_dir}", "data.batch_size=8", "callbacks.sample_grid=null"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli("train", *SMOKE, *data, "trainer.max_steps=6", f"hydra.run.dir={straight}")
    run_cli("train", *SMOKE, *data, "trainer.max_steps=4", f"hydra.run.dir={resumed}")
    run_cli("train", *SMOKE, *data, "trainer.max_steps=6", f"hydra.run.dir={resumed}")
    a, b = _ckpt(straight), _ckpt(resumed)
    assert a["global_step"] == b["global_step"] == 6
    assert int(a["state_dict"]["process.Lt_count"].sum()) == 6 * 8
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
        (["model=vq_diffusion_tiny", "schedule=linear"], "needs a discrete schedule but schedule=linear is a gaussian"),
        (
            ["model=vq_diffusion_tiny", "schedule=mask_cosine"],
            "needs a discrete schedule but schedule=cosine is a mask",
        ),
        (["schedule=vqd_alpha1"], "needs a gaussian schedule but schedule=vqd_alpha1 is a discrete"),
        (["model=vq_diffusion_tiny", "first_stage=identity"], "is not a VQ tokenizer"),
    ],
)
def test_groups_that_cannot_work_together_are_refused_before_anything_is_built(args, phrase):
    with pytest.raises(LightgenConfigError) as err:
        check_composition(compose(["experiment=smoke", *args]))
    assert phrase in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["model.num_timesteps=50"], "50"),
        (["method.sampling.steps=7"], "steps=7 must divide num_timesteps=100"),
        (["method.sampling.truncation=1.5"], "truncation=1.5 must lie in (0, 1]"),
        (["method.sampling.truncation=0"], "truncation=0.0 must lie in (0, 1]"),
        (["model.codebook_size=256"], "models 256 codes but the tokenizer first_stage=vq_fashion has 512"),
        (["model.token_size=4"], "set model.token_size=8"),
    ],
)
def test_bad_vq_diffusion_settings_fail_when_the_method_is_built(args, phrase):
    cfg = compose(["experiment=smoke", "model=vq_diffusion_tiny", "first_stage=vq_fashion", *args])
    with pytest.raises(Exception) as err:
        instantiate(cfg.method)
    cause = root_cause(err.value)
    assert phrase in str(cause) and "\n" not in str(cause), str(cause)


@pytest.mark.slow
def test_tokens_of_another_codebook_are_refused_before_work(token_dir, tmp_path):
    _fails(
        [*SMOKE, "data=tokens", f"data.path={token_dir}", "first_stage.codebook_size=256", f"hydra.run.dir={tmp_path}"],
        "256",
    )
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_bad_sampling_settings_fail_in_one_sentence(vqd_run, tmp_path):
    ckpt = vqd_run / "checkpoints" / "last.ckpt"
    _fails([f"ckpt={ckpt}", "steps=3", f"out={tmp_path / 'a'}"], "steps=3 must divide num_timesteps=10", "sample")
    _fails([f"ckpt={ckpt}", "truncation=2", f"out={tmp_path / 'b'}"], "truncation=2.0 must lie in (0, 1]", "sample")
    _fails([f"ckpt={ckpt}", "sampler=maskgit", f"out={tmp_path / 'c'}"], "not a VQ-Diffusion sampler", "sample")
    assert not (tmp_path / "a" / "samples.npz").exists()
