"""The fast Gaussian samplers (diffusers' DPM-Solver++ 2M, UniPC, Euler) inside GaussianDiffusionProcess.

Closed form: for data x0 ~ N(m, s²) per coordinate the exact ε of x_t = √ᾱ x0 + √(1−ᾱ) ε is
√(1−ᾱ)(x − √ᾱ m)/(ᾱ s² + 1 − ᾱ), and the probability-flow ODE keeps (x − √ᾱ m)/√(ᾱ s² + 1 − ᾱ), so noise z at
t = T − 1 maps to m + s·(z − √ᾱ_T m)/√(ᾱ_T s² + 1 − ᾱ_T). Guidance ε_u + w(ε_c − ε_u) of two such oracles with
the same s is the oracle of the mean m_u + w(m_c − m_u), so guided sampling has a closed form too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightgen.diffusion import solvers
from lightgen.diffusion.guidance import Guider
from lightgen.diffusion.process import GaussianDiffusionProcess
from lightgen.nets.dit import DiT

S0 = 0.5  # data standard deviation
C, H = 4, 4


class GaussianOracle(torch.nn.Module):
    """The exact ε of class-wise Gaussian data (class k: mean ``means[k]``, std S0); ``null_class`` is the last
    row. Fractional timesteps interpolate σ = √((1−ᾱ)/ᾱ) linearly, as diffusers' Euler does."""

    def __init__(self, betas: np.ndarray, means: torch.Tensor, learn_sigma: bool = False):
        super().__init__()
        abar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
        self.sigmas = np.sqrt((1 - abar) / abar)
        self.means = means.double()
        self.null_class = len(means) - 1
        self.learn_sigma = learn_sigma

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        sigma = np.interp(t.double().cpu().numpy(), np.arange(len(self.sigmas)), self.sigmas)
        return torch.from_numpy(1.0 / (1.0 + sigma**2))

    def forward(self, x, t, y):
        a = self.abar(t).view(-1, 1, 1, 1)
        m = self.means[y]
        eps = (1 - a).sqrt() * (x.double() - a.sqrt() * m) / (a * S0**2 + 1 - a)
        eps = eps.to(x.dtype)
        return torch.cat([eps, torch.full_like(eps, 7.0)], dim=1) if self.learn_sigma else eps


def exact_x0(z: torch.Tensor, m: torch.Tensor, abar_T: float) -> torch.Tensor:
    return m + S0 * (z.double() - abar_T**0.5 * m) / (abar_T * S0**2 + 1 - abar_T) ** 0.5


def _setup(learn_sigma=False, num_classes=3):
    process = GaussianDiffusionProcess(learn_sigma=learn_sigma)
    means = torch.randn(num_classes + 1, C, H, H, generator=torch.Generator().manual_seed(1))
    return process, GaussianOracle(process.diffusion.betas, means, learn_sigma), means.double()


def _run(process, net, y, sampler, steps, guider=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = process.sample(net, (len(y), C, H, H), {"y": y}, guider or Guider(), g, sampler=sampler, steps=steps)
    z = torch.randn((len(y), C, H, H), generator=torch.Generator().manual_seed(seed))
    return out.double(), z


# max |error| at 50 steps, measured 0.0008 / 0.0063 / 0.096 (float32); at 10 steps all are ~0.3-0.5 (the last step,
# t = 100 -> 0, is first order in every scheduler)
TOL_50 = {"dpmpp_2m": 0.005, "unipc": 0.02, "euler": 0.15}


@pytest.mark.parametrize("sampler", list(solvers.FAST_SAMPLERS))
def test_fast_samplers_solve_the_probability_flow_ode_of_gaussian_data(sampler):
    process, net, means = _setup()
    y = torch.tensor([0, 1, 2, 0])
    abar_T = float(np.cumprod(1 - process.diffusion.betas)[-1])
    errors = {}
    for steps in (10, 50):
        out, z = _run(process, net, y, sampler, steps)
        errors[steps] = (out - exact_x0(z, means[y], abar_T)).abs().max().item()
    assert errors[50] < TOL_50[sampler], errors
    assert errors[50] < errors[10] / 3, "more steps, a smaller error"


def test_second_order_solvers_beat_euler_at_equal_steps():
    process, net, means = _setup()
    y = torch.tensor([0, 1, 2])
    abar_T = float(np.cumprod(1 - process.diffusion.betas)[-1])
    err = {}
    for sampler in solvers.FAST_SAMPLERS:
        out, z = _run(process, net, y, sampler, 20)
        err[sampler] = (out - exact_x0(z, means[y], abar_T)).abs().max().item()
    assert max(err["dpmpp_2m"], err["unipc"]) < err["euler"] / 2, err  # measured 0.079, 0.073 vs 0.237


@pytest.mark.parametrize("channels", [3, "all"])
def test_guidance_and_learned_sigma_follow_the_closed_form(channels):
    process, net, means = _setup(learn_sigma=True)
    y = torch.tensor([0, 2])
    abar_T = float(np.cumprod(1 - process.diffusion.betas)[-1])
    w = 2.5
    guider = Guider(scale=w, schedule="constant", channels=channels, num_timesteps=1000)
    out, z = _run(process, net, y, "dpmpp_2m", 50, guider)
    m_c, m_u = means[y], means[net.null_class].expand_as(means[y])
    m = m_u + w * (m_c - m_u)
    if channels == 3:
        m = torch.cat([m[:, :3], m_c[:, 3:]], dim=1)  # the official DiT guides 3 of 4 ε channels
    assert (out - exact_x0(z, m, abar_T)).abs().max().item() < TOL_50["dpmpp_2m"]


@pytest.mark.parametrize("sampler", list(solvers.FAST_SAMPLERS))
def test_each_sampler_equals_a_dit_pipeline_loop_on_the_same_net(sampler):
    """diffusers' DiTPipeline loop (doubled latents, guidance on all latent channels, learned Σ split off,
    ``scheduler.step`` on the doubled batch) and lightgen's give the same samples for the same noise."""
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    with torch.no_grad():
        for p in net.parameters():  # zero-initialised output layers would give ε = 0
            p.add_(0.05 * torch.randn_like(p))
    net.eval()
    process = GaussianDiffusionProcess()
    y, scale, steps = torch.tensor([1, 3]), 4.0, 8
    guider = Guider(scale=scale, channels="all", num_timesteps=1000)
    with torch.no_grad():
        ours = process.sample(net, (2, 4, 8, 8), {"y": y}, guider, torch.Generator().manual_seed(3),
                              sampler=sampler, steps=steps)  # fmt: skip
        scheduler = solvers.make_scheduler(sampler, process.diffusion.betas, steps)
        latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3)) * scheduler.init_noise_sigma
        labels = torch.cat([y, torch.full_like(y, net.null_class)])
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            noise_pred = net(model_input, t.expand(4), labels)
            eps, rest = noise_pred[:, :4], noise_pred[:, 4:]
            cond_eps, uncond_eps = eps.chunk(2)
            half = uncond_eps + scale * (cond_eps - uncond_eps)
            model_output = torch.cat([torch.cat([half, half]), rest], dim=1)[:, :4]
            latents = scheduler.step(model_output, t, torch.cat([latents, latents])).prev_sample.chunk(2)[0]
    torch.testing.assert_close(ours, latents, atol=1e-5, rtol=1e-5)


def test_second_order_solvers_at_25_steps_land_on_ddim_250():
    """Both solve the same ODE: DPM-Solver++ and UniPC at 25 steps within 0.04 of ADM's DDIM at 250 (measured
    0.026 / 0.024); Euler at 25 (0.20), DDIM at 25 (0.19) and DPM-Solver++ at 5 steps (0.88) are not."""
    process, net, _ = _setup()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ddim, _ = _run(process, net, y, "ddim", 250)
    gap = {(s, n): (_run(process, net, y, s, n)[0] - ddim).abs().max().item()
           for s, n in [("dpmpp_2m", 25), ("unipc", 25), ("euler", 25), ("dpmpp_2m", 5)]}  # fmt: skip
    assert gap[("dpmpp_2m", 25)] < 0.04 and gap[("unipc", 25)] < 0.04, gap
    assert gap[("euler", 25)] > 0.1 and gap[("dpmpp_2m", 5)] > 0.1, gap


@pytest.mark.parametrize("steps", [0, 1001, 2.5, True])
def test_steps_outside_the_training_range_are_one_sentence(steps):
    process = GaussianDiffusionProcess()
    with pytest.raises(ValueError, match=r"does not fit sampler=unipc: .* \[1, 1000\]"):
        process.check_sampling("unipc", steps)


def test_unknown_sampler_names_every_choice():
    with pytest.raises(ValueError, match="ddpm, ddim, dpmpp_2m, unipc, euler"):
        GaussianDiffusionProcess().check_sampling("heun", 20)
