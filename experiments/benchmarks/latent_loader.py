"""Latents/s delivered by the LatentDataModule (0, 1 and 2 loader workers), memmap or litdata backend.

    python experiments/benchmarks/latent_loader.py --path runs/quickstart_latent/latents --batch 256 --batches 200
    python experiments/benchmarks/latent_loader.py --path /tmp/lat32 --backend litdata  # converts once first

The litdata loader is one epoch per iteration; it is re-iterated (a new epoch) when it runs out, so
epoch boundaries inside a timed window are part of the measurement.

Reports the median over repeated timed windows of ``--batches`` batches after a warm-up, per worker count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lightgen.data.latents import LatentDataModule


def _forever(loader):
    while True:
        yield from loader


def measure(path: str, batch: int, batches: int, workers: int, reps: int, backend: str = "memmap") -> list[float]:
    dm = LatentDataModule(
        path=path, batch_size=batch, num_workers=workers, random_flip=True, num_classes=None, backend=backend
    )
    dm.prepare_data()
    dm.setup()
    it = _forever(dm.train_dataloader(start_batch=0, rank=0, world_size=1))
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
    ap.add_argument("--backend", choices=("memmap", "litdata"), default="memmap")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    for w in (int(x) for x in args.workers.split(",")):
        rates = measure(args.path, args.batch, args.batches, w, args.reps, args.backend)
        results[w] = {"median_latents_per_s": statistics.median(rates), "rates": rates}
        print(
            f"{args.backend} workers={w}: median {statistics.median(rates):,.0f} latents/s "
            f"over {args.reps} x {args.batches} batches"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
