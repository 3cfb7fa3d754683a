"""GPU-only checks: skipped without a CUDA device, never faked."""

from __future__ import annotations

import pytest
import torch
from conftest import SMOKE, run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_autocast_training_step_matches_fp32_loosely():
    from lightgen.diffusion import create_diffusion
    from lightgen.nets.dit import DiT

    torch.manual_seed(0)
    net = DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=4, num_classes=10).cuda()
    for p in net.parameters():
        p.data.normal_(0, 0.02)
    d = create_diffusion("")
    x = torch.randn(8, 4, 16, 16, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    t = torch.randint(0, 1000, (8,), device="cuda")
    noise = torch.randn_like(x)
    fp32 = d.training_losses(net, x, t, {"y": y}, noise=noise)["mse"].mean()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = d.training_losses(net, x, t, {"y": y}, noise=noise)["mse"].mean()
    bf16.backward()
    assert torch.isfinite(bf16) and abs(bf16.item() - fp32.item()) < 0.05 * fp32.item() + 1e-3


def test_train_entry_point_on_gpu(tmp_path):
    run_cli("train", *SMOKE, "trainer=gpu", "trainer.precision=bf16-mixed", f"hydra.run.dir={tmp_path / 'run'}")
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


QUICKSTARTS = {  # the five methods at quickstart size (token methods with random tokenizers: no decoding here)
    "dit": ["experiment=quickstart"],
    "mdt": ["experiment=quickstart_mdt"],
    "diffit": ["experiment=quickstart_diffit"],
    "maskgit": ["experiment=quickstart_maskgit", "first_stage.checkpoint=null"],
    "vq_diffusion": ["experiment=quickstart_vqdiffusion", "first_stage.checkpoint=null"],
}


def build_on_cuda(name: str):
    from conftest import compose

    from lightgen.compose import build_method

    torch.manual_seed(0)
    module = build_method(compose(QUICKSTARTS[name]).method).cuda()
    module.log_mean_across_ranks = lambda values, *a, **k: values  # no Trainer
    return module


def a_batch(module, n: int = 8) -> dict:
    g = torch.Generator("cuda").manual_seed(1)
    shape = module.sample_shape(n)
    y = torch.randint(0, module.net.num_classes, (n,), device="cuda", generator=g)
    if len(shape) == 4:
        return {"latent": torch.randn(shape, device="cuda", generator=g), "label": y}
    return {"tokens": torch.randint(0, module.first_stage.codebook_size, shape, device="cuda", generator=g), "label": y}


@pytest.mark.parametrize("name", list(QUICKSTARTS))
def test_every_method_trains_under_bf16_autocast_with_the_fp32_loss(name):
    module = build_on_cuda(name)
    batch = a_batch(module)
    torch.manual_seed(2)  # the same timesteps, noise, masks and label dropout in both passes
    fp32 = module.training_step(batch, 0)
    torch.manual_seed(2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = module.training_step(batch, 0)
    bf16.backward()
    assert torch.isfinite(bf16) and abs(bf16.item() - fp32.item()) < 0.05 * abs(fp32.item()) + 1e-3
    assert all(torch.isfinite(p.grad).all() for p in module.net.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "name, kernel",
    [("dit", "FLASH_ATTENTION"), ("maskgit", "FLASH_ATTENTION"), ("vq_diffusion", "FLASH_ATTENTION")]
    + [("mdt", "EFFICIENT_ATTENTION"), ("diffit", "EFFICIENT_ATTENTION")],  # a relative-position bias: attn_mask
)
def test_attention_runs_on_the_fused_sdpa_kernels_in_bf16(name, kernel, monkeypatch):
    """With only that kernel allowed, SDPA raises instead of falling back: the nets' attention is eligible for it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    module = build_on_cuda(name)
    with sdpa_kernel([getattr(SDPBackend, kernel)]), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = module.training_step(a_batch(module), 0)
        loss.backward()
    assert calls and torch.isfinite(loss)


def test_adam_and_adamw_take_the_fused_kernel_on_cuda():
    module = build_on_cuda("dit")
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert optimizer.defaults["fused"] is True


def test_a_frozen_autoencoder_decodes_in_channels_last_to_the_same_images():
    from lightgen.first_stage.kl import SmallKLAutoencoder

    torch.backends.cudnn.allow_tf32 = False  # compare layouts, not TF32 rounding
    try:
        torch.manual_seed(0)
        ae = SmallKLAutoencoder(block_out_channels=(32, 64, 64)).cuda().requires_grad_(False)
        z = torch.randn(4, 4, 8, 8, device="cuda")
        nchw = ae.vae.decode(z / ae.scale_factor).sample.clamp(-1, 1)
        out = ae.decode(z)
        conv = next(p for p in ae.parameters() if p.ndim == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, nchw, atol=1e-4, rtol=1e-4)
    finally:
        torch.backends.cudnn.allow_tf32 = True
