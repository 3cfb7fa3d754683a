"""One way to build a method from a config, for ``lightgen.train`` and ``lightgen.sample`` alike.

The ``method`` group (``conf/method/*.yaml``) names the LightningModule and the parts it composes, each
taken from its group by interpolation (``net: ${model}``, ``process: ${diffusion}``,
``first_stage: ${first_stage}``, ``optimizer: ${optim.optimizer}``, ...). ``instantiate(cfg.method)``
builds the parts in the order the config lists them (first stage, then net: that order fixes the
initialisation's RNG stream) and the module around them; a checkpoint stores the resolved config, so
:func:`method_from_checkpoint` rebuilds its run through the same call.

Checkpoints written before the method group existed (their ``method`` node names no parts, their
``diffusion`` is the ``create_diffusion`` factory, their nets took ``guidance_channels``) are upgraded on
load by :func:`upgrade_config`, in memory: the file is never rewritten.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from lightgen.utils.checkpoints import load_checkpoint
from lightgen.utils.errors import LightgenConfigError

OLD_DIFFUSION_FACTORY = "lightgen.diffusion.create_diffusion"
GAUSSIAN_PROCESS = "lightgen.diffusion.GaussianDiffusionProcess"
NO_MASKING = "lightgen.masking.no_masking"
# modules that moved: a stored `_target_` under an old path is read under the new one
MOVED_MODULES = {
    "lightgen.methods.schedules.": "lightgen.methods.lr_schedules.",
    "lightgen.utils.checkpoint_io.": "lightgen.utils.checkpoints.",
}


def _renamed_targets(node):
    if isinstance(node, dict):
        out = {k: _renamed_targets(v) for k, v in node.items()}
        target = out.get("_target_")
        if isinstance(target, str):
            for old, new in MOVED_MODULES.items():
                if target.startswith(old):
                    out["_target_"] = new + target[len(old) :]
        return out
    if isinstance(node, list):
        return [_renamed_targets(v) for v in node]
    return node


SCHEDULE_CHOICES = {
    "gaussian": "schedule=linear or cosine",
    "mask": "schedule=mask_cosine, mask_linear, mask_square, mask_cubic, mask_sqrt, mask_log or mask_exp",
    "discrete": "schedule=vqd_alpha1 or vqd_mask_replace",
}


def _process_class(cfg: DictConfig):
    diffusion = cfg.get("diffusion")
    if diffusion is None or not isinstance(diffusion, DictConfig) or "_target_" not in diffusion:
        return None
    try:
        return get_class(diffusion._target_)
    except Exception:  # an unknown target is reported by instantiate, with its own message
        return None


def check_composition(cfg: DictConfig) -> None:
    """One sentence, before anything is built, when the chosen groups cannot work together.

    * the ``schedule`` group's kind (``gaussian`` noise / ``mask`` schedules) must be the one the
      ``diffusion`` process takes (its ``schedule_kind``);
    * a token process (``data_kind = "tokens"``) needs a VQ tokenizer as ``first_stage``.
    """
    process = _process_class(cfg)
    if process is None:
        return
    choices = _group_choices()
    need = getattr(process, "schedule_kind", "gaussian")
    schedule = cfg.get("schedule")
    have = schedule.get("kind", "gaussian") if isinstance(schedule, DictConfig) else None
    if have is not None and have != need:
        raise LightgenConfigError(
            f"diffusion={choices.get('diffusion', process.__name__)} needs a {need} schedule but "
            f"schedule={choices.get('schedule', schedule.get('name'))} is a {have} schedule; select "
            f"{SCHEDULE_CHOICES.get(need, 'a ' + need + ' schedule')}."
        )
    first_stage = cfg.get("first_stage")
    if getattr(process, "data_kind", "latents") == "tokens" and isinstance(first_stage, DictConfig):
        if "codebook_size" not in first_stage:
            raise LightgenConfigError(
                f"diffusion={choices.get('diffusion', process.__name__)} models VQ tokens but "
                f"first_stage={choices.get('first_stage', first_stage.get('name'))} is not a VQ tokenizer; select "
                f"first_stage=vq_fashion, vq_small or vqgan_f16_1024."
            )


def _group_choices() -> dict:
    try:
        from hydra.core.hydra_config import HydraConfig

        return dict(HydraConfig.get().runtime.choices)
    except ValueError:
        return {}


def build_method(method_cfg: DictConfig, config: dict | None = None):
    """The LightningModule of ``method_cfg`` with all its parts; ``config`` is stored in its checkpoints."""
    if method_cfg is None or "_target_" not in method_cfg:
        raise LightgenConfigError("the config has no method; select one (e.g. method=diffusion).")
    module = instantiate(method_cfg)
    module.config = config
    return module


def upgrade_config(config: dict) -> dict:
    """A stored run config in today's layout (a copy; configs already in it come back unchanged).

    * ``diffusion``: the old ``create_diffusion`` factory (``_partial_``) becomes the process it configured,
      with the run's ``masking`` inside it;
    * ``model.guidance_channels`` (nets no longer guide) moves to ``method.sampling.guidance_channels``;
    * a ``method`` that names no parts gets them from the top-level groups, as the old builder passed them;
    * ``_target_`` paths of modules that moved (``MOVED_MODULES``) point to their new place.
    """
    c = _renamed_targets(copy.deepcopy(config))
    model = c.get("model") or {}
    guidance_channels = model.pop("guidance_channels", None)
    diffusion = c.get("diffusion")
    if diffusion and diffusion.get("_target_") == OLD_DIFFUSION_FACTORY:
        diffusion.pop("_partial_", None)
        diffusion["_target_"] = GAUSSIAN_PROCESS
        masking = dict(c.get("masking") or {})
        diffusion["masking"] = masking if masking.get("_target_") else {"_target_": NO_MASKING, **masking}
    method = c.get("method") or {}
    if method.get("_target_") == "lightgen.methods.DiffusionModule" and "net" not in method:
        method = {
            "_target_": method["_target_"],
            "first_stage": c.get("first_stage"),
            "net": c.get("model"),
            "process": c.get("diffusion"),
            "optimizer": (c.get("optim") or {}).get("optimizer"),
            "scheduler": (c.get("optim") or {}).get("scheduler"),
            "ema_decay": method.get("ema_decay", 0.9999),
            "seed": c.get("seed", 0),
            "sampling": dict(method.get("sampling") or {}),
        }
    if method.get("net") is not None:
        method["net"].pop("guidance_channels", None)
    if guidance_channels is not None and "sampling" in method:
        method["sampling"].setdefault("guidance_channels", guidance_channels)
    c["method"] = method
    return c


def method_from_checkpoint(path: str | Path, device: str | torch.device = "cpu", first_stage: str | None = None):
    """Rebuild the LightningModule of a lightgen run from its checkpoint: ``(module, cfg, ckpt)``.

    The module is built from the stored config (upgraded when older) by :func:`build_method`, loaded
    strictly, moved to ``device`` and put in eval mode. A released DiT / MDT / DiffiT file (recognised by its
    keys, :mod:`lightgen.convert.released`) becomes the module of its family's ImageNet experiment with the
    official sampling defaults, its weights in both the net and the EMA; ``first_stage`` (a
    ``conf/first_stage`` option) decodes its samples (default: the SD VAE for 4-channel latents). Its ``ckpt``
    is ``{"global_step": -1, "released": {...}}``: what the file held and which defaults apply.
    """
    from lightgen.convert import released

    if Path(path).suffix == ".safetensors":
        ckpt = released.read_file(path)
    else:
        ckpt = load_checkpoint(path, mmap=True)
    if not released.is_lightgen_checkpoint(ckpt):
        return _method_from_released(path, ckpt, device, first_stage)
    if first_stage is not None:
        raise LightgenConfigError(
            f"first_stage={first_stage} applies to released weights only; {path} is a lightgen run, which samples "
            "with its own first stage (leave first_stage out)."
        )
    config = (ckpt.get("lightgen") or {}).get("config")
    if not config:
        raise LightgenConfigError(
            f"{path} is not a lightgen training checkpoint (no stored run config); sample from a checkpoint "
            f"written by lightgen.train or a released DiT / MDT / DiffiT file."
        )
    config = upgrade_config(config)
    cfg = OmegaConf.create(config)
    module = build_method(cfg.method, config=config)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    return module.to(device).eval(), cfg, ckpt


def _method_from_released(path, obj, device, first_stage: str | None):
    from lightgen.convert import released

    sd = released.read_weights(obj)
    rel = released.identify(sd, str(path))
    config = released.released_run_config(rel, first_stage)
    module = build_method(OmegaConf.create(config["method"]), config=config)
    released.load_released(sd, module.net)
    module.ema.load_state_dict(module.net.state_dict(), strict=True)
    info = {
        "file": str(Path(path).resolve()),
        "family": rel.family,
        "network": rel.describe,
        "first_stage": first_stage or released.default_first_stage(rel),
        "defaults": rel.sampling,
    }
    return module.to(device).eval(), OmegaConf.create(config), {"global_step": -1, "released": info}


def init_from(module, path: str | Path) -> str:
    """Start ``module`` from the weights of ``path``: a lightgen checkpoint (its ``net.*`` and ``ema.*``) or a
    released DiT / MDT / DiffiT file (net and EMA both). Nothing else is taken (no optimiser, no step, no RNG):
    the run starts at step 0. One sentence when the architecture differs. Returns what was loaded, for the log.
    """
    from lightgen.convert import released
    from lightgen.utils.state_dicts import net_state_dict, state_dict_mismatch

    obj = released.read_file(path)
    if released.is_lightgen_checkpoint(obj):
        net_sd = net_state_dict(obj)
        ema_sd = net_state_dict(obj, "ema.") or net_sd
        model = ((obj["lightgen"].get("config") or {}).get("model") or {}).get("_target_", "?").rsplit(".", 1)[-1]
        what = f"a lightgen {model} checkpoint at step {int(obj.get('global_step', -1))}"
    else:
        net_sd = released.read_weights(obj)
        what = f"released {released.identify(net_sd, str(path)).describe}"
        ema_sd = net_sd
    detail = state_dict_mismatch(net_sd, module.net.state_dict())
    if detail:
        raise LightgenConfigError(
            f"init_from={path} holds {what}, which does not fit this run's model ({detail}); select the model "
            "(size, patch, input size, classes) the weights were trained with."
        )
    module.net.load_state_dict(net_sd, strict=True)
    module.ema.load_state_dict(ema_sd, strict=True)
    return what
