"""Pre-extract latents or tokens: ``python -m lightgen.extract data=<images> first_stage=<autoencoder> out=<dir>``.

Encodes a whole image dataset once with the first stage and writes float16 shards plus a manifest
(format: ``lightgen/data/shards.py``) that ``data=latents data.path=<dir>`` trains from. A first stage
with ``encode_to_indices`` (a VQ tokenizer, ``first_stage=vq_small``) gives token shards instead: its
code indices, int16 (int32 past 32,767 codes), for ``data=tokens data.path=<dir>``; the manifest then
records the codebook size, the token grid and the SHA-256 of the tokenizer's checkpoint file.

* Several processes (``torchrun --nproc_per_node=8 -m lightgen.extract ...``, or any launcher that
  sets ``RANK``/``WORLD_SIZE``): rank ``r`` of ``W`` takes the ``r``-th contiguous slice of the
  dataset (in dataset order) and writes only its own files, ``*_r{r:02d}_*``; the last rank to
  finish merges the per-rank manifests into ``manifest.json``.
* ``flips=true`` also encodes every image flipped horizontally (both views are stored; training
  picks one with the sampler's flip bit); for tokens, the tokens of the flipped image.
* Resumable: re-running the same command skips every shard that is complete and matches its
  checksum, and recomputes missing, partial or corrupted ones.
* Deterministic: a stochastic encoder draws from a generator seeded by ``seed`` and the shard.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightgen.data.shards import (
    DTYPE,
    FORMAT_VERSION,
    MANIFEST,
    ShardWriter,
    array_dtype,
    array_shape,
    check_matches,
    finalize_manifest,
    first_stage_target,
    manifest_kind,
    rank_shards,
    read_partial_manifests,
    token_dtype,
    tokenizer_sha256,
)
from lightgen.utils import cli, signals
from lightgen.utils.errors import LightgenConfigError, work_errors
from lightgen.utils.instantiate import startup_errors
from lightgen.utils.progress import progress_bar


def dist_env() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise LightgenConfigError(f"RANK={rank} / WORLD_SIZE={world} is not a valid process layout.")
    return rank, world


def make_plan(
    first_stage: torch.nn.Module,
    num_samples: int,
    *,
    world_size: int,
    shard_size: int,
    flips: bool,
    seed: int,
    first_stage_config: Mapping | None = None,
    source: Mapping | None = None,
    num_classes: int | None = None,
) -> dict:
    """The manifest header every rank writes (and every later run is compared against)."""
    cls = type(first_stage)
    config = dict(first_stage_config or {})
    described = {
        "target": config.get("_target_") or f"{cls.__module__}.{cls.__qualname__}",
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "config": {k: v for k, v in config.items() if k != "_target_"},
    }
    common = {
        "flips": bool(flips),
        "num_samples": int(num_samples),
        "num_classes": None if num_classes is None else int(num_classes),
        "world_size": int(world_size),
        "shard_size": int(shard_size),
        "seed": int(seed),
        "source": dict(source or {}),
    }
    if array_kind(first_stage) == "tokens":
        return {
            "format_version": FORMAT_VERSION,
            "kind": "tokens",
            "first_stage": described,
            "token_shape": [int(first_stage.token_size), int(first_stage.token_size)],
            "codebook_size": int(first_stage.codebook_size),
            "tokenizer_sha256": tokenizer_sha256(getattr(first_stage, "checkpoint", None)),
            "dtype": token_dtype(first_stage.codebook_size),
            **common,
        }
    return {
        "format_version": FORMAT_VERSION,
        "first_stage": described,
        "scale_factor": float(getattr(first_stage, "scale_factor", 1.0)),
        "latent_shape": [
            int(first_stage.latent_channels),
            int(first_stage.latent_size),
            int(first_stage.latent_size),
        ],
        "dtype": DTYPE,
        **common,
    }


def array_kind(first_stage) -> str:
    """``"tokens"`` for a tokenizer (it has ``encode_to_indices``), else ``"latents"``."""
    return "tokens" if callable(getattr(first_stage, "encode_to_indices", None)) else "latents"


def check_out_dir(out: Path, plan: Mapping) -> None:
    """Refuse (one sentence, nothing written) a directory that holds latents of another first stage/shape/plan."""
    if out.exists() and not out.is_dir():
        raise LightgenConfigError(f"out={out} is a file, not a directory; pick a directory for the latents.")
    import json

    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            stored = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise LightgenConfigError(f"{manifest} is not valid JSON ({e}); delete it or pick another out.") from e
        check_matches(stored, out, plan["first_stage"], array_shape(plan), plan)
    for stored in read_partial_manifests(out).values():
        check_matches(stored, out, plan["first_stage"], array_shape(plan), plan)


def _encode(first_stage, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if "generator" in inspect.signature(first_stage.encode).parameters:
        return first_stage.encode(images, generator=generator)
    return first_stage.encode(images)


def _encode_tokens(first_stage, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return first_stage.encode_to_indices(images)


@torch.no_grad()
def encode_shard(
    first_stage,
    dataset,
    start: int,
    count: int,
    *,
    flips: bool,
    batch_size: int,
    seed: int,
    device,
    on_batch=None,
    kind: str = "latents",
    dtype: str = DTYPE,
) -> tuple[np.ndarray, np.ndarray]:
    """Latents (float16, (n, [2,] C, H, W)) and labels of samples ``start .. start + count`` of ``dataset``;
    with ``kind="tokens"``, code indices (``dtype``, (n, [2,] h, w)) of ``first_stage.encode_to_indices``.

    Randomness is a function of ``seed`` and ``start`` only: the global RNG is forked and seeded per
    shard (and a generator is passed to ``encode`` when it accepts one).
    """
    device = torch.device(device)
    shard_seed = (int(seed) * 1_000_003 + int(start)) % (2**63)
    encode = _encode_tokens if kind == "tokens" else _encode
    latents, labels = [], []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(shard_seed)
        gen = torch.Generator(device=device).manual_seed(shard_seed)
        for lo in range(start, start + count, batch_size):
            idx = list(range(lo, min(lo + batch_size, start + count)))
            batch = dataset.__getitems__(idx)
            images = batch["image"].to(device, non_blocking=True)
            z = encode(first_stage, images, gen)
            if flips:
                z = torch.stack([z, encode(first_stage, images.flip(-1), gen)], dim=1)
            if kind == "tokens":
                latents.append(z.to("cpu").numpy().astype(dtype))
            else:
                latents.append(z.to("cpu", torch.float16).numpy())
            labels.append(batch["label"].numpy().astype(np.int64))
            if on_batch is not None:
                on_batch(len(idx))
    return np.concatenate(latents), np.concatenate(labels)


def extract_rank(
    dataset,
    first_stage: torch.nn.Module,
    out: str | Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    flips: bool = False,
    shard_size: int = 4096,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    first_stage_config: Mapping | None = None,
    source: Mapping | None = None,
    num_classes: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Extract rank ``rank``'s part of ``dataset`` into ``out``; finalize the manifest if every rank is done.

    Returns ``{"written": [shard indices], "skipped": [...], "manifest": dict | None}``.
    """
    if shard_size <= 0 or batch_size <= 0:
        raise LightgenConfigError("shard_size and batch_size must be positive.")
    out = Path(out)
    n = len(dataset)
    plan = make_plan(first_stage, n, world_size=world_size, shard_size=shard_size, flips=flips, seed=seed,
                     first_stage_config=first_stage_config, source=source, num_classes=num_classes)  # fmt: skip
    writer, shards, todo = _open_rank_output(out, rank, plan)
    first_stage = first_stage.to(device).eval()
    with progress_bar(progress) as bar:
        task = bar.add_task(f"extract r{rank}/{world_size}", total=sum(c for _, c in shards))
        for k, (start, count) in enumerate(shards):
            if k not in todo:
                bar.advance(task, count)
                continue
            latents, labels = encode_shard(
                first_stage,
                dataset,
                start,
                count,
                flips=flips,
                batch_size=batch_size,
                seed=seed,
                device=device,
                on_batch=lambda b: bar.advance(task, b),
                kind=manifest_kind(plan),
                dtype=array_dtype(plan),
            )
            writer.write(k, start, latents, labels)
    writer.finish(len(shards))
    manifest = finalize_manifest(out, world_size)
    return {"written": todo, "skipped": [k for k in range(len(shards)) if k not in todo], "manifest": manifest}


def _open_rank_output(out: Path, rank: int, plan: Mapping) -> tuple[ShardWriter, list[tuple[int, int]], list[int]]:
    """Check ``out`` against ``plan`` before anything is written; then the rank's writer, its shards
    ``(start, count)`` and the indices of those still to do.

    Leftover temporary files of the rank are removed; while any shard is to do, ``manifest.json`` is
    removed too (the directory is incomplete until the last rank finalizes it).
    """
    check_out_dir(out, plan)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, rank, plan)
    writer.remove_stale_tmp()
    shards = rank_shards(plan["num_samples"], rank, plan["world_size"], plan["shard_size"])
    todo = [k for k, (s, c) in enumerate(shards) if not writer.complete(k, s, c)]
    if todo:
        (out / MANIFEST).unlink(missing_ok=True)
    return writer, shards, todo


def extract(cfg: DictConfig) -> dict[str, Any]:
    with startup_errors("lightgen.extract"):
        if cfg.get("out") in (None, "", "???"):
            raise LightgenConfigError("out=<directory> is required: where to write the latent shards.")
        rank, world = dist_env()
        datamodule, dataset, first_stage = _build_inputs(cfg)
        if array_kind(first_stage) == "tokens" and hasattr(first_stage, "_require_weights"):
            first_stage._require_weights()  # a pretrained-only tokenizer without its checkpoint: refuse now
        fs_config = OmegaConf.to_container(cfg.first_stage, resolve=True)
        kwargs = dict(
            rank=rank,
            world_size=world,
            flips=bool(cfg.flips),
            shard_size=int(cfg.shard_size),
            batch_size=int(cfg.batch_size),
            seed=int(cfg.seed),
            device=_device(cfg.get("device", "auto")),
            first_stage_config=fs_config,
            source=_source(OmegaConf.to_container(cfg.data, resolve=True), len(dataset)),
            num_classes=getattr(datamodule, "num_classes", None),
            progress=bool(cfg.get("progress", True)),
        )
        # Validate the output directory before any encoding (extract_rank checks again, harmlessly).
        check_out_dir(
            Path(cfg.out),
            make_plan(
                first_stage,
                len(dataset),
                world_size=world,
                shard_size=kwargs["shard_size"],
                flips=kwargs["flips"],
                seed=kwargs["seed"],
                first_stage_config=fs_config,
            ),
        )
    result = extract_rank(dataset, first_stage, cfg.out, **kwargs)
    _print_summary(result, len(dataset), first_stage_target(fs_config), cfg.out, rank, array_kind(first_stage))
    return result


def _build_inputs(cfg: DictConfig) -> tuple[Any, Any, torch.nn.Module]:
    """The DataModule (checked), its dataset (set up, with ``__getitems__``) and the first stage."""
    datamodule = instantiate(cfg.data)
    if hasattr(datamodule, "check"):
        datamodule.check()
    first_stage = instantiate(cfg.first_stage)
    datamodule.setup()
    dataset = datamodule.dataset
    if dataset is None or not hasattr(dataset, "__getitems__"):
        raise LightgenConfigError(
            f"data={cfg.data.get('_target_')} has no image dataset to extract from; use an image DataModule."
        )
    return datamodule, dataset, first_stage


def _device(device: str) -> str:
    """``auto``: this process's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU."""
    if device == "auto":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    return device


def _source(data_config: Mapping, num_samples: int) -> dict[str, Any]:
    """What the manifest records of the images the latents come from."""
    return {
        "target": data_config.get("_target_"),
        "num_samples": num_samples,
        **{k: data_config[k] for k in ("split", "image_size", "channels", "num_classes") if k in data_config},
    }


def _print_summary(
    result: Mapping, num_samples: int, first_stage_name: str, out, rank: int, kind: str = "latents"
) -> None:
    if result["manifest"] is not None:
        print(
            f"lightgen.extract: {num_samples} samples encoded by {first_stage_name} in {out} "
            f"({len(result['written'])} shards written, {len(result['skipped'])} already complete); "
            f"train with data={kind} data.path={out}",
            flush=True,
        )
    else:
        print(
            f"lightgen.extract: rank {rank} done ({len(result['written'])} shards written, "
            f"{len(result['skipped'])} already complete); the last rank to finish writes {MANIFEST}",
            flush=True,
        )


@hydra.main(version_base="1.3", config_path="../conf", config_name="extract")
def main(cfg: DictConfig) -> None:
    cli.task_started()
    with (
        signals.exit_on_terminated("lightgen.extract", kept=lambda: _kept(Path(cfg.out))),
        work_errors("lightgen.extract", kept=lambda: _kept(Path(cfg.out))),
    ):
        extract(cfg)


def _kept(out: Path) -> str:
    shards = [p for p in out.glob("*.npy") if not p.name.startswith("labels_")] if out.is_dir() else []
    return f"{len(shards)} finished shard file(s) kept in {out}; re-run the same command to go on"


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    cli.run("lightgen.extract", main)
