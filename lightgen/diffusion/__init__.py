"""Generative processes. The Gaussian one follows ADM / IDDPM as used by DiT; MaskGIT's token process
(:class:`MaskGITProcess`, with its mask schedules :class:`MaskSchedule`) follows the official MaskGIT code,
VQ-Diffusion's (:class:`VQDiffusionProcess`, with :class:`DiscreteSchedule`) the official VQ-Diffusion code.

``create_diffusion`` is the factory: training uses ``create_diffusion("")`` (all 1000 steps),
sampling ``create_diffusion("250")`` (250 respaced steps, the model still sees steps 0..999).
"""

from __future__ import annotations

from lightgen.diffusion.beta_schedules import SCHEDULE_NAMES, betas_for_alpha_bar, get_named_beta_schedule
from lightgen.diffusion.gaussian import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    parse_mse_loss_weighting,
)
from lightgen.diffusion.likelihood import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from lightgen.diffusion.respace import SpacedDiffusion, space_timesteps

__all__ = [
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SCHEDULE_NAMES",
    "SpacedDiffusion",
    "approx_standard_normal_cdf",
    "betas_for_alpha_bar",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "parse_mse_loss_weighting",
    "space_timesteps",
]


def create_diffusion(
    timestep_respacing="",
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
    mse_loss_weighting: str | None = None,
    min_snr_gamma: float = 5.0,
) -> SpacedDiffusion:
    """Build the Gaussian process DiT uses (defaults: linear β, ε-prediction, learned Σ, MSE + VLB).

    :param timestep_respacing: "" / None for all steps, or a respacing accepted by
        :func:`space_timesteps` ("250", "10,15,20", "ddim50", an int or a list of counts).
    :param noise_schedule: "linear" or "cosine" (alias "squaredcos_cap_v2").
    :param use_kl: train on the rescaled VLB alone (LossType.RESCALED_KL).
    :param sigma_small: with a fixed variance, use β̃_t (FIXED_SMALL) instead of β_t (FIXED_LARGE).
    :param predict_xstart: the network predicts x_0 instead of ε.
    :param learn_sigma: the network also outputs the variance (LEARNED_RANGE).
    :param rescale_learned_sigmas: LossType.RESCALED_MSE (VLB × T/1000) instead of MSE.
    :param diffusion_steps: T of the base process.
    :param mse_loss_weighting: None (DiT) or "min_snr" / "min_snr_<γ>" (MDTv2's Min-SNR weighting).
    :param min_snr_gamma: γ for "min_snr".
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    return SpacedDiffusion(
        space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        mse_loss_weighting=mse_loss_weighting,
        min_snr_gamma=min_snr_gamma,
    )


# The processes build on create_diffusion above (imported last: process.py imports it from here).
from lightgen.diffusion.guidance import Guider  # noqa: E402
from lightgen.diffusion.mask_schedules import MASK_SCHEDULES, MaskSchedule  # noqa: E402
from lightgen.diffusion.maskgit import MaskGITProcess  # noqa: E402
from lightgen.diffusion.process import GaussianDiffusionProcess, Process  # noqa: E402
from lightgen.diffusion.vq_diffusion import DiscreteSchedule, VQDiffusionProcess  # noqa: E402

__all__ += [
    "DiscreteSchedule",
    "GaussianDiffusionProcess",
    "Guider",
    "MASK_SCHEDULES",
    "MaskGITProcess",
    "MaskSchedule",
    "Process",
    "VQDiffusionProcess",
]
