"""Images/s of FID Inception feature extraction (lightgen.metrics), and the wall time of an FID-N evaluation.

    python experiments/benchmarks/inception_speed.py --devices cpu --batch-sizes 1,8,32 --reps 5 \
        --out experiments/benchmarks/inception_speed_cpu.json
    python experiments/benchmarks/inception_speed.py --devices cuda --batch-sizes 50,100,250 --fid-n 10000 \
        --ref VIRTUAL_imagenet256_labeled.npz --out experiments/benchmarks/inception_speed_cuda.json

What is timed: ``InceptionFeatures.features`` on uint8 (N, H, W, 3) images already in host memory (random pixels,
``--image-size`` square): host->device copy, TF1 bilinear resize to 299, the network, features back to the host
(the ``.cpu()`` of the result, so CUDA work is finished). Each figure is the median over ``--reps`` timed repetitions
of ``--batches`` batches after ``--warmup`` untimed batches. ``--fid-n`` additionally times a whole FID-N evaluation:
features of N images in batches, pool statistics, Fréchet distance against cached statistics (``--ref`` ADM .npz, or
random statistics of the right size — sqrtm's cost does not depend on the values), with each phase's time; the
distance is timed with ADM's ``scipy.linalg.sqrtm`` (in ``total_s``) and, separately, with ``method="eigh"``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch

from lightgen.metrics import FeatureStats, InceptionFeatures, load_reference


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_images_per_s(
    extractor: InceptionFeatures, batch: int, image_size: int, reps: int, batches: int, warmup: int, seed: int = 0
) -> list[float]:
    """Images/s of ``extractor.features`` for ``reps`` windows of ``batches`` batches of ``batch`` images."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(batch, image_size, image_size, 3), dtype=np.uint8)
    for _ in range(warmup):
        extractor.features(images)["pool"].cpu()
    rates = []
    for _ in range(reps):
        _sync(extractor.device)
        t0 = time.perf_counter()
        for _ in range(batches):
            extractor.features(images)["pool"].cpu()
        _sync(extractor.device)
        rates.append(batch * batches / (time.perf_counter() - t0))
    return rates


def time_fid_evaluation(
    extractor: InceptionFeatures,
    n: int,
    batch_size: int,
    image_size: int,
    reference: FeatureStats | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Seconds for an FID-N evaluation: features of ``n`` images, their statistics, the distance to ``reference``."""
    rng = np.random.default_rng(seed)
    batches = [
        rng.integers(0, 256, size=(min(batch_size, n - i), image_size, image_size, 3), dtype=np.uint8)
        for i in range(0, n, batch_size)
    ]
    if reference is None:  # random statistics of the right size: sqrtm costs the same whatever the values
        a = rng.normal(size=(4096, 2048)) * 0.3
        reference = FeatureStats.from_features(np.abs(a))
    _sync(extractor.device)
    t0 = time.perf_counter()
    pool = np.concatenate([extractor.features(b)["pool"].double().cpu().numpy() for b in batches])
    t1 = time.perf_counter()
    stats = FeatureStats.from_features(pool)
    t2 = time.perf_counter()
    fid = stats.frechet_distance(reference)  # ADM's scipy.linalg.sqrtm
    t3 = time.perf_counter()
    fid_eigh = stats.frechet_distance(reference, method="eigh")
    t4 = time.perf_counter()
    return {
        "n": n,
        "batch_size": batch_size,
        "features_s": t1 - t0,
        "statistics_s": t2 - t1,
        "frechet_distance_s": t3 - t2,
        "frechet_distance_eigh_s": t4 - t3,
        "total_s": t3 - t0,
        "images_per_s": n / (t1 - t0),
        "fid_value_random_images": fid,
        "fid_value_eigh": fid_eigh,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cpu,cuda", help="comma list; cuda is skipped when unavailable")
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", type=int, default=2, help="batches per timed repetition")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--weights", default=None, help="Inception weights file (default: lightgen's resolution order)")
    ap.add_argument("--fid-n", type=int, default=0, help="also time an FID-N evaluation with N images (0: skip)")
    ap.add_argument("--fid-batch", type=int, default=None, help="batch size of the FID-N run (default: largest)")
    ap.add_argument("--ref", default=None, help="ADM reference .npz for the FID-N run (default: random statistics)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    reference = load_reference(args.ref).pool if args.ref else None
    record = {
        "command": "python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]),
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "args": vars(args),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "results": {},
    }
    for device in devices:
        extractor = InceptionFeatures(args.weights, device=device)
        record["weights"] = str(extractor.weights_path)
        per_device = {"images_per_s": {}}
        for batch in batch_sizes:
            rates = measure_images_per_s(extractor, batch, args.image_size, args.reps, args.batches, args.warmup)
            median = statistics.median(rates)
            per_device["images_per_s"][str(batch)] = {"median": median, "reps": rates}
            print(f"{device} batch {batch:4d}: median {median:8.1f} images/s over {args.reps} reps")
        if args.fid_n:
            fid_batch = args.fid_batch or max(batch_sizes)
            timing = time_fid_evaluation(extractor, args.fid_n, fid_batch, args.image_size, reference)
            per_device["fid_evaluation"] = timing
            print(
                f"{device} FID-{args.fid_n}: {timing['total_s']:.1f} s (features {timing['features_s']:.1f} s, "
                f"statistics {timing['statistics_s']:.2f} s, Fréchet distance {timing['frechet_distance_s']:.2f} s; "
                f"with method='eigh' {timing['frechet_distance_eigh_s']:.2f} s)"
            )
        record["results"][device] = per_device
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
