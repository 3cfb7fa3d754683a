from lightgen.first_stage.identity import IdentityFirstStage
from lightgen.first_stage.kl import PretrainedKL, SmallKLAutoencoder
from lightgen.first_stage.losses import KLAutoencoderLoss, NLayerDiscriminator
from lightgen.first_stage.lpips import LPIPS, lpips_weights_available
from lightgen.first_stage.quantize import VectorQuantizer
from lightgen.first_stage.vq import VQFirstStage

__all__ = [
    "IdentityFirstStage",
    "PretrainedKL",
    "SmallKLAutoencoder",
    "KLAutoencoderLoss",
    "NLayerDiscriminator",
    "LPIPS",
    "lpips_weights_available",
    "VectorQuantizer",
    "VQFirstStage",
]
