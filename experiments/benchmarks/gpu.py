"""Training and sampling throughput, memory and MFU of the five methods' ImageNet-256 models on one GPU.

    bash experiments/benchmarks/gpu.sh            # = python experiments/benchmarks/gpu.py --out <dir>
    python experiments/benchmarks/gpu.py --models dit_xl,maskgit --batches 32 --steps 5

Each model is lightgen's real LightningModule built from its ImageNet-256 experiment
(``experiment=dit_xl2_imagenet256``, ``mdt_xl2_imagenet256`` (MDTv2-XL/2), ``diffit_xl2_imagenet256``,
``maskgit_imagenet256`` (base), ``vq_diffusion_imagenet256``) with random weights: speed does not depend on the
weights, and nothing is read from disk or the network. The diffusion methods train on 4x32x32 latents (the SD VAE is
not in the step: lightgen streams pre-extracted latents), the token methods on their token maps.
Per model and batch size (per GPU):

* **train img/s**: ``training_step`` (MDT: full + masked pass) + backward + optimiser step (fused AdamW on CUDA)
  + EMA update, under bf16 autocast (``trainer.precision=bf16-mixed``), TF32 for the fp32 remainder; median over
  ``--steps`` timed steps after ``--warmup``;
* **sample img/s**: ``generate`` (``decode=False``: latents/tokens out) with the experiment's own sampler, CFG and
  step count, timed over ``--sample-steps`` steps and scaled to the full count (every step costs the same network
  evaluation(s));
* **memory**: peak allocated GiB (``torch.cuda.max_memory_allocated``) of training and of sampling;
* **MFU**: the FLOPs ``torch.utils.flop_counter`` counts per training step (matmuls, convolutions and CUDA attention
  kernels, forward and backward; the mean of ``--steps`` steps, as MDTv2 draws its mask ratio per step) / the step's
  median time / the GPU's dense bf16 peak (H100 SXM and H200: 989 TFLOP/s; ``--peak-tflops`` for another).

A batch that does not fit is reported as OOM and the run goes on. ``--tiny`` shrinks every model (2 blocks, width 64)
so the script itself can be checked on a CPU (``tests/test_benchmarks.py``); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lightgen.compose import build_method  # noqa: E402
from lightgen.methods.ema import update_ema  # noqa: E402

LATENT = ["first_stage=identity"]
MODELS = {  # name -> (label, experiment overrides)
    "dit_xl": ("DiT-XL/2", ["experiment=dit_xl2_imagenet256", *LATENT]),
    "mdt_xl": ("MDTv2-XL/2", ["experiment=mdt_xl2_imagenet256", *LATENT]),
    "diffit_xl": ("DiffiT-XL/2", ["experiment=diffit_xl2_imagenet256", *LATENT]),
    "maskgit": ("MaskGIT-base", ["experiment=maskgit_imagenet256", "first_stage.checkpoint=null"]),
    "vq_diffusion": (
        "VQ-Diffusion",
        ["experiment=vq_diffusion_imagenet256", "first_stage.checkpoint=null", "first_stage.code_map=null"],
    ),
}
TINY = {"model.hidden_size": 64, "model.depth": 2, "model.num_heads": 4}
TINY_EXTRA = {"mdt_xl": {"model.depth": 3, "model.decode_layer": 1}, "maskgit": {"model.mlp_dim": 128}}
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0}


def build(name: str, tiny: bool, device: torch.device):
    """The method's LightningModule (random weights) on ``device``, ready for steps outside a Trainer."""
    overrides = ["data.path=/unused", *MODELS[name][1]]
    if name in ("dit_xl", "mdt_xl", "diffit_xl"):  # the latent shape of the SD VAE at 256 px, without the VAE
        overrides += [
            f"first_stage.{k}={v}"
            for k, v in (("channels", 4), ("image_size", 32), ("latent_channels", 4), ("latent_size", 32))
        ]
    if tiny:
        overrides += [f"{k}={v}" for k, v in {**TINY, **TINY_EXTRA.get(name, {})}.items()]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    torch.manual_seed(0)
    module = build_method(cfg.method).to(device)
    module.log_mean_across_ranks = lambda values, *a, **k: values  # no Trainer: nothing to log
    module.log = lambda *a, **k: None
    return module


def make_batch(module, batch: int, device: torch.device) -> dict:
    shape = module.sample_shape(batch)
    labels = torch.randint(0, module.net.num_classes, (batch,), device=device)
    if len(shape) == 4:
        return {"latent": torch.randn(shape, device=device), "label": labels}
    return {"tokens": torch.randint(0, module.first_stage.codebook_size, shape, device=device), "label": labels}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_fn(module, batch: dict, autocast):
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer

    def step():
        with autocast:
            loss = module.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(module.ema, module.net, module.ema_decay)

    return step, optimizer


def timed(fn, device: torch.device, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def count_flops(fn, reps: int) -> float:
    """Mean FLOPs of ``reps`` calls (MDTv2 draws its mask ratio per step, so one step is not the mean)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        for _ in range(reps):
            fn()
    return counter.get_total_flops() / reps


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def measure(name: str, batch: int, args, device: torch.device) -> dict:
    module = build(name, args.tiny, device)
    row = {"model": MODELS[name][0], "batch": batch, "params": sum(p.numel() for p in module.net.parameters())}
    use_bf16 = device.type == "cuda" and args.precision == "bf16"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    try:
        data = make_batch(module, batch, device)
        step, optimizer = train_step_fn(module, data, autocast)
        row["fused_adamw"] = bool(optimizer.defaults.get("fused"))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = timed(step, device, args.warmup, args.steps)
        row["train_img_s"] = batch / statistics.median(times)
        if device.type == "cuda":
            row["train_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["train_flops_per_step"] = count_flops(step, args.steps)
        del optimizer, step
        module.zero_grad(set_to_none=True)

        full = int(module.sampling["steps"])
        k = min(args.sample_steps, full)
        labels = data["label"]
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

        def sample():
            with autocast:
                module.generate(labels, generator=torch.Generator(device).manual_seed(0), decode=False, steps=k)

        t = statistics.median(timed(sample, device, 1, args.sample_reps))
        row.update(sample_steps=full, sampler=module.sampling["sampler"], cfg_scale=module.sampling.get("cfg_scale"))
        row["sample_img_s"] = batch / (t * full / k)
        if device.type == "cuda":
            row["sample_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        peak = peak_tflops(device, args.peak_tflops)
        if peak and use_bf16:
            row["mfu"] = row["train_flops_per_step"] * row["train_img_s"] / batch / (peak * 1e12)
    except torch.cuda.OutOfMemoryError:
        row["oom"] = True
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| model | params | batch/GPU | train img/s | train GiB | MFU | sampler | sample img/s | sample GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def f(r, key, fmt):
        return format(r[key], fmt) if key in r else "–"

    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['model']} | {r['params']:,} | {r['batch']} | OOM | | | | | |")
            continue
        sampler = f"{r['sampler']}-{r['sample_steps']}" + (f", CFG {r['cfg_scale']}" if r.get("cfg_scale") else "")
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['batch']} | {f(r, 'train_img_s', '.1f')} | "
            f"{f(r, 'train_mem_gib', '.1f')} | {f(r, 'mfu', '.1%')} | {sampler} | {f(r, 'sample_img_s', '.2f')} | "
            f"{f(r, 'sample_mem_gib', '.1f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--batches", default="32,256", help="per-GPU batch sizes")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sample-steps", type=int, default=5, help="sampling steps timed (scaled to the full count)")
    ap.add_argument("--sample-reps", type=int, default=2)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="2 blocks of width 64: checks the script, not the GPU")
    ap.add_argument("--out", default=None, help="directory for gpu_<device>.json and .md")
    args = ap.parse_args()
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        ap.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}.")
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")  # TF32 (lightgen.train does the same)
    start = time.perf_counter()
    rows = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            rows.append(measure(name, batch, args, device))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the model of this row is gone
            r = rows[-1]
            print(
                f"{r['model']:>13} batch {batch:>4}: "
                + (
                    "OOM"
                    if r.get("oom")
                    else f"train {r['train_img_s']:.1f} img/s, sample {r['sample_img_s']:.2f} img/s"
                )
                + f"  ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    md = table(rows)
    print(f"\n{name}, torch {torch.__version__}, {args.precision}\n\n{md}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = "tiny_cpu" if args.tiny else device.type
        result = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": name,
            "torch": torch.__version__,
            "args": vars(args),
            "seconds": round(time.perf_counter() - start, 1),
            "rows": rows,
        }
        (out / f"gpu_{tag}.json").write_text(json.dumps(result, indent=2))
        (out / f"gpu_{tag}.md").write_text(f"{name}, torch {torch.__version__}, {args.precision}\n\n{md}\n")


if __name__ == "__main__":
    main()
