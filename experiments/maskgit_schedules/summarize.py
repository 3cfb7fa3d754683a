"""MaskGIT study (a): the mask schedule γ, each trained to the same budget and decoded with T = 8.

    python -m lightgen.train -m experiment=quickstart_maskgit schedule=mask_cosine,mask_linear,mask_square,mask_sqrt \
        trainer.max_time=null trainer.max_steps=300 hydra.sweep.dir=runs/sweeps/maskgit_schedules_300
    python experiments/maskgit_schedules/summarize.py runs/sweeps/maskgit_schedules_300 [out dir]

Reads every job of the sweep (``overrides.yaml``, ``metrics.csv``, ``result.json`` with the end-of-training
FID-1k of the EMA net, 8-step decoding) and writes ``results.md``, ``results.json``, ``loss.png`` (the
smoothed training loss of each schedule) and ``fid.png`` (FID-1k per schedule, in the order trained) into
the out dir (default: this folder).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import yaml

from lightgen.utils.plots import plot_curves, smooth


def job_summary(job: Path) -> dict:
    overrides = yaml.safe_load((job / "overrides.yaml").read_text())
    schedule = next(o.split("=", 1)[1] for o in overrides if o.startswith("schedule="))
    rows = list(csv.DictReader(open(job / "metrics.csv")))
    pts = [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]
    acc = [float(r["train/acc"]) for r in rows if r.get("train/acc")]
    ratio = [float(r["train/mask_ratio"]) for r in rows if r.get("train/mask_ratio")]
    result = json.loads((job / "result.json").read_text())
    return {
        "schedule": schedule,
        "steps": result["global_step"],
        "fid1k": result["metrics"]["val/fid1k"],
        "final_loss_smoothed": smooth([p[1] for p in pts], 0.6)[-1],
        "final_acc_smoothed": smooth(acc, 0.6)[-1],
        "mean_mask_ratio": sum(ratio) / len(ratio),
        "loss_curve": pts,
    }


def main(sweep: Path, out: Path) -> None:
    jobs = sorted((p for p in sweep.iterdir() if (p / "result.json").is_file()), key=lambda p: int(p.name))
    rows = [job_summary(j) for j in jobs]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "loss_curve"} for r in rows],
                                                 indent=2))  # fmt: skip
    lines = [
        "| schedule | steps | FID-1k (T = 8) | final loss (smoothed) | masked-token acc | mean mask ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['schedule']}` | {r['steps']} | {r['fid1k']:.1f} | {r['final_loss_smoothed']:.2f} | "
            f"{r['final_acc_smoothed']:.3f} | {r['mean_mask_ratio']:.2f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot_curves(
        {r["schedule"]: ([p[0] for p in r["loss_curve"]], smooth([p[1] for p in r["loss_curve"]], 0.6)) for r in rows},
        out / "loss.png",
        title="MaskGIT mask schedules: training loss (not comparable across schedules: other mask ratios)",
        ylabel="CE on masked tokens (smoothed)",
    )
    plot_curves(
        {"FID-1k": (list(range(len(rows))), [r["fid1k"] for r in rows])},
        out / "fid.png",
        title="FID-1k per schedule: " + ", ".join(f"{i} {r['schedule']}" for i, r in enumerate(rows)),
        xlabel="schedule",
        ylabel="FID-1k",
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent)
