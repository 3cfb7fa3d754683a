"""Sampling images/s of every method's default sampler and of DPM-Solver++ 20, and lightgen against DiTPipeline.

    python experiments/benchmarks/sampling_methods.py [--batch 10] [--pipeline-batch 8] [--repeats 3]

**(A) every method.** The five quickstart configs (``experiment=quickstart``, ``quickstart_mdt``,
``quickstart_diffit``, ``quickstart_maskgit``, ``quickstart_vqdiffusion``; random weights: speed does not depend on
them) in one process: ``generate`` -- the call ``lightgen.sample``, the grid and the FID callback make, decoding to
images included -- with each method's own sampling defaults, and for the three Gaussian methods also with
``sampler=dpmpp_2m steps=20`` (same guidance), the calls alternating in every repetition; medians.

**(B) the same net and scheduler in diffusers' DiTPipeline.** A DiT-S/2 on 4x32x32 latents (1,000 classes, learned
Sigma, random trainable weights perturbed so adaLN-Zero does not zero the output) decoded by one small random
``AutoencoderKL`` (f8, 256 px, widths 16-32) is sampled with DPM-Solver++ 2M, 20 steps, CFG 1.5 on all four
channels, by lightgen's ``generate`` and by ``DiTPipeline(transformer, vae, scheduler)`` whose
``DiTTransformer2DModel`` holds the same weights (``lightgen.convert.dit``) and whose scheduler is lightgen's own
``make_scheduler("dpmpp_2m", betas, 20)``; the same seed gives both the same starting noise, so the images must
agree (checked before timing). Ratio = lightgen / peer time (below 1: lightgen faster).

Writes ``sampling_methods_cpu.json`` and prints two Markdown tables.
"""

from __future__ import annotations

import argparse
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

METHODS = {
    "DiT": ["experiment=quickstart"],
    "MDTv2": ["experiment=quickstart_mdt"],
    "DiffiT": ["experiment=quickstart_diffit"],
    "MaskGIT": ["experiment=quickstart_maskgit", "first_stage.checkpoint=null"],
    "VQ-Diffusion": ["experiment=quickstart_vqdiffusion", "first_stage.checkpoint=null"],
}


def build(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    torch.manual_seed(0)
    return build_method(cfg.method).eval()


def describe(s: dict) -> str:
    text = f"{s['sampler']}-{s['steps']}"
    if float(s.get("cfg_scale") or 1) > 1:
        text += f", CFG {s['cfg_scale']}" + (
            f" {s['cfg_schedule']}" if s.get("cfg_schedule", "constant") != "constant" else ""
        )
    return text


def alternate(calls: dict, repeats: int) -> dict[str, list[float]]:
    """Median-ready times of each call, the order rotating every repetition (drift hits all alike)."""
    for fn in calls.values():  # warm-up
        fn(0)
    times = {k: [] for k in calls}
    names = list(calls)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            calls[name](r + 1)
            times[name].append(time.perf_counter() - t0)
    return times


def part_a(batch: int, repeats: int) -> list[dict]:
    labels = torch.arange(batch) % 10
    calls, info = {}, {}
    for name, overrides in METHODS.items():
        module = build(overrides)
        settings = dict(module.sampling)
        cases = [("default", {})]
        if name in ("DiT", "MDTv2", "DiffiT"):
            cases.append(("DPM-Solver++ 20", {"sampler": "dpmpp_2m", "steps": 20}))
        for case, kw in cases:
            key = f"{name} {case}"
            info[key] = {
                "method": name,
                "sampler": describe({**settings, **kw}),
                "params": sum(p.numel() for p in module.net.parameters()),
            }

            def call(seed, module=module, kw=kw):
                with torch.no_grad():
                    out = module.generate(labels, generator=torch.Generator().manual_seed(seed), **kw)
                assert out.shape[0] == batch and torch.isfinite(out).all()

            calls[key] = call
    times = alternate(calls, repeats)
    return [
        {
            **info[k],
            "case": k,
            "median_s": statistics.median(t),
            "images_per_s": batch / statistics.median(t),
            "times_s": t,
        }
        for k, t in times.items()
    ]


def part_b(batch: int, repeats: int) -> dict:
    from diffusers import DiTPipeline, DiTTransformer2DModel

    from lightgen.convert.dit import (
        diffusers_dit_kwargs,
        dit_to_diffusers_state_dict,
        match_official_timestep_embedding,
    )
    from lightgen.diffusion import GaussianDiffusionProcess
    from lightgen.diffusion.solvers import make_scheduler
    from lightgen.first_stage.kl import SmallKLAutoencoder
    from lightgen.methods import DiffusionModule
    from lightgen.nets.dit import DiT

    torch.manual_seed(0)
    cfg = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=384, depth=12, num_heads=6, num_classes=1000)
    net = DiT(**cfg, learn_sigma=True)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:  # not the fixed sin-cos pos_embed, which diffusers recomputes
                p.add_(torch.randn_like(p) * 0.02)
    ae = SmallKLAutoencoder(
        image_size=256, in_channels=3, latent_channels=4, downsample=8, block_out_channels=(16, 16, 32, 32)
    ).requires_grad_(False)
    ae.scale_factor.fill_(ae.vae.config.scaling_factor)  # DiTPipeline divides by the VAE config's factor
    process = GaussianDiffusionProcess()
    module = DiffusionModule(net=net, process=process, first_stage=ae).eval()
    peer_net = DiTTransformer2DModel(**diffusers_dit_kwargs({**cfg, "learn_sigma": True}))
    peer_net.load_state_dict(dit_to_diffusers_state_dict(net.state_dict()), strict=True)
    match_official_timestep_embedding(peer_net.eval())
    betas = process.diffusion.betas
    pipe = DiTPipeline(transformer=peer_net, vae=ae.vae, scheduler=make_scheduler("dpmpp_2m", betas, 20))
    pipe.set_progress_bar_config(disable=True)
    labels = [int(v) for v in torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(1))]
    kw = dict(sampler="dpmpp_2m", steps=20, cfg_scale=1.5, guidance_channels="all")

    def ours(seed):
        with torch.no_grad():
            return module.generate(torch.tensor(labels), generator=torch.Generator().manual_seed(seed), **kw)

    def peer(seed):
        with torch.no_grad():  # images in [0, 1] -> lightgen's [-1, 1]
            return pipe(labels, 1.5, torch.Generator().manual_seed(seed), 20, output_type="pt").images * 2 - 1

    diff = (ours(0) - peer(0)).abs().max().item()
    assert diff < 1e-3, f"lightgen and DiTPipeline disagree by {diff}"
    times = alternate({"lightgen": ours, "DiTPipeline": peer}, repeats)
    med = {k: statistics.median(t) for k, t in times.items()}
    paired = [a / b for a, b in zip(times["lightgen"], times["DiTPipeline"])]  # the two calls of one repetition
    return {
        "net": "DiT-S/2, 4x32x32 latents, 1000 classes, learned sigma",
        "params": sum(p.numel() for p in net.parameters()),
        "sampler": "dpmpp_2m-20, CFG 1.5 on all channels",
        "max_abs_image_diff": diff,
        "median_s": med,
        "images_per_s": {k: batch / v for k, v in med.items()},
        "ratio": med["lightgen"] / med["DiTPipeline"],
        "paired_ratios": paired,
        "median_paired_ratio": statistics.median(paired),
        "times_s": times,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--pipeline-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["methods", "pipeline"], default=None, help="run one part (A or B) only")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "benchmarks"))
    args = ap.parse_args()
    start = time.perf_counter()
    out = Path(args.out, "sampling_methods_cpu.json")
    result = json.loads(out.read_text()) if args.only and out.is_file() else {}  # the other part's figures stay
    if args.only != "pipeline":
        result["methods"] = rows = part_a(args.batch, args.repeats)
        result["methods_args"] = {"batch": args.batch, "repeats": args.repeats}
        print(f"| method | sampler | parameters | s per batch of {args.batch} | images/s |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['method']} | {r['sampler']} | {r['params']:,} | {r['median_s']:.2f} | {r['images_per_s']:.2f} |"
            )
    if args.only != "methods":
        result["dit_pipeline"] = pipeline = part_b(args.pipeline_batch, args.repeats)
        result["pipeline_args"] = {"batch": args.pipeline_batch, "repeats": args.repeats}
        print(f"\n| {pipeline['net']} | s per batch of {args.pipeline_batch} | images/s |\n|---|---|---|")
        for k in ("lightgen", "DiTPipeline"):
            print(f"| {k} | {pipeline['median_s'][k]:.2f} | {pipeline['images_per_s'][k]:.3f} |")
        print(
            f"lightgen / DiTPipeline: ratio of medians {pipeline['ratio']:.3f}, median of paired ratios "
            f"{pipeline['median_paired_ratio']:.3f}; max |image diff| {pipeline['max_abs_image_diff']:.2e}"
        )
    result |= {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": " ".join(["python", "experiments/benchmarks/sampling_methods.py", *sys.argv[1:]]),
        "seconds": round(time.perf_counter() - start),
    }
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
