"""What lightgen's LightningModule, callbacks and logging add to a bare training loop, per step.

Both sides train the same DiT-S/2 (4x32x32 latent shape, 1000 classes, learned sigma) at the same batch on the
same synthetic batches:

* **bare**: ``for batch in loader: loss = process.training_losses(net, x, y)[0]; zero_grad; backward;
  AdamW.step()`` -- the net, the loss, the backward and the optimiser, nothing else;
* **lightgen**: ``lightgen.train.build(cfg)`` from the real config (``experiment=smoke model=dit_s
  data=synthetic``, the default callbacks -- checkpointing, non-finite guard, throughput, progress bar,
  LR monitor -- and the CSV logger at ``log_every_n_steps=10``; the sample grid off, as it runs only at the
  end) and ``trainer.fit``: the same loss plus the EMA update, the gradient-norm guard and log, the loss
  all-reduce, logging and callbacks.

The two are paired step by step inside one ``trainer.fit``: at every ``on_train_batch_start`` a callback first
runs one bare step (its own copy of the net and its own AdamW, its own iterator over the same data) and times it;
the lightgen step is the time between two consecutive ``on_train_batch_start`` calls minus the bare step run
inside that interval. So each lightgen step has a bare twin measured seconds apart, and the drift of a shared
VM (about +-10 % between minutes here) cancels in the per-step ratio. Reported: the median ms of each side, the
overhead as the median of the per-step ratios ``lightgen / bare - 1`` with its quartiles, and the pieces lightgen
adds, each timed alone (EMA update, gradient norm).

    .venv/bin/python experiments/benchmarks/module_overhead.py --steps 40 \
        --out experiments/benchmarks/module_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.utilities import disable_possible_user_warnings

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lightgen.methods.ema import update_ema  # noqa: E402
from lightgen.train import build  # noqa: E402
from lightgen.utils.grads import grad_norm  # noqa: E402
from lightgen.utils.instantiate import quiet_known_warnings  # noqa: E402


class PairedBare(pl.Callback):
    """Runs and times one bare training step at the start of every lightgen step (see the module docstring)."""

    def __init__(self, module, datamodule):
        self.net = copy.deepcopy(module.net).train()
        self.process, self.first_stage = module.process, module.first_stage
        self.opt = module.optimizer_factory(params=self.net.parameters())
        self.batches = iter(datamodule.train_dataloader())
        self.starts: list[float] = []
        self.bare: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(time.perf_counter())
        batch = next(self.batches)
        x = self.first_stage.encode(batch["image"])
        loss = self.process.training_losses(self.net, x, {"y": batch["label"]})[0]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.bare.append(time.perf_counter() - self.starts[-1])


def config(out: str, steps: int, batch: int, extra: list[str]):
    overrides = [
        "experiment=smoke",
        "model=dit_s",
        "model.patch_size=2",
        "data=synthetic",
        "data.image_size=32",
        "data.channels=4",
        "data.num_classes=1000",
        f"data.num_samples={max(256, batch * (steps + 2))}",
        f"data.batch_size={batch}",
        f"trainer.max_steps={steps + 3}",  # two warm-up pairs, `steps` timed ones, a last start
        "trainer.log_every_n_steps=10",
        "trainer.enable_model_summary=false",
        "callbacks.sample_grid=null",
        "callbacks.checkpoint.every_n_train_steps=100000",
        f"paths.output_dir={out}",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def paired_steps(cfg) -> tuple[list[float], list[float], int]:
    """(bare ms, lightgen ms) per step, the first two steps dropped as warm-up, and the net's parameter count."""
    run = build(cfg)
    datamodule = run["datamodule"]
    datamodule.setup("fit")
    clock = PairedBare(run["module"], datamodule)
    run["trainer"].callbacks.append(clock)
    run["trainer"].fit(run["module"], datamodule=datamodule)
    deltas = [b - a for a, b in zip(clock.starts, clock.starts[1:])]
    lightgen = [(d - bare) * 1000 for d, bare in zip(deltas, clock.bare)]
    params = sum(p.numel() for p in run["module"].net.parameters())
    return [t * 1000 for t in clock.bare[2 : len(deltas)]], lightgen[2:], params


def component_times(cfg, reps: int = 20) -> dict[str, float]:
    """Median ms of the pieces lightgen adds per step, each alone on the DiT-S/2: EMA update, gradient norm."""
    module = build(cfg)["module"]
    net = module.net
    for p in net.parameters():
        p.grad = torch.randn_like(p)

    def per_tensor():  # the gradient norm as lightgen computed it before (one norm op per tensor, twice a step)
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in net.parameters()])
        )

    pieces = {
        "ema_update": lambda: update_ema(module.ema, net, module.ema_decay),
        "grad_norm_foreach": lambda: grad_norm(net.parameters()),
        "grad_norm_per_tensor": per_tensor,
    }
    out = {}
    for name, fn in pieces.items():
        fn()
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) * 1000)
        out[name] = round(statistics.median(t), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="timed step pairs (after two warm-up pairs)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="extra config overrides for both sides (e.g. method.compile=true)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_known_warnings()
    disable_possible_user_warnings()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(os.path.join(tmp, "run"), args.steps, args.batch, args.overrides)
        bare, full, params = paired_steps(cfg)
        pieces = component_times(cfg)
    ratios = [f / b for f, b in zip(full, bare)]
    overhead = statistics.median(ratios) - 1
    q = statistics.quantiles(ratios, n=4)
    print("per-step pieces, each alone (median ms): " + ", ".join(f"{k} {v}" for k, v in pieces.items()))
    print(
        f"DiT-S/2 batch {args.batch}, {len(ratios)} step pairs: bare {statistics.median(bare):.1f} ms/step, lightgen "
        f"{statistics.median(full):.1f} ms/step; overhead {overhead:+.1%} (median of per-step ratios, quartiles "
        f"{q[0] - 1:+.1%} / {q[2] - 1:+.1%})"
    )
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "params": params,
        "bare_median_ms": round(statistics.median(bare), 1),
        "lightgen_median_ms": round(statistics.median(full), 1),
        "overhead": round(overhead, 4),
        "overhead_quartiles": [round(q[0] - 1, 4), round(q[2] - 1, 4)],
        "pieces_ms": pieces,
        "step_ratios": [round(x, 4) for x in ratios],
        "times_ms": {"bare": [round(t, 1) for t in bare], "lightgen": [round(t, 1) for t in full]},
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
