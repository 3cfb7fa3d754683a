"""FID-1k of one trained model against one sampling setting's values (the token methods' sampling studies).

    python experiments/fid_sweep.py <checkpoint> <reference .npz> --vary truncation 0.8 0.86 0.9 0.95 1.0 \
        [--set steps=100 posterior=exact ...] --out experiments/<study> [--num-samples 1000]

For each value: ``python -m lightgen.sample ckpt=<checkpoint> num_samples=1000 batch_size=100 <vary>=<value>
<set...>`` (the run's other sampling settings stay) and ``python -m lightgen.evaluate`` against the reference
statistics. Rows accumulate in ``<out>/results.json`` keyed by their settings, so a second call with other
``--set`` values (e.g. ``posterior=exact``) adds a second curve; ``results.md`` and ``fid.png`` (one curve per
distinct ``--set``) are rewritten from all rows. Samples go to ``runs/fid_sweep/<out name>/<settings>``;
a re-run samples and evaluates only what is missing. The wall time of each ``lightgen.sample`` call (start-up
included, Inception excluded) and its CPU time (user + system, which another job on the same core does not
inflate) are kept in ``<samples>/timing.json`` and reported as "sampling s" and "CPU s". ``--logx`` draws
the varied setting on a log axis (step counts). ``python experiments/fid_sweep.py --replot <out> [--logx]``
redraws ``results.md`` and ``fid.png`` from ``results.json`` alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from lightgen.utils.plots import plot_curves

ROOT = Path(__file__).resolve().parents[1]


def run(entry: str, *args: str) -> None:
    subprocess.run([sys.executable, "-m", f"lightgen.{entry}", *args], cwd=ROOT, check=True)


def child_cpu_seconds() -> float:
    """User + system CPU time of every finished child so far (the difference around one ``run`` is that call's)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def slug(settings: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in settings.items())


def main() -> None:
    if sys.argv[1:2] == ["--replot"] and len(sys.argv) in (3, 4):
        out = Path(sys.argv[2])
        summarize(json.loads((out / "results.json").read_text()), out, logx="--logx" in sys.argv)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("ref")
    ap.add_argument("--vary", nargs="+", required=True, metavar=("SETTING", "VALUE"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--logx", action="store_true", help="plot the varied setting on a log axis")
    args = ap.parse_args()
    key, values = args.vary[0], args.vary[1:]
    fixed = dict(item.split("=", 1) for item in args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    for value in values:
        settings = {**fixed, key: value}
        samples = ROOT / "runs" / "fid_sweep" / out.name / slug(settings)
        metrics, timing = samples / "samples_metrics.json", samples / "timing.json"
        if not metrics.is_file():
            overrides = [f"{k}={v}" for k, v in settings.items()]
            if not (samples / "samples.npz").is_file():
                start, cpu = time.perf_counter(), child_cpu_seconds()
                run("sample", f"ckpt={args.ckpt}", f"num_samples={args.num_samples}", "batch_size=100", *overrides,
                    f"out={samples}")  # fmt: skip
                wall, cpu = time.perf_counter() - start, child_cpu_seconds() - cpu
                timing.write_text(json.dumps({"sample_seconds": wall, "cpu_seconds": cpu}))
            run("evaluate", f"samples={samples}", f"ref={args.ref}", "fd_method=eigh", "kid=false", f"out={metrics}")
        m = json.loads(metrics.read_text())["metrics"]
        info = json.loads((samples / "sample_info.json").read_text())
        row = {"vary": key, "value": value, "set": fixed, "fid1k": m["fid"], "sfid": m["sfid"],
               "precision": m["precision"], "recall": m["recall"], "sample_info": info}  # fmt: skip
        if timing.is_file():
            row.update(json.loads(timing.read_text()))
        # re-read before each write: another sweep into the same study (one per core) may have added rows
        rows = json.loads(results.read_text()) if results.is_file() else []
        rows = [r for r in rows if not (r["value"] == value and r["set"] == fixed and r["vary"] == key)] + [row]
        results.write_text(json.dumps(rows, indent=2))
    summarize(rows, out, logx=args.logx)


def summarize(rows: list[dict], out: Path, logx: bool = False) -> None:
    """``results.md`` (a row per setting) and ``fid.png`` (a curve per distinct ``--set``) from all rows."""
    key = rows[0]["vary"]
    timed = any("sample_seconds" in r for r in rows)
    cpu = any("cpu_seconds" in r for r in rows)
    head = f"| {key} | other settings | FID-1k | sFID | precision | recall |" + (" sampling s |" if timed else "")
    head += " CPU s |" if cpu else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    curves = {}
    # settings every row shares go into the plot's title; each curve is labelled by what differs
    shared = {k: v for k, v in rows[0]["set"].items() if all(r["set"].get(k) == v for r in rows)}
    for r in rows:
        other = ", ".join(f"{k}={v}" for k, v in r["set"].items()) or "the run's"
        scores = f"{r['fid1k']:.2f} | {r['sfid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f}"
        if timed:
            scores += f" | {r['sample_seconds']:.0f}" if "sample_seconds" in r else " | –"
            scores += f" ({r['note']})" if r.get("note") else ""
        if cpu:
            scores += f" | {r['cpu_seconds']:.0f}" if "cpu_seconds" in r else " | –"
        lines.append(f"| {r['value']} | {other} | {scores} |")
        label = ", ".join(f"{k}={v}" for k, v in r["set"].items() if k not in shared) or other
        xs, ys = curves.setdefault(label, ([], []))
        xs.append(float(r["value"]))
        ys.append(r["fid1k"])
    if len(curves) > 1:  # one row per value, one column per curve: the table to read across settings
        labels, values = list(curves), sorted({float(r["value"]) for r in rows})
        cell = {(lab, x): y for lab, (xs, ys) in curves.items() for x, y in zip(xs, ys)}
        lines += ["", f"FID-1k by {key} (columns: {', '.join(labels)})", ""]
        lines += [f"| {key} | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for x in values:
            row = [f"{cell[(lab, x)]:.2f}" if (lab, x) in cell else "–" for lab in labels]
            lines.append(f"| {x:g} | " + " | ".join(row) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    ordered = {k: tuple(map(list, zip(*sorted(zip(*v))))) for k, v in curves.items()}
    title = out.name + (f" ({', '.join(f'{k}={v}' for k, v in shared.items())})" if shared and len(curves) > 1 else "")
    plot_curves(ordered, out / "fid.png", title=title, ylabel="FID-1k (lower is better)", xlabel=key, logx=logx)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
