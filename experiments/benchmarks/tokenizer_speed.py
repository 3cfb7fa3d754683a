"""Images/s of VQ tokenizers (encode to indices, decode indices) and tokens/s of the ``data=tokens`` loader.

    python experiments/benchmarks/tokenizer_speed.py --out experiments/benchmarks/tokenizer_speed_cpu.json
    python experiments/benchmarks/tokenizer_speed.py --device cuda --batch-small 256 --batch-large 32 \
        --out experiments/benchmarks/tokenizer_speed_cuda.json

Tokenizers are built from ``conf/first_stage/<name>.yaml`` with random weights (``requires_checkpoint`` off; the
speed does not depend on the values): ``vq_small`` at 1 × 32 × 32 and 3 × 32 × 32, ``vqgan_f16_1024`` at
3 × 256 × 256. What is timed: ``encode_to_indices`` on random images in [-1, 1] already on the device, and
``decode_indices`` on random code indices; each figure is the median over ``--reps`` repetitions (encode and decode
alternate) after one untimed warm-up of each.

The loader: ``TokenDataModule`` (``data=tokens``, backend memmap, the training sampler, no flips) over a directory of
random int16 tokens written in the shard format (``lightgen.extract.make_plan`` + ``lightgen.data.shards.ShardWriter``,
``finalize_manifest``) in a temporary folder: ``--loader-samples`` samples of a ``--token-size`` ² grid (16 × 16 = 256
tokens: MaskGIT at 256 px), batches of ``--loader-batch``, for 0, 1 and 2 workers; the median over ``--reps`` windows
of ``--loader-batches`` batches after a 10-batch warm-up. "steps/s it can feed" is delivered tokens/s divided by what
one MaskGIT-base training step consumes: ``--step-batch`` (256) × 256 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightgen.data.shards import ShardWriter, finalize_manifest, rank_shards
from lightgen.data.tokens import TokenDataModule
from lightgen.extract import make_plan

CONF = Path(__file__).resolve().parents[2] / "conf" / "first_stage"


def build_tokenizer(name: str, channels: int, image_size: int, device: str):
    """``conf/first_stage/<name>.yaml`` at this image shape, random weights, on ``device``."""
    node = OmegaConf.create(
        {"data": {"channels": channels, "image_size": image_size}, "fs": OmegaConf.load(CONF / f"{name}.yaml")}
    )
    cfg = OmegaConf.to_container(node, resolve=True)["fs"]
    cfg.update(requires_checkpoint=False, checkpoint=None, channels=channels)
    torch.manual_seed(0)
    return instantiate(cfg).to(device).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_tokenizer(fs, batch: int, reps: int, device: str) -> dict:
    """Median images/s of encode_to_indices and decode_indices (alternating), after one warm-up of each."""
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, fs.channels, fs.image_size, fs.image_size, generator=g) * 2 - 1).to(device)
    indices = torch.randint(0, fs.codebook_size, (batch, fs.token_size, fs.token_size), generator=g).to(device)
    fs.encode_to_indices(images)
    fs.decode_indices(indices)
    enc, dec = [], []
    with torch.no_grad():
        for _ in range(reps):
            for fn, arg, out in ((fs.encode_to_indices, images, enc), (fs.decode_indices, indices, dec)):
                _sync(device)
                t0 = time.perf_counter()
                fn(arg)
                _sync(device)
                out.append(batch / (time.perf_counter() - t0))
    return {
        "encode_images_per_s": statistics.median(enc),
        "decode_images_per_s": statistics.median(dec),
        "encode_rates": enc,
        "decode_rates": dec,
    }


class _TokenShape:
    """What ``make_plan`` reads of a tokenizer: the manifest of random tokens needs nothing else."""

    checkpoint = None

    def __init__(self, codebook_size: int, token_size: int):
        self.codebook_size, self.token_size = codebook_size, token_size

    def encode_to_indices(self, images):  # pragma: no cover - never called, marks a tokenizer
        raise NotImplementedError


def write_random_tokens(out: Path, num_samples: int, token_size: int, codebook_size: int, shard_size: int) -> dict:
    """A token directory in the extractor's format (one rank), random int16 tokens and labels."""
    target = "lightgen.first_stage.vq.VQFirstStage"
    stub = _TokenShape(codebook_size, token_size)
    plan = make_plan(stub, num_samples, world_size=1, shard_size=shard_size, flips=False, seed=0,
                     first_stage_config={"_target_": target}, num_classes=1000)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, 0, plan)
    rng = np.random.default_rng(0)
    shards = rank_shards(num_samples, 0, 1, shard_size)
    for k, (start, count) in enumerate(shards):
        tokens = rng.integers(0, codebook_size, (count, token_size, token_size)).astype(plan["dtype"])
        writer.write(k, start, tokens, rng.integers(0, 1000, count))
    writer.finish(len(shards))
    return finalize_manifest(out, 1)


def _forever(loader):
    while True:
        yield from loader


def time_loader(path: Path, batch: int, batches: int, workers: int, reps: int) -> list[float]:
    """Samples/s of the TokenDataModule's training stream, per timed window."""
    dm = TokenDataModule(str(path), batch_size=batch, num_workers=workers, random_flip=False)
    dm.setup()
    it = _forever(dm.train_dataloader(start_batch=0, rank=0, world_size=1))
    for _ in range(10):
        next(it)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        n = sum(len(next(it)["tokens"]) for _ in range(batches))
        rates.append(n / (time.perf_counter() - t0))
    return rates


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-small", type=int, default=64, help="vq_small images per call")
    ap.add_argument("--batch-large", type=int, default=2, help="vqgan_f16_1024 images per call")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--reps-large", type=int, default=3)
    ap.add_argument("--loader-samples", type=int, default=20480)
    ap.add_argument("--loader-batch", type=int, default=256)
    ap.add_argument("--loader-batches", type=int, default=40)
    ap.add_argument("--token-size", type=int, default=16)
    ap.add_argument("--codebook-size", type=int, default=1024)
    ap.add_argument("--step-batch", type=int, default=256, help="MaskGIT-base training batch")
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t_start = time.perf_counter()
    results: dict = {"tokenizers": [], "loader": {}}

    runs = [("vq_small", 1, 32, args.batch_small, args.reps), ("vq_small", 3, 32, args.batch_small, args.reps),
            ("vqgan_f16_1024", 3, 256, args.batch_large, args.reps_large)]  # fmt: skip
    for name, channels, size, batch, reps in runs:
        fs = build_tokenizer(name, channels, size, args.device)
        load = os.getloadavg()[0]
        r = time_tokenizer(fs, batch, reps, args.device)
        row = {"tokenizer": name, "shape": [channels, size, size], "tokens": [fs.token_size] * 2, "batch": batch,
               "reps": reps, "parameters": sum(p.numel() for p in fs.parameters()), "loadavg_1min_before": load,
               **r}  # fmt: skip
        results["tokenizers"].append(row)
        print(f"{name} {channels}x{size}x{size} batch {batch}: encode {r['encode_images_per_s']:.1f} images/s, "
              f"decode {r['decode_images_per_s']:.1f} images/s (load {load:.1f})", flush=True)  # fmt: skip
        del fs

    tokens_per_sample = args.token_size**2
    per_step = args.step_batch * tokens_per_sample
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens"
        write_random_tokens(path, args.loader_samples, args.token_size, args.codebook_size, shard_size=4096)
        for w in (int(x) for x in args.workers.split(",")):
            load = os.getloadavg()[0]
            rates = time_loader(path, args.loader_batch, args.loader_batches, w, args.reps)
            samples = statistics.median(rates)
            feeds = samples * tokens_per_sample / per_step
            results["loader"][w] = {"median_samples_per_s": samples, "median_tokens_per_s": samples * tokens_per_sample,
                                    "steps_per_s_it_can_feed": feeds,
                                    "samples_per_s": rates, "loadavg_1min_before": load}  # fmt: skip
            print(f"token loader workers={w}: {samples * tokens_per_sample:,.0f} tokens/s = {feeds:.1f} "
                  f"MaskGIT-base steps/s (load {load:.1f})", flush=True)  # fmt: skip

    results.update(
        started=started,
        seconds=round(time.perf_counter() - t_start, 1),
        machine=machine(),
        args=vars(args),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        tokens_per_step=per_step,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
