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
