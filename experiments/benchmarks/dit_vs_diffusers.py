"""Benchmark lightgen's DiT against diffusers' ``DiTTransformer2DModel`` of the same configuration.

Both networks compute the same function: the diffusers model is built with
:func:`lightgen.convert.dit.diffusers_dit_kwargs`, receives lightgen's weights through
:func:`~lightgen.convert.dit.dit_to_diffusers_state_dict` and gets the official timestep
frequencies with :func:`~lightgen.convert.dit.match_official_timestep_embedding`. Before any timing
the script asserts that the plain forward and the classifier-free-guided forward agree (fp32).

Measured, in one process, alternating the two models every repetition (the order flips too) so
that slow drift (thermal, other load) hits both equally:

* **train**: one training step = ``create_diffusion("").training_losses`` (forward + hybrid
  MSE + VLB loss) + backward + ``AdamW.step``; both models see the same x, t, noise and labels.
* **sample**: a respaced DDPM loop (``create_diffusion(str(steps)).p_sample_loop``) with
  classifier-free guidance and batch doubling (the official ``forward_with_cfg`` as lightgen's ``Guider``
  around each model's forward); reported per step, i.e.
  per network evaluation on a batch of ``2 * batch``.

Medians over ``--reps`` timed repetitions after ``--warmup`` untimed ones; ratio = lightgen /
diffusers (< 1: lightgen is faster). Usage (from the repository root)::

    .venv/bin/python experiments/benchmarks/dit_vs_diffusers.py --device cpu --configs S/2,B/4 \
        --batch 8 --reps 5 --out experiments/benchmarks/dit_vs_diffusers_cpu.json
    # GPU (not measured yet): DiT-XL/2 training images/s in fp32, TF32 and bf16 autocast
    python experiments/benchmarks/dit_vs_diffusers.py --device cuda --configs S/2,B/4,XL/2 \
        --batch 32 --precision fp32,tf32,bf16 --out dit_vs_diffusers_cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from lightgen.convert.dit import (
    diffusers_dit_kwargs,
    dit_to_diffusers_state_dict,
    match_official_timestep_embedding,
)
from lightgen.diffusion import create_diffusion
from lightgen.diffusion.guidance import Guider
from lightgen.nets.dit import DiT, dit_config

BUSY_PATTERN = "lightgen.train|pytest"
PRECISIONS = ("fp32", "tf32", "bf16")
NAMES = ("lightgen", "diffusers")


# ---------------------------------------------------------------------------------------------
# Machine state
# ---------------------------------------------------------------------------------------------
def busy_processes() -> list[str]:
    """Command lines of other heavy jobs (training runs, test sessions) on this machine."""
    try:
        res = subprocess.run(["pgrep", "-af", BUSY_PATTERN], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return []
    own = {os.getpid(), os.getppid()}
    lines = []
    for line in res.stdout.splitlines():
        pid, _, cmd = line.partition(" ")
        if pid.isdigit() and int(pid) not in own:
            lines.append(cmd)
    return lines


def _busy_cpu_seconds() -> float | None:
    """CPU seconds spent busy by the whole machine since boot (user+nice+system+irq+softirq)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = vals
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class ForeignCpu:
    """CPU time used by *other* processes while the block runs (machine busy time minus ours).

    ``cores`` is the average number of cores they kept busy; ~0 means the numbers are clean.
    """

    def __enter__(self):
        self.wall0, self.busy0, self.own0 = time.monotonic(), _busy_cpu_seconds(), _own_cpu_seconds()
        return self

    def __exit__(self, *exc):
        busy1 = _busy_cpu_seconds()
        wall = time.monotonic() - self.wall0
        if busy1 is None or self.busy0 is None:
            self.result = None
        else:
            foreign = max(0.0, (busy1 - self.busy0) - (_own_cpu_seconds() - self.own0))
            self.result = {
                "foreign_cpu_s": round(foreign, 2),
                "wall_s": round(wall, 2),
                "cores": round(foreign / wall, 3),
            }
        return False


def foreign_cores(window_s: float = 5.0) -> float | None:
    with ForeignCpu() as fc:
        time.sleep(window_s)
    return fc.result["cores"] if fc.result else None


def wait_until_idle(max_wait_s: float, poll_s: float = 30.0, max_cores: float = 0.25) -> dict:
    """Wait (at most ``max_wait_s``) until no training run / test session is running and other
    processes use less than ``max_cores`` cores over a 5 s window."""
    start = time.monotonic()
    first_busy = busy_processes()
    while True:
        busy = busy_processes()
        cores = foreign_cores() if not busy else None
        idle = not busy and (cores is None or cores < max_cores)
        if idle or time.monotonic() - start >= max_wait_s:
            break
        why = f"{len(busy)} busy process(es), e.g. {busy[0][:100]!r}" if busy else f"other processes use {cores} cores"
        print(f"[wait] {why}; polling again in {poll_s:.0f} s", flush=True)
        time.sleep(poll_s)
    return {
        "busy_at_launch": first_busy,
        "waited_s": round(time.monotonic() - start, 1),
        "idle_when_started": idle,
        "busy_when_started": busy,
        "foreign_cores_when_started": cores,
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def build_pair(name: str, input_size: int, device: torch.device, seed: int) -> tuple[DiT, nn.Module, dict]:
    """lightgen DiT with random (non-zero) weights and the equivalent diffusers model."""
    from diffusers import DiTTransformer2DModel

    cfg = dit_config(name)
    cfg.setdefault("patch_size", 2)
    torch.manual_seed(seed)
    lg = DiT(input_size=input_size, in_channels=4, **cfg)
    # adaLN-Zero makes the fresh network output exactly 0; perturb every trainable weight so the
    # equality check compares a non-trivial function (timings do not depend on the values).
    with torch.no_grad():
        for p in lg.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    kwargs = diffusers_dit_kwargs(lg.state_dict(), num_heads=cfg["num_heads"])
    df = DiTTransformer2DModel(**kwargs)
    df.load_state_dict(dit_to_diffusers_state_dict(lg.state_dict()), strict=True)
    match_official_timestep_embedding(df)
    info = {
        "dit_kwargs": {"input_size": input_size, "in_channels": 4, **cfg},
        "diffusers_kwargs": kwargs,
        "params_lightgen": sum(p.numel() for p in lg.parameters() if p.requires_grad),
        "params_diffusers": sum(p.numel() for p in df.parameters() if p.requires_grad),
        "diffusers_attn_processor": type(df.transformer_blocks[0].attn1.processor).__name__,
        "timm_fused_attn": bool(getattr(lg.blocks[0].attn, "fused_attn", False)),
    }
    return lg.to(device), df.to(device), info


def diffusers_forward(model: nn.Module) -> Callable:
    """diffusers' DiT as a ``(x, t, y) -> tensor`` callable (lightgen's DiT signature)."""

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, t, class_labels=y).sample

    return fn


def forward_with_cfg(forward: Callable, guidance_channels: int | str = 3) -> Callable:
    """The official batched CFG (lightgen's :class:`Guider` on a doubled batch) around a ``(x, t, y)`` forward."""

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        return Guider(scale=cfg_scale, channels=guidance_channels).paired_eps_model(forward)(x, t, y=y)

    return fn


@contextlib.contextmanager
def fp32_strict():
    """Disable TF32 (CUDA) while checking equality."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def check_same_function(lg: DiT, df: nn.Module, device: torch.device, tol: float) -> dict:
    """Assert both models compute the same output (plain forward and CFG forward), fp32, eval mode."""
    lg.eval()
    df.eval()
    g = torch.Generator().manual_seed(1234)
    n = 4
    x = torch.randn(n, lg.in_channels, lg.input_size, lg.input_size, generator=g).to(device)
    t = torch.randint(0, 1000, (n,), generator=g).to(device)
    y = torch.randint(0, lg.num_classes, (n,), generator=g).to(device)
    y[-1] = lg.num_classes  # the null class too
    y_cfg = torch.cat([y[: n // 2], torch.full((n // 2,), lg.num_classes, device=device)])
    with torch.no_grad(), fp32_strict():
        a = lg(x, t, y)
        b = diffusers_forward(df)(x, t, y)
        a_cfg = forward_with_cfg(lg.forward)(x, t, y_cfg, 4.0)
        b_cfg = forward_with_cfg(diffusers_forward(df))(x, t, y_cfg, 4.0)
    out = {
        "max_abs_diff_forward": (a - b).abs().max().item(),
        "max_abs_diff_cfg": (a_cfg - b_cfg).abs().max().item(),
        "output_abs_max": a.abs().max().item(),
        "tolerance": tol,
    }
    if not (out["max_abs_diff_forward"] <= tol and out["max_abs_diff_cfg"] <= tol):
        raise AssertionError(f"lightgen and diffusers DiT disagree: {out}")
    return out


# ---------------------------------------------------------------------------------------------
# Timed work
# ---------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_ctx(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_tf32(precision: str) -> None:
    on = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def bench_train(models, opts, device, precision, batch, input_size, warmup, reps, seed, monitor) -> dict:
    diffusion = create_diffusion("")
    times = {k: [] for k in NAMES}
    for name in NAMES:
        models[name].train()
    busy_reps = []
    for i in range(warmup + reps):
        if i >= warmup and monitor and busy_processes():
            busy_reps.append(i - warmup)
        g = torch.Generator().manual_seed(seed + i)
        x = torch.randn(batch, 4, input_size, input_size, generator=g).to(device)
        noise = torch.randn(batch, 4, input_size, input_size, generator=g).to(device)
        t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=g).to(device)
        y = torch.randint(0, 1000, (batch,), generator=g).to(device)
        order = NAMES if i % 2 == 0 else NAMES[::-1]
        for name in order:
            fn, opt = models[name + "_fn"], opts[name]
            sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with autocast_ctx(device, precision):
                loss = diffusion.training_losses(fn, x, t, {"y": y}, noise=noise)["loss"].mean()
            loss.backward()
            opt.step()
            sync(device)
            dt = time.perf_counter() - t0
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name}: non-finite training loss {loss.item()}")
            if i >= warmup:
                times[name].append(dt)
    return summarize(times, per=1, batch=batch, busy_reps=busy_reps)


def bench_sample(models, device, precision, batch, input_size, steps, cfg_scale, warmup, reps, seed, monitor) -> dict:
    diffusion = create_diffusion(str(steps))
    times = {k: [] for k in NAMES}
    for name in NAMES:
        models[name].eval()
    busy_reps = []
    final = {}
    for i in range(warmup + reps):
        if i >= warmup and monitor and busy_processes():
            busy_reps.append(i - warmup)
        g = torch.Generator().manual_seed(seed + 10_000 + i)
        z = torch.randn(batch, 4, input_size, input_size, generator=g)
        z = torch.cat([z, z]).to(device)
        y = torch.randint(0, 1000, (batch,), generator=g)
        y = torch.cat([y, torch.full((batch,), 1000)]).to(device)
        kw = {"y": y, "cfg_scale": cfg_scale}
        order = NAMES if i % 2 == 0 else NAMES[::-1]
        for name in order:
            gen = torch.Generator(device=device).manual_seed(seed + i)
            sync(device)
            t0 = time.perf_counter()
            with autocast_ctx(device, precision):
                out = diffusion.p_sample_loop(
                    models[name + "_cfg"], z.shape, noise=z, clip_denoised=False, model_kwargs=kw, generator=gen
                )
            sync(device)
            dt = time.perf_counter() - t0
            if i == 0:
                final[name] = out.float()
            if i >= warmup:
                times[name].append(dt)
    res = summarize(times, per=steps, batch=batch, busy_reps=busy_reps)
    res["steps"] = steps
    res["network_batch"] = 2 * batch
    res["cfg_scale"] = cfg_scale
    res["max_abs_diff_final_sample"] = (final["lightgen"] - final["diffusers"]).abs().max().item()
    return res


def summarize(times: dict, per: int, batch: int, busy_reps: list[int]) -> dict:
    res: dict = {"unit": "ms per step" if per > 1 else "ms per training step", "busy_reps": busy_reps}
    for name in NAMES:
        ms = [1000.0 * v / per for v in times[name]]
        res[name] = {
            "median_ms": statistics.median(ms),
            "min_ms": min(ms),
            "max_ms": max(ms),
            "all_ms": [round(v, 3) for v in ms],
            "images_per_s": 1000.0 * batch / statistics.median(ms) if per == 1 else None,
        }
    res["ratio_lightgen_over_diffusers"] = res["lightgen"]["median_ms"] / res["diffusers"]["median_ms"]
    return res


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--configs", default=None, help="comma list of DiT sizes (default: S/2,B/4; +XL/2 on cuda)")
    p.add_argument("--batch", type=int, default=8, help="images per training step / per sampling batch")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per model (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="fp32", help=f"comma list of {'|'.join(PRECISIONS)} (tf32: cuda only)")
    p.add_argument("--sample-steps", type=int, default=10, help="respaced DDPM steps of the sampling loop")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256x256 images)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--skip", default="", help="comma list of benchmarks to skip: train,sample")
    p.add_argument("--tol", type=float, default=1e-4, help="max |lightgen - diffusers| allowed (fp32)")
    p.add_argument("--wait-idle", type=float, default=1500.0, help=f"max s to wait for no '{BUSY_PATTERN}' processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available.")
    precisions = [s.strip() for s in args.precision.split(",") if s.strip()]
    for prec in precisions:
        if prec not in PRECISIONS:
            sys.exit(f"--precision: unknown {prec!r}; use {', '.join(PRECISIONS)}.")
        if prec == "tf32" and device.type != "cuda":
            sys.exit("--precision tf32 only applies to --device cuda.")
    configs = args.configs or ("S/2,B/4,XL/2" if device.type == "cuda" else "S/2,B/4")
    configs = [c.strip() for c in configs.split(",") if c.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    torch.set_num_threads(args.threads)

    import diffusers
    import timm

    idle = wait_until_idle(args.wait_idle) if args.wait_idle > 0 else {"idle_when_started": None}
    meta = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "reps": args.reps,
        "warmup": args.warmup,
        "sample_steps": args.sample_steps,
        "input_size": args.input_size,
        "machine": idle,
        "loadavg_start": loadavg(),
    }
    print(json.dumps(meta, indent=1))
    monitor = args.wait_idle > 0
    results = []
    t_start = time.perf_counter()
    for name in configs:
        lg, df, info = build_pair(name, args.input_size, device, args.seed)
        info["check"] = check_same_function(lg, df, device, args.tol)
        print(
            f"[{name}] params lightgen {info['params_lightgen']:,} diffusers {info['params_diffusers']:,}; "
            f"max |diff| forward {info['check']['max_abs_diff_forward']:.2e} "
            f"cfg {info['check']['max_abs_diff_cfg']:.2e}"
        )
        # Training steps change the weights (and the two models drift apart: their label dropout
        # draws differ), so every benchmark starts from the same, identical weights.
        initial = {k: v.detach().clone() for k, v in lg.state_dict().items()}

        def reset_weights(lg=lg, df=df, initial=initial):
            lg.load_state_dict(initial)
            df.load_state_dict(dit_to_diffusers_state_dict(initial), strict=True)

        models = {
            "lightgen": lg,
            "diffusers": df,
            "lightgen_fn": lg,
            "diffusers_fn": diffusers_forward(df),
            "lightgen_cfg": forward_with_cfg(lg.forward),
            "diffusers_cfg": forward_with_cfg(diffusers_forward(df)),
        }
        for prec in precisions:
            set_tf32(prec)
            row = {"config": f"DiT-{name}", "precision": prec, **info}
            if "train" not in skip:
                reset_weights()
                opts = {k: torch.optim.AdamW(models[k].parameters(), lr=1e-4, weight_decay=0) for k in NAMES}
                with ForeignCpu() as fc:
                    row["train"] = bench_train(
                        models,
                        opts,
                        device,
                        prec,
                        args.batch,
                        args.input_size,
                        args.warmup,
                        args.reps,
                        args.seed,
                        monitor,
                    )
                row["train"]["other_processes_cpu"] = fc.result
                del opts
                gc.collect()
                print(
                    f"[{name} {prec}] train  lightgen {row['train']['lightgen']['median_ms']:.1f} ms  "
                    f"diffusers {row['train']['diffusers']['median_ms']:.1f} ms  "
                    f"ratio {row['train']['ratio_lightgen_over_diffusers']:.3f}",
                    flush=True,
                )
            if "sample" not in skip:
                reset_weights()
                with ForeignCpu() as fc:
                    row["sample"] = bench_sample(
                        models,
                        device,
                        prec,
                        args.batch,
                        args.input_size,
                        args.sample_steps,
                        args.cfg_scale,
                        args.warmup,
                        args.reps,
                        args.seed,
                        monitor,
                    )
                row["sample"]["other_processes_cpu"] = fc.result
                print(
                    f"[{name} {prec}] sample lightgen {row['sample']['lightgen']['median_ms']:.1f} ms/step  "
                    f"diffusers {row['sample']['diffusers']['median_ms']:.1f} ms/step  "
                    f"ratio {row['sample']['ratio_lightgen_over_diffusers']:.3f}",
                    flush=True,
                )
            results.append(row)
        del lg, df, models, initial, reset_weights
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta["total_s"] = round(time.perf_counter() - t_start, 1)
    meta["loadavg_end"] = loadavg()
    meta["busy_at_end"] = busy_processes()
    report = {"meta": meta, "results": results}
    print(markdown_table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")
    return report


def markdown_table(report: dict) -> str:
    lines = [
        "| benchmark | config | precision | batch | lightgen median ms | diffusers median ms "
        "| ratio lightgen/diffusers |",
        "|---|---|---|---|---|---|---|",
    ]
    batch = report["meta"]["batch"]
    for kind, label in (("train", "training step"), ("sample", "sampling step (CFG, 2x batch)")):
        for row in report["results"]:
            if kind in row:
                r = row[kind]
                lines.append(
                    f"| {label} | {row['config']} | {row['precision']} | {batch} | "
                    f"{r['lightgen']['median_ms']:.1f} | {r['diffusers']['median_ms']:.1f} | "
                    f"{r['ratio_lightgen_over_diffusers']:.3f} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
