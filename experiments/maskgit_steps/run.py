"""MaskGIT study (b): FID-1k against the number of decoding steps T, on one trained model.

    python experiments/maskgit_steps/run.py <checkpoint> <reference .npz> [--steps 4 8 12 16 32] [--out DIR]

For each T: ``python -m lightgen.sample ckpt=<checkpoint> num_samples=1000 batch_size=100 steps=T`` (the
run's other sampling settings: choice temperature, guidance) and ``python -m lightgen.evaluate`` against the
reference statistics (the FID callback's cache of 2,000 training images); writes ``results.md``,
``results.json`` and ``fid_vs_steps.png`` into the out dir (default: this folder). Samples go to
``runs/maskgit_steps/T<T>`` (resumable: a re-run samples and evaluates only what is missing).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from lightgen.utils.plots import plot_curves

ROOT = Path(__file__).resolve().parents[2]


def run(entry: str, *args: str) -> None:
    subprocess.run([sys.executable, "-m", f"lightgen.{entry}", *args], cwd=ROOT, check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("ref")
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 8, 12, 16, 32])
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--samples-dir", default=str(ROOT / "runs" / "maskgit_steps"))
    ap.add_argument("--out", default=str(Path(__file__).parent))
    args = ap.parse_args()
    rows = []
    for t in args.steps:
        out = Path(args.samples_dir) / f"T{t}"
        metrics = out / "samples_metrics.json"
        if not metrics.is_file():
            sample = [f"ckpt={args.ckpt}", f"num_samples={args.num_samples}", "batch_size=100", f"steps={t}"]
            run("sample", *sample, f"out={out}")
            run("evaluate", f"samples={out}", f"ref={args.ref}", "fd_method=eigh", "kid=false", f"out={metrics}")
        m = json.loads(metrics.read_text())["metrics"]
        rows.append(
            {"steps": t, "fid1k": m["fid"], "sfid": m["sfid"], "precision": m["precision"], "recall": m["recall"]}
        )
    dest = Path(args.out)
    (dest / "results.json").write_text(json.dumps(rows, indent=2))
    lines = ["| decoding steps T | FID-1k | sFID | precision | recall |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['steps']} | {r['fid1k']:.2f} | {r['sfid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} |"
        )
    (dest / "results.md").write_text("\n".join(lines) + "\n")
    plot_curves(
        {"FID-1k": ([r["steps"] for r in rows], [r["fid1k"] for r in rows])},
        dest / "fid_vs_steps.png",
        title="MaskGIT quickstart",
        xlabel="decoding steps T",
        ylabel="FID-1k",
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
