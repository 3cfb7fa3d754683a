"""Latents/s delivered by the memory-mapped LatentDataModule (0, 1 and 2 loader workers).

    python experiments/benchmarks/latent_loader.py --path runs/quickstart_latent/latents --batch 256 --batches 200

Reports the median over repeated timed windows of ``--batches`` batches after a warm-up, per worker count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lightgen.data.latents import LatentDataModule


def measure(path: str, batch: int, batches: int, workers: int, reps: int) -> list[float]:
    dm = LatentDataModule(path=path, batch_size=batch, num_workers=workers, random_flip=True, num_classes=None)
    dm.setup()
    it = iter(dm.train_dataloader(start_batch=0, rank=0, world_size=1))
    for _ in range(10):  # warm-up: worker start, page cache
        next(it)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        n = 0
        for _ in range(batches):
            n += len(next(it)["latent"])
        rates.append(n / (time.perf_counter() - t0))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", required=True)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    for w in (int(x) for x in args.workers.split(",")):
        rates = measure(args.path, args.batch, args.batches, w, args.reps)
        results[w] = {"median_latents_per_s": statistics.median(rates), "rates": rates}
        print(
            f"workers={w}: median {statistics.median(rates):,.0f} latents/s over {args.reps} x {args.batches} batches"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
