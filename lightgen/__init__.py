"""lightgen: DiT, MDT, DiffiT, MaskGIT and VQ-Diffusion under one Lightning + Hydra config system."""

from lightgen.utils.launch import register_resolvers

register_resolvers()  # ${lightgen.run_id:} in conf/paths (before any config is composed)
