from lightgen.methods.base import GenerativeModule
from lightgen.methods.diffusion import DiffusionModule

__all__ = ["GenerativeModule", "DiffusionModule"]
