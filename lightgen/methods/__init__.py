from lightgen.methods.autoencoder import AutoencoderModule
from lightgen.methods.base import GenerativeModule
from lightgen.methods.diffusion import DiffusionModule

__all__ = ["GenerativeModule", "DiffusionModule", "AutoencoderModule"]
