"""Classifier-free guidance as one part (lightgen.diffusion.guidance.Guider), on every net.

Closed forms: scale 1 is the conditional forward; on ε only the selected channels move and follow
``uncond + s (cond - uncond)``; per-sample scales; the schedules' end points; logits and log-probability
combination; the doubled-state model (official DiT loop) and the per-step doubled forward agree.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightgen.diffusion.guidance import (
    Guider,
    cfg_on_eps_pairs,
    guidance_scale,
    linear_scale,
    power_cosine_scale,
    resolve_guidance_channels,
)
from lightgen.nets.diffit import DiffiT, DiffiTUNet
from lightgen.nets.dit import DiT
from lightgen.nets.mdt import MDT

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
NETS = {
    "dit": lambda: DiT(**TINY),
    "mdt": lambda: MDT(**{**TINY, "depth": 6}),
    "diffit": lambda: DiffiT(**TINY),
    "diffit_unet": lambda: DiffiTUNet(
        input_size=16,
        in_channels=1,
        num_classes=10,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        num_heads=2,
        norm_groups=4,
    ),
}


def _net(name: str, seed: int = 0):
    torch.manual_seed(seed)
    net = NETS[name]()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-initialised heads would make every output equal
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


def _inputs(net, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, net.in_channels, net.input_size, net.input_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, net.num_classes, (n,), generator=g)
    return x, t, y


@pytest.mark.parametrize("name", list(NETS))
@torch.no_grad()
def test_scale_one_is_the_conditional_forward_on_every_net(name):
    net = _net(name)
    x, t, y = _inputs(net)
    cond = net(x, t, y)
    guider = Guider(scale=1.0)
    assert not guider.enabled
    torch.testing.assert_close(guider.guided_forward(net.forward, net, x, t, {"y": y}), cond)
    # the doubled-state model at scale 1: the conditional half is the conditional forward
    xx, cc = Guider(scale=4.0).double(net, x, {"y": y})
    out = Guider(scale=1.0).paired_eps_model(net.forward)(xx, torch.cat([t, t]), **cc)
    torch.testing.assert_close(out[:3], cond, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["dit", "mdt", "diffit"])
@pytest.mark.parametrize(("channels", "guided"), [(3, 3), ("all", 4), (1, 1)])
@torch.no_grad()
def test_eps_guidance_moves_only_the_selected_channels(name, channels, guided):
    net = _net(name)
    x, t, y = _inputs(net)
    null = torch.full_like(y, net.null_class)
    cond, uncond = net(x, t, y), net(x, t, null)
    guider = Guider(scale=4.0, channels=channels)
    out = guider.guided_forward(net.forward, net, x, t, {"y": y})
    expected = uncond[:, :guided] + 4.0 * (cond[:, :guided] - uncond[:, :guided])
    torch.testing.assert_close(out[:, :guided], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, guided:], cond[:, guided:], atol=1e-5, rtol=1e-5)
    # the doubled-state model (official forward_with_cfg): both halves get the guided channels,
    # every other channel keeps its own half's value
    xx, cc = guider.double(net, x, {"y": y})
    paired = guider.paired_eps_model(net.forward)(xx, torch.cat([t, t]), **cc)
    torch.testing.assert_close(paired[:3, :guided], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paired[3:, :guided], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paired[3:, guided:], uncond[:, guided:], atol=1e-5, rtol=1e-5)


def test_three_channels_on_a_one_channel_model_guide_that_channel():
    """As the official slice eps[:, :3]: 3 on a 1-channel pixel model guides its one channel."""
    assert resolve_guidance_channels(3, 1) == 1
    assert resolve_guidance_channels(5, 4) == 4
    assert resolve_guidance_channels(3, 4) == 3
    assert resolve_guidance_channels("all", 4) == 4


@pytest.mark.parametrize("bad", [0, "most", True, -2, 1.5])
def test_bad_guidance_channels_are_one_sentence(bad):
    with pytest.raises(ValueError, match=r"guidance_channels=.* is not valid") as err:
        Guider(scale=2.0, channels=bad)
    assert "\n" not in str(err.value)


def test_per_sample_scales_and_odd_batches():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(6, 8, 2, 2, generator=g)
    scales = torch.tensor([1.0, 2.5, 4.0], dtype=torch.float64)
    half = cfg_on_eps_pairs(out, 4, 3, scales)
    torch.testing.assert_close(half, cfg_on_eps_pairs(out, 4, 3, torch.cat([scales, torch.zeros(3)])))
    for i, s in enumerate(scales.tolist()):
        ref = cfg_on_eps_pairs(out, 4, 3, s)
        torch.testing.assert_close(half[i], ref[i])
        torch.testing.assert_close(half[3 + i], ref[3 + i])
    with pytest.raises(ValueError, match="per-sample cfg scale"):
        cfg_on_eps_pairs(out, 4, 3, torch.ones(4))
    with pytest.raises(ValueError, match=r"\[cond; uncond\]"):
        cfg_on_eps_pairs(torch.zeros(3, 8, 2, 2), 4, 3, 2.0)


def test_schedules_end_points_and_closed_forms():
    t = torch.tensor([999, 500, 0])
    pc = power_cosine_scale(t, 3.8, 4.0, 1000)
    assert pc[0].item() == pytest.approx(1.0, abs=1e-9)  # no guidance at pure noise
    assert pc[2].item() == pytest.approx(3.8)  # full at t = 0
    assert pc[1].item() == pytest.approx(1 + 2.8 * (1 - math.cos(math.pi * 0.5**4)) / 2)
    lin = linear_scale(t, 3.0, 1000)
    torch.testing.assert_close(lin, torch.tensor([1.0 + 2.0 * 0.001, 2.0, 3.0], dtype=torch.float64))
    assert guidance_scale(t, 3.8, "constant") == 3.8
    guider = Guider(scale=3.8, schedule="power_cosine", scale_pow=4.0)
    torch.testing.assert_close(guider.scale_at(t), pc)
    with pytest.raises(ValueError, match="not a guidance schedule"):
        Guider(scale=2.0, schedule="cosine")
    with pytest.raises(ValueError, match="scale_pow"):
        Guider(scale=2.0, schedule="power_cosine", scale_pow=0)


def test_logits_and_log_prob_guidance():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    t = torch.zeros(2, dtype=torch.long)
    logits = Guider(scale=2.0, on="logits").combine(cond, uncond, t)
    torch.testing.assert_close(logits, uncond + 2.0 * (cond - uncond))
    lp_c, lp_u = cond.log_softmax(1), uncond.log_softmax(1)
    lp = Guider(scale=3.0, on="log_probs").combine(lp_c, lp_u, t)
    torch.testing.assert_close(lp, (lp_u + 3.0 * (lp_c - lp_u)).log_softmax(1).clamp(-70, 0))
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(2, 3))
    with pytest.raises(ValueError, match="guidance on='x' is not understood"):
        Guider(scale=2.0, on="x")


def test_guidance_needs_a_null_class():
    net = DiT(**{**TINY, "class_dropout_prob": 0.0})
    assert net.null_class is None and DiT(**TINY).null_class == 10
    x, t, y = _inputs(net)
    with pytest.raises(ValueError, match="needs a net trained with label dropout"):
        Guider(scale=4.0).guided_forward(net.forward, net, x, t, {"y": y})
