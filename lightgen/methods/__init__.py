from lightgen.methods.autoencoder import AutoencoderModule
from lightgen.methods.base import GenerativeModule
from lightgen.methods.diffusion import DiffusionModule
from lightgen.methods.tokens import TokenModule

__all__ = ["GenerativeModule", "DiffusionModule", "TokenModule", "AutoencoderModule"]
