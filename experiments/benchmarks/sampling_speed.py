"""Sampling speed of MaskGIT's parallel decoding against the quickstart DiT's samplers (MaskGIT study (c)).

    python experiments/benchmarks/sampling_speed.py [--batch 50] [--repeats 3] [--out experiments/benchmarks]

Builds ``experiment=quickstart`` (DiT, pixel space, 1x32x32) and ``experiment=quickstart_maskgit`` (maskgit_s
on 8x8 codes of the vq_fashion tokenizer) from their configs with random weights (speed does not depend on
the weights), then times ``generate`` -- the call ``lightgen.sample``, the grid and the FID callback make,
images out, decoding included -- at the same batch, in the same process, alternating the samplers: DiT with
250 DDPM steps (DiT's FID protocol) and 25 DDIM steps (the quickstart's FID setting), both at CFG 1.5 (a
doubled batch), and MaskGIT with 8 (and 12) decoding steps without guidance (official). Medians of the
repeats; writes ``sampling_speed_cpu.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[2]


def build(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    torch.manual_seed(0)
    return instantiate(cfg.method).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "benchmarks"))
    args = ap.parse_args()

    dit = build(["experiment=quickstart"])
    maskgit = build(["experiment=quickstart_maskgit", "first_stage.checkpoint=null", "callbacks.fid.at_end=false"])
    cases = {
        "DiT DDPM-250 (CFG 1.5)": (dit, dict(sampler="ddpm", steps=250, cfg_scale=1.5)),
        "DiT DDIM-25 (CFG 1.5)": (dit, dict(sampler="ddim", steps=25, cfg_scale=1.5)),
        "MaskGIT-8": (maskgit, dict(steps=8)),
        "MaskGIT-12": (maskgit, dict(steps=12)),
    }
    labels = torch.arange(args.batch) % 10
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.no_grad():
        for module, kw in cases.values():  # warm-up
            module.generate(labels[:4], generator=torch.Generator().manual_seed(0), **{**kw, "steps": 2})
        for r in range(args.repeats):
            for name, (module, kw) in cases.items():
                t0 = time.perf_counter()
                out = module.generate(labels, generator=torch.Generator().manual_seed(r), **kw)
                times[name].append(time.perf_counter() - t0)
                assert out.shape == (args.batch, 1, 32, 32)
    params = {
        "DiT": sum(p.numel() for p in dit.net.parameters()),
        "MaskGIT": sum(p.numel() for p in maskgit.net.parameters()),
    }
    rows = []
    peer = statistics.median(times["DiT DDIM-25 (CFG 1.5)"])
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "sampler": name,
                "median_s": med,
                "images_per_s": args.batch / med,
                "speedup_vs_ddim25": peer / med,
                "times_s": ts,
            }
        )
    result = {
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "params": params,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampling_speed_cpu.json").write_text(json.dumps(result, indent=2))
    print(f"batch {args.batch}, {args.repeats} repeats, {torch.get_num_threads()} threads; params {params}")
    print("| sampler | s per batch (median) | images/s | × DDIM-25 |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['median_s']:.2f} | {r['images_per_s']:.1f} | {r['speedup_vs_ddim25']:.2f} |")


if __name__ == "__main__":
    main()
