"""Import of official checkpoints (and export to other libraries' layouts)."""

from .dit import (
    diffusers_dit_kwargs,
    dit_to_diffusers_state_dict,
    extract_dit_state_dict,
    infer_dit_config,
    load_official_dit,
    match_official_timestep_embedding,
)
from .export import export, export_diffusers, export_official, read_run
from .released import Released, identify, load_released, read_weights, released_run_config
from .taming import (
    describe_state_dict,
    is_diffusers_vq,
    is_taming_vqgan,
    taming_to_diffusers_vq,
    vq_model_state_dict,
)

__all__ = [
    "diffusers_dit_kwargs",
    "dit_to_diffusers_state_dict",
    "extract_dit_state_dict",
    "infer_dit_config",
    "load_official_dit",
    "match_official_timestep_embedding",
    "export",
    "export_diffusers",
    "export_official",
    "read_run",
    "Released",
    "identify",
    "load_released",
    "read_weights",
    "released_run_config",
    "describe_state_dict",
    "is_diffusers_vq",
    "is_taming_vqgan",
    "taming_to_diffusers_vq",
    "vq_model_state_dict",
]
