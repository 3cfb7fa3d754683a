"""Closed-form checks of the ADM / DiT Gaussian diffusion process (lightgen.diffusion)."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch

from lightgen.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    mean_flat,
    normal_kl,
    space_timesteps,
)

T = 1000


def _base_alphas_cumprod(schedule: str = "linear") -> np.ndarray:
    return np.cumprod(1.0 - get_named_beta_schedule(schedule, T))


def _epsilon_oracle(x0_value: torch.Tensor, var_value: float | None, schedule: str = "linear"):
    """A model that knows x_0 (point mass at ``x0_value``) and returns the exact ε for ORIGINAL steps t.

    With ``var_value`` set, it also returns constant variance channels (learned-Σ layout).
    """
    abar = torch.from_numpy(_base_alphas_cumprod(schedule))

    def model(x, t, **kwargs):
        a = abar.to(x.dtype)[t].view(-1, *([1] * (x.ndim - 1)))
        eps = (x - a.sqrt() * x0_value) / (1.0 - a).sqrt()
        if var_value is None:
            return eps
        return torch.cat([eps, torch.full_like(eps, var_value)], dim=1)

    return model


# ----------------------------------------------------------------------------------------------
# schedules
# ----------------------------------------------------------------------------------------------


def test_linear_schedule_endpoints():
    betas = get_named_beta_schedule("linear", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / (T - 1), rtol=1e-9)
    d = create_diffusion("")
    assert d.alphas_cumprod.dtype == np.float64
    assert d.alphas_cumprod[-1] == pytest.approx(4.04e-5, rel=5e-3)
    # other T: rescaled by 1000 / T
    np.testing.assert_allclose(get_named_beta_schedule("linear", 500)[[0, -1]], [2e-4, 0.04], rtol=1e-12)


@pytest.mark.parametrize("name", ["cosine", "squaredcos_cap_v2"])
def test_cosine_schedule_matches_alpha_bar(name):
    betas = get_named_beta_schedule(name, T)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    steps = np.arange(T)
    expected = f((steps + 1) / T) / f(0.0)
    abar = np.cumprod(1.0 - betas)
    # every beta except the last one is below the 0.999 cap
    np.testing.assert_allclose(abar[:-1], expected[:-1], rtol=1e-10, atol=1e-15)
    assert betas[-1] == pytest.approx(0.999)
    assert (betas[:-1] < 0.999).all()


def test_bad_schedule_name():
    with pytest.raises(ValueError, match="valid names are.*'linear'.*'cosine'"):
        get_named_beta_schedule("quadratic", T)
    with pytest.raises(ValueError, match="Unknown noise schedule"):
        create_diffusion(noise_schedule="sigmoid")


# ----------------------------------------------------------------------------------------------
# forward process and posterior
# ----------------------------------------------------------------------------------------------


def test_q_sample_moments():
    d = create_diffusion("")
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.tensor([-0.9, -0.2, 0.4, 1.0], dtype=torch.float64)
    for step in (0, 10, 500, 999):
        x_start = x0.expand(n, 4)
        noise = torch.randn(n, 4, generator=gen, dtype=torch.float64)
        xt = d.q_sample(x_start, torch.full((n,), step), noise=noise)
        abar = d.alphas_cumprod[step]
        se = math.sqrt((1 - abar) / n)
        np.testing.assert_allclose(xt.mean(0).numpy(), math.sqrt(abar) * x0.numpy(), atol=5 * se)
        np.testing.assert_allclose(xt.var(0).numpy(), 1 - abar, rtol=0.02)
        mean, var, logvar = d.q_mean_variance(x0[None], torch.tensor([step]))
        np.testing.assert_allclose(mean[0].numpy(), math.sqrt(abar) * x0.numpy(), rtol=1e-12)
        np.testing.assert_allclose(var.numpy(), 1 - abar, rtol=1e-12)
        np.testing.assert_allclose(logvar.numpy(), math.log(1 - abar), rtol=1e-12)


def test_posterior_closed_forms():
    d = create_diffusion("")
    betas, abar = d.betas, d.alphas_cumprod
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    alphas = 1.0 - betas
    np.testing.assert_allclose(d.posterior_variance, betas * (1 - abar_prev) / (1 - abar), rtol=1e-12)
    assert d.posterior_variance[0] == 0.0
    np.testing.assert_allclose(d.posterior_log_variance_clipped[0], math.log(d.posterior_variance[1]))
    np.testing.assert_allclose(d.posterior_log_variance_clipped[1:], np.log(d.posterior_variance[1:]))
    # Bayes: q(x_{t-1}|x_t,x0) ∝ N(x_t; √α_t x_{t-1}, β_t) · N(x_{t-1}; √ᾱ_{t-1} x0, 1-ᾱ_{t-1})
    precision = alphas[1:] / betas[1:] + 1.0 / (1.0 - abar_prev[1:])
    np.testing.assert_allclose(d.posterior_variance[1:], 1.0 / precision, rtol=1e-9)
    coef_x0 = np.sqrt(abar_prev[1:]) / (1.0 - abar_prev[1:]) / precision
    coef_xt = np.sqrt(alphas[1:]) / betas[1:] / precision
    np.testing.assert_allclose(d.posterior_mean_coef1[1:], coef_x0, rtol=1e-9)
    np.testing.assert_allclose(d.posterior_mean_coef2[1:], coef_xt, rtol=1e-9)
    # t = 0: the posterior is the point mass at x0
    assert d.posterior_mean_coef1[0] == pytest.approx(1.0) and d.posterior_mean_coef2[0] == 0.0
    # marginal consistency: x_t ~ q(x_t|x0), x_{t-1} ~ q(x_{t-1}|x_t,x0)  ⇒  x_{t-1} ~ q(x_{t-1}|x0)
    c1, c2 = d.posterior_mean_coef1, d.posterior_mean_coef2
    np.testing.assert_allclose(c1 + c2 * np.sqrt(abar), np.sqrt(abar_prev), rtol=1e-9)
    np.testing.assert_allclose(c2**2 * (1 - abar) + d.posterior_variance, 1 - abar_prev, rtol=1e-9, atol=1e-15)

    # the tensor API agrees with the arrays
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    xt = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 17, 999])
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    for i, step in enumerate(t.tolist()):
        torch.testing.assert_close(mean[i], c1[step] * x0[i] + c2[step] * xt[i])
        assert torch.all(var[i] == d.posterior_variance[step])
        assert torch.all(logvar[i] == d.posterior_log_variance_clipped[step])


def test_posterior_monte_carlo():
    """Sampling x_t then x_{t-1} from the posterior reproduces the q(x_{t-1}|x_0) marginal."""
    d = create_diffusion("")
    gen = torch.Generator().manual_seed(1)
    n = 200_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    for step in (1, 50, 700):
        t = torch.full((n,), step)
        xt = d.q_sample(x0, t, noise=torch.randn(n, 1, generator=gen, dtype=torch.float64))
        mean, var, _ = d.q_posterior_mean_variance(x0, xt, t)
        x_prev = mean + var.sqrt() * torch.randn(n, 1, generator=gen, dtype=torch.float64)
        abar_prev = d.alphas_cumprod[step - 1]
        assert x_prev.mean().item() == pytest.approx(math.sqrt(abar_prev) * 0.7, abs=5 * math.sqrt(1 / n))
        assert x_prev.var().item() == pytest.approx(1 - abar_prev, rel=0.02)


# ----------------------------------------------------------------------------------------------
# likelihood helpers and the VLB
# ----------------------------------------------------------------------------------------------


def test_normal_kl_and_discretized_likelihood():
    g = torch.Generator().manual_seed(2)
    m1, m2 = (
        torch.randn(50, generator=g, dtype=torch.float64),
        torch.randn(50, generator=g, dtype=torch.float64),
    )
    l1, l2 = (
        torch.randn(50, generator=g, dtype=torch.float64),
        torch.randn(50, generator=g, dtype=torch.float64),
    )
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * l1).exp()), torch.distributions.Normal(m2, (0.5 * l2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, l1, m2, l2), ref)
    torch.testing.assert_close(normal_kl(m1, l1, 0.0, 0.0), normal_kl(m1, l1, torch.zeros(50), torch.zeros(50)))
    # the 256 bins of the discretised Gaussian sum to one
    levels = torch.linspace(-1.0, 1.0, 256, dtype=torch.float64)
    for mu, log_sigma in ((0.1, -2.0), (-0.95, -4.0), (0.3, 0.5)):
        logp = discretized_gaussian_log_likelihood(
            levels, means=torch.full_like(levels, mu), log_scales=torch.full_like(levels, log_sigma)
        )
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    x = torch.zeros(2, 3)
    assert mean_flat(torch.arange(6.0).view(2, 3)).tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match="same shape"):
        discretized_gaussian_log_likelihood(x, means=x[:1], log_scales=x)


def _random_output_model(seed: int):
    gen = torch.Generator().manual_seed(seed)

    def model(x, t, **kwargs):
        eps = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        v = torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1
        return torch.cat([eps, v], dim=1)

    return model


def test_vlb_terms_finite_and_nonnegative_at_all_steps():
    d = create_diffusion("")
    gen = torch.Generator().manual_seed(3)
    x0 = (torch.randint(0, 256, (T, 2, 4, 4), generator=gen) / 127.5 - 1.0).float()
    t = torch.arange(T)
    losses = d.training_losses(_random_output_model(4), x0, t)
    assert set(losses) == {"loss", "mse", "vb"}
    for key in ("loss", "mse", "vb"):
        assert losses[key].shape == (T,)
        assert torch.isfinite(losses[key]).all()
        assert (losses[key] >= 0).all()
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])


def test_vlb_zero_for_oracle_posterior():
    """ε̂ = true ε and v = -1 (σ² = β̃_t) reproduce q(x_{t-1}|x_t,x_0) exactly: KL = 0 for t > 0."""
    d = create_diffusion("")
    gen = torch.Generator().manual_seed(5)
    x0 = torch.rand(T, 3, 2, 2, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.arange(T)

    def oracle(x, steps, **kwargs):
        return torch.cat([noise, -torch.ones_like(noise)], dim=1)

    losses = d.training_losses(oracle, x0, t, noise=noise)
    assert losses["mse"].abs().max().item() == 0.0
    assert losses["vb"][1:].abs().max().item() < 1e-9
    assert torch.isfinite(losses["vb"][0]) and losses["vb"][0] > 0  # decoder NLL at t = 0
    # the largest variance (v = +1) is not the posterior: KL > 0
    wide = lambda x, steps, **kw: torch.cat([noise, torch.ones_like(noise)], dim=1)
    assert (d.training_losses(wide, x0, t, noise=noise)["vb"][1:] > 0).all()


def test_hybrid_loss_gradient_structure():
    d = create_diffusion("")
    gen = torch.Generator().manual_seed(6)
    x0 = torch.rand(8, 2, 4, 4, generator=gen) * 2 - 1
    t = torch.randint(0, T, (8,), generator=gen)
    eps_out = torch.randn(8, 2, 4, 4, generator=gen, requires_grad=True)
    var_out = (torch.rand(8, 2, 4, 4, generator=gen) * 2 - 1).requires_grad_()
    losses = d.training_losses(lambda x, s, **kw: torch.cat([eps_out, var_out], 1), x0, t)
    g_eps, g_var = torch.autograd.grad(losses["vb"].sum(), [eps_out, var_out], allow_unused=True, retain_graph=True)
    assert g_eps is None or torch.all(g_eps == 0)
    assert g_var is not None and g_var.abs().sum() > 0
    g_eps, g_var = torch.autograd.grad(losses["mse"].sum(), [eps_out, var_out], allow_unused=True)
    assert g_var is None or torch.all(g_var == 0)
    assert g_eps is not None and g_eps.abs().sum() > 0

    # a shared trunk receives gradients from both terms
    trunk = torch.nn.Conv2d(2, 4, 1)
    losses = d.training_losses(lambda x, s, **kw: trunk(x), x0, t)
    for key in ("mse", "vb"):
        (grad,) = torch.autograd.grad(losses[key].mean(), [trunk.weight], retain_graph=True)
        assert grad.abs().sum() > 0


def test_loss_variants():
    gen = torch.Generator().manual_seed(7)
    x0 = torch.rand(16, 2, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.arange(0, 1000, 64)
    model = _random_output_model(8)
    out = model(x0, t)
    fixed = lambda x, s, **kw: out

    plain = create_diffusion("").training_losses(fixed, x0, t, noise=noise)
    # rescaled MSE with T = 1000: the factor T/1000 is 1
    rescaled = create_diffusion("", rescale_learned_sigmas=True).training_losses(fixed, x0, t, noise=noise)
    torch.testing.assert_close(plain["loss"], rescaled["loss"])
    # KL loss: the VLB alone, × T
    kl = create_diffusion("", use_kl=True)
    assert kl.loss_type == LossType.RESCALED_KL
    kl_losses = kl.training_losses(fixed, x0, t, noise=noise)
    torch.testing.assert_close(kl_losses["loss"], plain["vb"] * T)
    # Min-SNR-5: MSE × min(SNR, 5)/SNR, VLB untouched
    for spec in ({"mse_loss_weighting": "min_snr"}, {"mse_loss_weighting": "min_snr_5"}):
        weighted = create_diffusion("", **spec).training_losses(fixed, x0, t, noise=noise)
        abar = torch.from_numpy(_base_alphas_cumprod()[t.numpy()]).float()
        snr = abar / (1 - abar)
        torch.testing.assert_close(weighted["mse"], plain["mse"] * torch.clamp(snr, max=5.0) / snr)
        torch.testing.assert_close(weighted["vb"], plain["vb"])
    x0_pred = create_diffusion("", predict_xstart=True, mse_loss_weighting="min_snr", min_snr_gamma=2.0)
    w = x0_pred.mse_loss_weight(t)
    torch.testing.assert_close(w, torch.clamp(snr, max=2.0))
    # fixed variances: no vb term, and the model must return C channels
    fixed_var = create_diffusion("", learn_sigma=False)
    assert fixed_var.model_var_type == ModelVarType.FIXED_LARGE
    assert set(fixed_var.training_losses(lambda x, s, **kw: out[:, :2], x0, t, noise=noise)) == {
        "loss",
        "mse",
    }
    # KL loss with a fixed variance (the network returns C channels)
    kl_fixed = create_diffusion("", use_kl=True, learn_sigma=False)
    kl_fixed_losses = kl_fixed.training_losses(lambda x, s, **kw: out[:, :2], x0, t, noise=noise)
    assert torch.isfinite(kl_fixed_losses["loss"]).all() and (kl_fixed_losses["vb"] >= 0).all()
    with pytest.raises(ValueError, match="learned variance"):
        create_diffusion("").training_losses(lambda x, s, **kw: out[:, :2], x0, t)
    for bad in ("p2", "min_snr_x", "min_snrx", "min_snr_-1"):
        with pytest.raises(ValueError, match="mse_loss_weighting"):
            create_diffusion("", mse_loss_weighting=bad)


def test_factory_enums_and_fixed_variances():
    d = create_diffusion("")
    assert isinstance(d, SpacedDiffusion) and isinstance(d, GaussianDiffusion)
    assert d.num_timesteps == T and d.timestep_map == list(range(T))
    assert d.model_mean_type == ModelMeanType.EPSILON
    assert d.model_var_type == ModelVarType.LEARNED_RANGE
    assert d.loss_type == LossType.MSE
    assert create_diffusion(None).num_timesteps == T
    with pytest.raises(ValueError, match="not a ModelMeanType; valid names are: PREVIOUS_X, START_X, EPSILON"):
        GaussianDiffusion(betas=d.betas, model_mean_type="velocity", model_var_type="learned_range", loss_type="mse")
    small = create_diffusion("", learn_sigma=False, sigma_small=True)
    assert small.model_var_type == ModelVarType.FIXED_SMALL
    large = create_diffusion("", learn_sigma=False)
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 5])
    out_large = large.p_mean_variance(lambda x, s, **kw: x, x, t)
    out_small = small.p_mean_variance(lambda x, s, **kw: x, x, t)
    assert out_large["variance"][0].flatten()[0].item() == pytest.approx(large.posterior_variance[1])
    assert out_large["variance"][1].flatten()[0].item() == pytest.approx(large.betas[5])
    assert out_small["variance"][1].flatten()[0].item() == pytest.approx(small.posterior_variance[5])
    # LEARNED_RANGE interpolates the two in log space
    mid = d.p_mean_variance(lambda x, s, **kw: torch.cat([x, torch.zeros_like(x)], 1), x, t)
    expected = 0.5 * (math.log(d.betas[5]) + math.log(d.posterior_variance[5]))
    assert mid["log_variance"][1].flatten()[0].item() == pytest.approx(expected)


def test_mean_parameterisations_agree():
    """x0-, ε- and x_{t-1}-prediction of the same truth give the same p(x_{t-1}|x_t)."""
    betas = get_named_beta_schedule("linear", T)
    gen = torch.Generator().manual_seed(9)
    x0 = torch.rand(4, 2, 3, 3, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 3, 400, 999])
    kw = dict(betas=betas, model_var_type="fixed_small", loss_type="MSE")  # names work too
    eps_d = GaussianDiffusion(model_mean_type=ModelMeanType.EPSILON, **kw)
    xt = eps_d.q_sample(x0, t, noise)
    post_mean = eps_d.q_posterior_mean_variance(x0, xt, t)[0]
    outs = {
        ModelMeanType.EPSILON: noise,
        ModelMeanType.START_X: x0,
        ModelMeanType.PREVIOUS_X: post_mean,
    }
    for mean_type, target in outs.items():
        d = GaussianDiffusion(model_mean_type=mean_type, **kw)
        assert d.model_var_type == ModelVarType.FIXED_SMALL and d.loss_type == LossType.MSE
        model = lambda x, s, target=target, **k: target
        out = d.p_mean_variance(model, xt, t, clip_denoised=False)
        torch.testing.assert_close(out["mean"], post_mean)
        torch.testing.assert_close(out["pred_xstart"], x0)
        loss = d.training_losses(model, x0, t, noise=noise)
        assert loss["mse"].abs().max().item() < 1e-20


# ----------------------------------------------------------------------------------------------
# respacing
# ----------------------------------------------------------------------------------------------


def test_space_timesteps():
    kept = space_timesteps(T, "250")
    assert len(kept) == 250
    assert sorted(kept)[:4] == [0, 4, 8, 12] and sorted(kept)[-4:] == [987, 991, 995, 999]
    fifty = sorted(space_timesteps(T, "50"))
    assert fifty[:5] == [0, 20, 41, 61, 82] and fifty[-2:] == [979, 999]
    assert sorted(space_timesteps(T, "ddim50")) == list(range(0, T, 20))
    assert len(space_timesteps(T, "ddim7")) == 7
    assert space_timesteps(300, "10,15,20") == space_timesteps(300, [10, 15, 20])
    sections = sorted(space_timesteps(300, "10,15,20"))
    assert len(sections) == 45
    assert sum(s < 100 for s in sections) == 10 and sum(100 <= s < 200 for s in sections) == 15
    assert space_timesteps(T, str(T)) == set(range(T))
    assert space_timesteps(T, 250) == kept


@pytest.mark.parametrize("bad", ["abc", "ddim", "ddim0", "ddimx", "ddim1001", "0", "1001", "10,,20", "-5", "2.5"])
def test_bad_respacing(bad):
    with pytest.raises(ValueError, match="Invalid timestep respacing"):
        create_diffusion(bad)


def test_respaced_process():
    base = create_diffusion("")
    for spec in ("250", "ddim50", "10,15,20"):
        spaced = create_diffusion(spec)
        kept = sorted(space_timesteps(T, spec))
        assert spaced.timestep_map == kept and spaced.num_timesteps == len(kept)
        np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    assert create_diffusion("ddim50").num_timesteps == 50


def test_spaced_model_sees_original_timesteps():
    spaced = create_diffusion("250")
    seen = []

    def model(x, t, **kwargs):
        assert kwargs == {"y": 3}
        seen.append(int(t[0]))
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x)], 1)

    spaced.p_sample_loop(model, (2, 1, 2, 2), model_kwargs={"y": 3}, clip_denoised=False)
    assert seen == sorted(space_timesteps(T, "250"), reverse=True)
    seen.clear()
    spaced.training_losses(model, torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 249]), model_kwargs={"y": 3})
    assert seen == [0]
    x = torch.zeros(3, 1, 2, 2)
    ts = []
    spaced.training_losses(lambda x, t, **kw: ts.append(t) or torch.cat([x, x], 1), x, torch.tensor([0, 1, 249]))
    assert ts[0].tolist() == [0, 4, 999]
    assert spaced.map_timesteps(torch.tensor([2, 248])).tolist() == [8, 995]


# ----------------------------------------------------------------------------------------------
# samplers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("respacing", ["", "50"])
def test_samplers_recover_point_mass(respacing):
    d = create_diffusion(respacing)
    c = torch.linspace(-0.8, 0.9, 8, dtype=torch.float64).view(1, 2, 2, 2).expand(3, 2, 2, 2)
    gen = torch.Generator().manual_seed(10)
    noise = torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64)
    model = _epsilon_oracle(c, var_value=0.0)
    ddim = d.ddim_sample_loop(model, (3, 2, 2, 2), noise=noise, eta=0.0)
    assert (ddim - c).abs().max().item() < 1e-10
    ddim_eta = d.ddim_sample_loop(model, (3, 2, 2, 2), noise=noise, eta=1.0, generator=gen)
    assert (ddim_eta - c).abs().max().item() < 1e-8
    ddpm = d.p_sample_loop(model, (3, 2, 2, 2), noise=noise, generator=gen, clip_denoised=False)
    assert (ddpm - c).abs().max().item() < 1e-6


def _gaussian_data_oracle(m: float, s: float):
    """Exact E[ε | x_t] when x_0 ~ N(m, s²) elementwise (original steps t)."""
    abar = torch.from_numpy(_base_alphas_cumprod())

    def model(x, t, **kwargs):
        a = abar.to(x.dtype)[t].view(-1, *([1] * (x.ndim - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * m) / (a * s**2 + 1 - a)

    return model


def test_samplers_match_gaussian_data_distribution():
    m, s = 0.3, 0.5
    model = _gaussian_data_oracle(m, s)
    shape = (32, 1, 32, 32)  # 32,768 scalar samples
    ddpm = create_diffusion("", learn_sigma=False, sigma_small=True)
    x = ddpm.p_sample_loop(model, shape, generator=torch.Generator().manual_seed(11), clip_denoised=False)
    assert x.mean().item() == pytest.approx(m, abs=0.01)
    assert x.std().item() == pytest.approx(s, rel=0.03)
    # DDIM (the probability-flow ODE) under-disperses with few steps: std 0.47 at 50 steps, 0.495 at 250
    ddim = create_diffusion("250", learn_sigma=False)
    x = ddim.ddim_sample_loop(model, shape, generator=torch.Generator().manual_seed(12), clip_denoised=False)
    assert x.mean().item() == pytest.approx(m, abs=0.01)
    assert x.std().item() == pytest.approx(s, rel=0.03)


def test_sampling_is_deterministic_per_generator():
    d = create_diffusion("20")
    model = _random_output_like_net()
    shape = (2, 1, 4, 4)
    for loop in (d.p_sample_loop, lambda *a, **k: d.ddim_sample_loop(*a, eta=0.5, **k)):
        a = loop(model, shape, generator=torch.Generator().manual_seed(13))
        b = loop(model, shape, generator=torch.Generator().manual_seed(13))
        c = loop(model, shape, generator=torch.Generator().manual_seed(14))
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)
    # eta = 0 with fixed noise needs no generator at all
    noise = torch.randn(shape)
    assert torch.equal(d.ddim_sample_loop(model, shape, noise=noise), d.ddim_sample_loop(model, shape, noise=noise))


def _random_output_like_net():
    net = torch.nn.Conv2d(1, 2, 1)
    torch.nn.init.constant_(net.weight, 0.3)
    torch.nn.init.constant_(net.bias, 0.1)
    return lambda x, t, **kw: torch.tanh(net(x)) * (1 + t.view(-1, 1, 1, 1) / 1000)


def test_progressive_loops_and_grad_mode():
    d = create_diffusion("5")
    model = _random_output_like_net()
    steps = list(d.p_sample_loop_progressive(model, (1, 1, 2, 2), generator=torch.Generator().manual_seed(0)))
    assert len(steps) == 5 and all(set(s) == {"sample", "pred_xstart"} for s in steps)
    for _ in d.ddim_sample_loop_progressive(model, (1, 1, 2, 2), progress=True):
        assert torch.is_grad_enabled()  # the caller's grad mode is not changed between steps
    assert not steps[-1]["sample"].requires_grad


def test_ddim_reverse_step_stays_on_oracle_trajectory():
    d = create_diffusion("50", learn_sigma=False)
    c = torch.full((2, 1, 2, 2), 0.25, dtype=torch.float64)
    eps = torch.randn(c.shape, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    model = _epsilon_oracle(c, var_value=None)
    t = torch.tensor([10, 10])
    x = d.q_sample(c, t, eps)
    nxt = d.ddim_reverse_sample(model, x, t, clip_denoised=False)["sample"]
    torch.testing.assert_close(nxt, d.q_sample(c, t + 1, eps))
    with pytest.raises(ValueError, match="eta=0"):
        d.ddim_reverse_sample(model, x, t, eta=0.5)


def test_ddim_matches_diffusers_scheduler():
    """ADM's "ddim50" kept steps are range(0, 1000, 20): the same as diffusers' DDIMScheduler with
    50 inference steps, "leading" spacing, steps_offset=0 and set_alpha_to_one=True."""
    diffusers = pytest.importorskip("diffusers")
    ours = create_diffusion("ddim50", learn_sigma=False)
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=T,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(reversed(ours.timestep_map))

    weight = torch.linspace(-0.5, 0.5, 16).view(1, 1, 4, 4)

    def model(x, t, **kwargs):
        return torch.sin(x + weight) * 0.8 + 0.3 * x * (t.float().view(-1, 1, 1, 1) / T)

    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    mine = ours.ddim_sample_loop(model, noise.shape, noise=noise, clip_denoised=False, eta=0.0)
    x = noise.clone()
    for step in scheduler.timesteps:
        eps = model(x, torch.full((2,), int(step)))
        x = scheduler.step(eps, step, x, eta=0.0).prev_sample
    # diffusers keeps ᾱ in float32, lightgen in float64: agreement to float32 precision
    torch.testing.assert_close(mine, x.to(mine.dtype), rtol=1e-5, atol=2e-5)


def test_device_resolution_and_shape_errors():
    d = create_diffusion("3")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 1)

        def forward(self, x, t):
            return self.conv(x)

    net = Net()
    for model in (net, lambda x, t, **kw: net(x, t)):  # device from the parameters, or the CPU
        out = d.p_sample_loop(model, (1, 1, 2, 2))
        assert out.device.type == "cpu" and out.dtype == torch.float32 and out.shape == (1, 1, 2, 2)
    with pytest.raises(ValueError, match="noise has shape"):
        d.p_sample_loop(net, (1, 1, 2, 2), noise=torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="t must have shape"):
        d.q_sample(torch.zeros(2, 1), torch.tensor([0, 1, 2]))


def test_pickle_and_deepcopy():
    d = create_diffusion("25")
    d.q_sample(torch.zeros(1, 1), torch.tensor([3]))  # fills the tensor caches
    d.map_timesteps(torch.tensor([1]))
    for clone in (pickle.loads(pickle.dumps(d)), copy.deepcopy(d)):
        assert clone.timestep_map == d.timestep_map
        np.testing.assert_array_equal(clone.alphas_cumprod, d.alphas_cumprod)
        assert clone.map_timesteps(torch.tensor([1])).item() == d.timestep_map[1]
