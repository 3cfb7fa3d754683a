"""Training-step time of the transformer families against DiT, same batch, same process, alternating.

Each model is built from its ``conf/model/<name>.yaml`` (ImageNet-256 latent shape: 4x32x32, 1000
classes, learned sigma) inside lightgen's real ``DiffusionModule``; MDT gets its ``masking`` config,
so one step is exactly what ``lightgen.train`` runs: ``training_step`` (MDT: full pass + masked
pass, Min-SNR off/on as configured) + backward + AdamW step + EMA update. Models are timed in turns
(the order rotates every repetition) so drift hits all equally; reported: median ms per step over
``--reps`` and the ratio to the first model (DiT). ``maskgit_s`` / ``vq_diffusion_s`` (any size of those
families) are built in their ``TokenModule`` from their ImageNet-256 experiments (16x16 tokens, random tokenizers);
``diffusers:dit_s`` is diffusers' ``DiTTransformer2DModel`` with ``dit_s``'s initial weights inside the same
``DiffusionModule`` (same loss and step). ``--compile`` adds a ``method.compile=true`` copy of each model.

    .venv/bin/python experiments/benchmarks/step_time.py --models dit_s,mdt_s:v1,mdt_s:v2,diffit_s \
        --batch 8 --reps 7 --out experiments/benchmarks/step_time_cpu.json
    # GPU, bf16 autocast, XL/2:
    python experiments/benchmarks/step_time.py --device cuda --precision bf16 --batch 32 \
        --models dit_xl,mdt_xl:v2,diffit_xl --out step_time_cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lightgen.compose import build_method  # noqa: E402
from lightgen.diffusion import GaussianDiffusionProcess  # noqa: E402
from lightgen.first_stage.identity import IdentityFirstStage  # noqa: E402
from lightgen.methods import DiffusionModule  # noqa: E402

TOKEN_EXPERIMENTS = {  # the token methods at the ImageNet-256 token shape, random (never read) tokenizers
    "maskgit": ["experiment=maskgit_imagenet256", "first_stage.checkpoint=null"],
    "vq_diffusion": ["experiment=vq_diffusion_imagenet256", "first_stage.checkpoint=null", "first_stage.code_map=null"],
}


class DiffusersDiT(torch.nn.Module):
    """diffusers' ``DiTTransformer2DModel`` behind lightgen's net call ``net(x, t, y)`` (same loss, same step)."""

    def __init__(self, lightgen_dit: torch.nn.Module):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        from lightgen.convert.dit import (
            diffusers_dit_kwargs,
            dit_to_diffusers_state_dict,
            match_official_timestep_embedding,
        )

        state = lightgen_dit.state_dict()
        self.model = DiTTransformer2DModel(**diffusers_dit_kwargs(state, num_heads=lightgen_dit.num_heads))
        self.model.load_state_dict(dit_to_diffusers_state_dict(state), strict=True)
        match_official_timestep_embedding(self.model)
        self.num_classes, self.in_channels = lightgen_dit.num_classes, lightgen_dit.in_channels

    def forward(self, x, t, y):
        return self.model(x, timestep=t, class_labels=y).sample


def build(spec: str, patch_size: int, device: torch.device, compile: bool = False):
    """``dit_s`` / ``mdt_s:v1`` / ``diffit_s`` / ``maskgit_s`` / ``vq_diffusion_s`` / ``diffusers:dit_s`` ->
    (label, module, params, batch kind); ``compile``: ``method.compile``."""
    source, _, rest = spec.rpartition(":") if spec.startswith("diffusers:") else ("", "", spec)
    name, _, version = rest.partition(":")
    family = name.rsplit("_", 1)[0]
    if family in TOKEN_EXPERIMENTS:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            full = compose(config_name="train", overrides=[*TOKEN_EXPERIMENTS[family], f"model={name}", "data.path=/x"])
        OmegaConf.set_struct(full, False)
        full.method.compile = compile
        torch.manual_seed(0)
        module = build_method(full.method).to(device)
        kind = "tokens"
    else:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            full = compose(config_name="train", overrides=[f"model={name}"])  # model files compose from model_base
        OmegaConf.set_struct(full, False)
        cfg = full.model
        cfg.input_size, cfg.in_channels, cfg.num_classes, cfg.learn_sigma = 32, 4, 1000, True
        if "patch_size" in cfg:
            cfg.patch_size = patch_size
        if version:
            cfg.version = version
        masking = None
        if name.startswith("mdt"):
            if "decode_layer" in cfg and version == "v1":
                cfg.decode_layer = 2
            m = OmegaConf.load(ROOT / "conf" / "masking" / ("mdt.yaml" if version == "v1" else "mdt_v2.yaml"))
            masking = instantiate(m)
            cfg.mask_ratio = float(m.ratio)
        torch.manual_seed(0)  # diffusers:dit_s gets the same initial weights as dit_s
        net = instantiate(cfg)
        if source == "diffusers":
            net = DiffusersDiT(net)
        module = DiffusionModule(
            net=net,
            process=GaussianDiffusionProcess(masking=masking),
            first_stage=IdentityFirstStage(channels=4, image_size=32),
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=0),
            compile=compile,
        ).to(device)
        kind = "latent"
    module.setup("fit")  # what the Trainer calls: compiles the net and its EMA copy in place when asked
    module.log_mean_across_ranks = lambda *a, **k: None  # no Trainer: logging is not timed
    label = f"{source + ' ' if source else ''}{name}{'/' + version if version else ''}"
    label += f"/{patch_size}" if kind == "latent" else ""
    label += " compiled" if compile else ""
    return label, module, sum(p.numel() for p in module.net.parameters()), kind


def step_fn(module, batch: dict, precision: str, device: torch.device):
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step():
        with autocast:
            loss = module.training_step(batch, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        module.ema.to(device)
        from lightgen.methods.ema import update_ema

        update_ema(module.ema, module.net, module.ema_decay)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="dit_s,mdt_s:v1,mdt_s:v2,diffit_s")
    ap.add_argument("--patch-size", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="also time each model with method.compile=true (inductor)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    torch.manual_seed(0)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    latents = torch.randn(args.batch, 4, 32, 32, device=device)
    runs = {}
    for spec in args.models.split(","):
        for compiled in (False, True) if args.compile else (False,):
            label, module, params, kind = build(spec, args.patch_size, device, compiled)
            if kind == "tokens":
                shape = module.sample_shape(args.batch)
                codes = torch.randint(
                    0, module.first_stage.codebook_size, shape, generator=torch.Generator().manual_seed(0)
                )
                batch = {"tokens": codes.to(device), "label": labels}
            else:
                batch = {"latent": latents, "label": labels}
            runs[label] = {"params": params, "step": step_fn(module, batch, args.precision, device), "times": []}
            print(f"{label}: {params:,} parameters", flush=True)
    labels = list(runs)
    for _ in range(args.warmup):  # the first steps of a compiled model compile it (forward, backward)
        for label in labels:
            t0 = time.perf_counter()
            runs[label]["step"]()
            runs[label].setdefault("warmup_s", []).append(round(time.perf_counter() - t0, 2))
    for rep in range(args.reps):
        order = labels[rep % len(labels) :] + labels[: rep % len(labels)]
        for label in order:
            t0 = time.perf_counter()
            runs[label]["step"]()
            runs[label]["times"].append((time.perf_counter() - t0) * 1000)
    base = statistics.median(runs[labels[0]]["times"])
    rows = []
    for label in labels:
        med = statistics.median(runs[label]["times"])
        rows.append(
            {
                "model": label,
                "params": runs[label]["params"],
                "median_ms": round(med, 1),
                "min_ms": round(min(runs[label]["times"]), 1),
                "max_ms": round(max(runs[label]["times"]), 1),
                "ratio_to_first": round(med / base, 3),
                "warmup_s": runs[label].get("warmup_s", []),
            }
        )
        print(f"{label:>16}: {med:8.1f} ms/step (x{med / base:.2f})", flush=True)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "args": vars(args),
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
