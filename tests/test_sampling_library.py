"""One sampling library (lightgen.sampling) behind lightgen.sample, the FID callback and the sample grid.

* the three draw identical images for the same seed, labels and batch;
* a checkpoint written before the method group / guider / process refactor (tests/data/pre_refactor_mdt:
  an MDTv2 smoke run of commit 90e7593, trained 2 steps with ema_decay 0 so its EMA is a real net) still
  samples through the CLI -- to the very same samples.npz the old code wrote -- and still resumes training.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import SMOKE, run_cli

from lightgen import sampling
from lightgen.callbacks.fid import FIDCallback
from lightgen.callbacks.sample_grid import SampleGrid
from lightgen.compose import method_from_checkpoint, upgrade_config
from lightgen.metrics.fid import FeatureStats
from lightgen.utils.image_grids import to_uint8

OLD = Path(__file__).parent / "data" / "pre_refactor_mdt"


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory) -> Path:
    """A smoke run whose EMA equals the net (decay 0) after a few large steps: samples depend on it."""
    run = tmp_path_factory.mktemp("lib_smoke")
    run_cli(
        "train", *SMOKE, f"hydra.run.dir={run}", "method.ema_decay=0.0", "optim.optimizer.lr=0.01",
        "trainer.max_steps=3",
    )  # fmt: skip
    return run / "checkpoints" / "last.ckpt"


def _cli_samples(ckpt, out, labels: str, n: int, batch: int) -> np.ndarray:
    run_cli("sample", f"ckpt={ckpt}", f"num_samples={n}", f"batch_size={batch}", f"labels={labels}", "steps=3",
            "cfg_scale=3.0", f"out={out}")  # fmt: skip
    return np.load(Path(out) / "samples.npz")["arr_0"]


@pytest.mark.slow
def test_sample_cli_fid_callback_and_grid_draw_the_same_images(trained_ckpt, tmp_path, monkeypatch):
    module, _, _ = method_from_checkpoint(trained_ckpt)
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, global_rank=0, world_size=1,
                              default_root_dir=str(tmp_path), loggers=[])  # fmt: skip
    # the grid: 2 classes x 2 samples, one batch seeded by (seed, 0)
    grids = []
    monkeypatch.setattr("lightgen.callbacks.sample_grid.save_grid", lambda images, path, nrow: grids.append(images))
    monkeypatch.setattr("lightgen.callbacks.sample_grid.log_image_to_loggers", lambda *a: None)
    SampleGrid(every_n_steps=0, samples_per_class=2, max_classes=2, seed=0, steps=3, cfg_scale=3.0).make_grid(
        trainer, module
    )
    cli_grid = _cli_samples(trained_ckpt, tmp_path / "grid", "[0,1]", 4, 4)
    np.testing.assert_array_equal(to_uint8(grids[0]).numpy(), cli_grid)
    assert len({a.tobytes() for a in cli_grid}) == 4, "every sample is its own image"

    # the FID callback: 5 balanced samples in batches of 2; capture what reaches Inception
    seen = []

    class Features:
        def features(self, images):
            seen.append(images.clone())
            return {"pool": torch.randn(len(images), 2048, dtype=torch.float64)}

    fid = FIDCallback(at_end=True, num_samples=5, batch_size=2, seed=0, steps=3, cfg_scale=3.0, grid_samples=0)
    monkeypatch.setattr(fid, "extractor", lambda device: Features())
    ref = FeatureStats(np.zeros(2048), np.eye(2048), 2)
    monkeypatch.setattr(fid, "reference", lambda trainer, device: ref)
    monkeypatch.setattr(module, "print", lambda *a, **k: None)  # LightningModule.print needs a Trainer
    assert np.isfinite(fid.compute(trainer, module))
    cli_fid = _cli_samples(trained_ckpt, tmp_path / "fid", "balanced", 5, 2)
    np.testing.assert_array_equal(torch.cat(seen).numpy(), cli_fid)


def test_draw_batch_depends_on_seed_and_batch_not_on_the_caller():
    calls = []

    class Method:
        device = torch.device("cpu")

        def generate(self, labels, generator, **settings):
            calls.append((labels.tolist(), settings))
            return torch.randn(len(labels), generator=generator)

    labels = torch.arange(10)
    a = sampling.draw_batch(Method(), labels, 4, 7, 2, cfg_scale=2.0)
    b = sampling.draw_batch(Method(), labels, 4, 7, 2, cfg_scale=2.0)
    c = sampling.draw_batch(Method(), labels, 4, 7, 1, cfg_scale=2.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert calls[0] == ([8, 9], {"cfg_scale": 2.0, "progress": False})
    assert list(sampling.rank_batches(7, 1, 3)) == [1, 4]


def test_settings_resolution_is_one_place():
    s = sampling.resolve_settings({"steps": 100, "cfg_scale": 1.5}, {"steps": None, "sampler": "ddim"})
    assert s == {**sampling.DEFAULTS, "steps": 100, "cfg_scale": 1.5, "sampler": "ddim"}
    with pytest.raises(ValueError, match="unknown sampling setting.*sampling_steps"):
        sampling.resolve_settings({}, {"sampling_steps": 3})
    with pytest.raises(ValueError, match="positive number of sampling steps"):
        sampling.resolve_settings({"steps": 0})


def test_an_old_checkpoint_config_is_upgraded_in_memory():
    ckpt = torch.load(OLD / "last.ckpt", map_location="cpu", weights_only=False)
    old = ckpt["lightgen"]["config"]
    assert old["diffusion"]["_target_"] == "lightgen.diffusion.create_diffusion" and "net" not in old["method"]
    new = upgrade_config(old)
    assert new["diffusion"]["_target_"] == "lightgen.diffusion.GaussianDiffusionProcess"
    assert new["method"]["process"]["masking"]["_target_"] == "lightgen.masking.TokenMasking"
    assert "guidance_channels" not in new["method"]["net"] and new["method"]["sampling"]["guidance_channels"] == 3
    assert upgrade_config(new) == new, "a config in today's layout comes back unchanged"
    moved = upgrade_config({**old, "optim": {"scheduler": {"_target_": "lightgen.methods.schedules.warmup_cosine"}}})
    assert moved["method"]["scheduler"]["_target_"] == "lightgen.methods.lr_schedules.warmup_cosine"
    assert "net" not in old["method"], "the stored config is not modified"


@pytest.mark.slow
def test_a_checkpoint_written_before_the_refactor_samples_the_same_images_and_resumes(tmp_path):
    out = tmp_path / "s"
    run_cli("sample", f"ckpt={OLD / 'last.ckpt'}", "num_samples=6", "batch_size=3", "steps=4", "cfg_scale=3.0",
            "cfg_schedule=power_cosine", f"out={out}")  # fmt: skip
    new = np.load(out / "samples.npz")
    old = np.load(OLD / "samples_n6_b3_ddpm4_cfg3pc4.npz")  # written by lightgen.sample at commit 90e7593
    np.testing.assert_array_equal(new["arr_0"], old["arr_0"])
    np.testing.assert_array_equal(new["arr_1"], old["arr_1"])
    # and training resumes from it (same model settings as the old run)
    run = tmp_path / "resumed"
    proc = run_cli(
        "train", *SMOKE, f"hydra.run.dir={run}", f"ckpt_path={OLD / 'last.ckpt'}", "model=mdt_s",
        "model.hidden_size=16", "model.depth=2", "model.num_heads=2", "model.decode_layer=1", "model.patch_size=8",
        "masking=mdt_v2", "method.ema_decay=0.0", "optim.optimizer.lr=0.01", "trainer.max_steps=3",
    )  # fmt: skip
    assert "resuming from" in proc.stdout
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
