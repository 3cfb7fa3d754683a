"""Figures of a quickstart_vqdiffusion run: loss curves, the per-t loss history, the sample grid, a summary.

    python experiments/quickstart_vqdiffusion/figures.py <run dir> [out dir]

Reads <run dir>/metrics.csv, the last checkpoint's importance-sampling history (``process.Lt_history``, the EMA
of the squared per-t loss, and ``process.Lt_count``), the last grid in <run dir>/samples/ and result.json;
writes loss.png, lt_history.png, grid.png and summary.json into the out dir (default: this folder).
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import torch

from lightgen.utils.plots import plot_curves, smooth


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    return [p[0] for p in pts], [p[1] for p in pts]


def main(run: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    steps, loss = series(rows, "train/loss")
    _, vb = series(rows, "train/vb")
    _, kl = series(rows, "train/kl")
    _, acc = series(rows, "train/acc")
    plot_curves(
        {
            "loss (vb + aux)": (steps, smooth(loss, 0.6)),
            "vb (KL / p_t)": (steps, smooth(vb, 0.6)),
            "KL (unweighted)": (steps, smooth(kl, 0.6)),
        },  # fmt: skip
        out / "loss.png",
        title="VQ-Diffusion quickstart (smoothed; nats per token)",
        ylabel="nats per token",
    )
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    hist = ckpt["state_dict"]["process.Lt_history"].double()
    count = ckpt["state_dict"]["process.Lt_count"]
    t = list(range(len(hist)))
    plot_curves(
        {"sqrt(Lt_history)": (t, hist.sqrt().tolist())},
        out / "lt_history.png",
        title=f"per-t loss history (importance weights ~ sqrt; min count {int(count.min())})",
        xlabel="t",
        ylabel="sqrt(EMA of the squared loss)",
    )
    grids = sorted((run / "samples").glob("step_*.png"))
    if grids:
        shutil.copy(grids[-1], out / "grid.png")
    result = json.loads((run / "result.json").read_text()) if (run / "result.json").is_file() else {}
    fid = [float(r["val/fid1k"]) for r in rows if r.get("val/fid1k")]
    ips = [float(r["train/images_per_sec"]) for r in rows if r.get("train/images_per_sec")]
    summary = {
        "steps": steps[-1] + 1 if steps else 0,
        "final_loss_smoothed": smooth(loss, 0.6)[-1] if loss else None,
        "final_acc_smoothed": smooth(acc, 0.6)[-1] if acc else None,
        "importance_sampling_on": bool((count > 10).all()),
        "fid1k": fid[-1] if fid else None,
        "median_images_per_sec": sorted(ips)[len(ips) // 2] if ips else None,
        "result": result,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent)
