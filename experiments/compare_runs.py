"""Plot loss and FID against training steps for several lightgen runs, and write a Markdown table.

    .venv/bin/python experiments/compare_runs.py --runs DiT=runs/study/dit MDTv2=runs/study/mdt_v2 \
        --out experiments/mdt_vs_dit

Reads each run's ``metrics.csv`` (lightgen's CSV logger) and writes ``<out>/loss.png`` (EMA-smoothed
``train/loss``: the full pass's hybrid loss for every method), ``<out>/fid.png`` (every logged
``val/fid*``), and ``<out>/results.md`` (final smoothed loss, FID at each measured step, images/s).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightgen.utils.plots import plot_curves, smooth  # noqa: E402


def read_metrics(run: Path) -> dict[str, tuple[list[float], list[float]]]:
    """column -> (steps, values) over the rows of metrics.csv where the column is set."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    with open(run / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                xs, ys = out.setdefault(key, ([], []))
                xs.append(float(step))
                ys.append(float(value))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True, help="NAME=RUN_DIR ...")
    ap.add_argument("--out", required=True)
    ap.add_argument("--smooth", type=float, default=0.6)
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = dict(spec.split("=", 1) for spec in args.runs)
    metrics = {name: read_metrics(Path(path)) for name, path in runs.items()}

    loss = {n: (m["train/loss"][0], smooth(m["train/loss"][1], args.smooth)) for n, m in metrics.items()}
    plot_curves(loss, out / "loss.png", title=f"{args.title} train/loss (EMA {args.smooth})", ylabel="loss")
    fid_keys = sorted({k for m in metrics.values() for k in m if "fid" in k})
    fids = {f"{n} {k}": m[k] for n, m in metrics.items() for k in fid_keys if k in m}
    if fids:
        plot_curves(fids, out / "fid.png", title=f"{args.title} FID", ylabel="FID")

    steps = sorted({int(s) for m in metrics.values() for k in fid_keys for s in m.get(k, ([], []))[0]})
    head = ["run", "loss, mean of the last 20% logged"] + [f"{k} @ {s}" for k in fid_keys for s in steps] + ["images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in metrics.items():
        raw = m["train/loss"][1]
        cells = [name, f"{statistics.mean(raw[-max(1, len(raw) // 5) :]):.4f}"]
        for k in fid_keys:
            table = dict(zip(*m.get(k, ([], []))))
            cells += [f"{table[float(s)]:.2f}" if float(s) in table else "" for s in steps]
        ips = m.get("train/images_per_sec", ([], []))[1]
        cells.append(f"{statistics.median(ips[len(ips) // 2 :]):.1f}" if ips else "")
        lines.append("| " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
