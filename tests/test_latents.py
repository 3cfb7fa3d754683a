"""Latent shards, extraction (resume, ranks, determinism) and the memory-mapped latent DataModule."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from torch import nn

from lightgen.data import SyntheticDataModule
from lightgen.data.latents import LatentDataModule
from lightgen.data.shards import MANIFEST, ShardWriter, read_manifest, verify
from lightgen.extract import extract_rank
from lightgen.first_stage import IdentityFirstStage
from lightgen.utils.errors import LightgenConfigError

N = 40  # samples; shard_size 16 -> shards of 16, 16, 8 (one rank)
IDENTITY = "lightgen.first_stage.IdentityFirstStage"


class NoisyStub(nn.Module):
    """A stochastic 'autoencoder': 2x average pooling, 2 channels, Gaussian noise, scaled by 0.5."""

    latent_channels, latent_size, scale_factor = 2, 16, 0.5

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.avg_pool2d(images, 2)
        z = torch.cat([z, -z], dim=1)
        return (z + 0.1 * torch.randn_like(z)) * self.scale_factor


@pytest.fixture(scope="module")
def images():
    dm = SyntheticDataModule(num_samples=N, batch_size=8)
    dm.setup()
    return dm.dataset


def extract(dataset, out, first_stage=None, **kw):
    kw.setdefault("shard_size", 16)
    kw.setdefault("batch_size", 8)
    kw.setdefault("num_classes", 10)
    if first_stage is None:
        first_stage = IdentityFirstStage(1, 32)
        kw.setdefault("first_stage_config", {"_target_": IDENTITY, "channels": 1, "image_size": 32})
    cls = type(first_stage)
    kw.setdefault("first_stage_config", {"_target_": f"{cls.__module__}.{cls.__qualname__}"})
    return extract_rank(dataset, first_stage, out, **kw)


def all_latents(dm: LatentDataModule):
    dm.setup()
    batch = dm.dataset.__getitems__(list(range(len(dm.dataset))))
    return batch["latent"], batch["label"]


def mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.glob("*.npy")}


def one_sentence(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.strip().endswith(".")
    return msg


# -- round trip -----------------------------------------------------------------------------------
def test_loader_yields_exactly_the_extracted_latents_in_dataset_order(images, tmp_path):
    result = extract(images, tmp_path / "lat")
    assert result["written"] == [0, 1, 2] and result["manifest"]["num_samples"] == N
    dm = LatentDataModule(str(tmp_path / "lat"), batch_size=8, shuffle=False, random_flip=False)
    batches = [b for b, _ in zip(dm.train_dataloader(), range(N // 8), strict=False)]
    latents = torch.cat([b["latent"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    ref = images.__getitems__(list(range(N)))
    assert latents.dtype == torch.float32 and latents.shape == (N, 1, 32, 32)
    torch.testing.assert_close(latents, ref["image"].half().float(), rtol=0, atol=0)
    assert torch.equal(labels, ref["label"]) and labels.dtype == torch.long
    assert (dm.latent_channels, dm.latent_size, dm.num_classes) == (1, 32, 10)


def test_stochastic_encoder_is_deterministic_per_seed(images, tmp_path):
    extract(images, tmp_path / "a", NoisyStub(), seed=3)
    extract(images, tmp_path / "b", NoisyStub(), seed=3, batch_size=5)
    extract(images, tmp_path / "c", NoisyStub(), seed=4)
    a, b, c = (read_manifest(tmp_path / d)["shards"] for d in "abc")
    assert [e["sha256"] for e in a] == [e["sha256"] for e in b]
    assert [e["sha256"] for e in a] != [e["sha256"] for e in c]
    m = read_manifest(tmp_path / "a")
    assert m["latent_shape"] == [2, 16, 16] and m["scale_factor"] == 0.5 and m["dtype"] == "float16"
    z, _ = all_latents(LatentDataModule(str(tmp_path / "a"), batch_size=8))
    pooled = torch.nn.functional.avg_pool2d(images.__getitems__(list(range(N)))["image"], 2)
    noise = z - 0.5 * torch.cat([pooled, -pooled], dim=1)
    assert z.shape == (N, 2, 16, 16) and 0.03 < noise.std() < 0.07  # 0.5 * 0.1 * N(0, 1), float16-rounded


def test_stored_flips_are_selected_by_the_flip_bit(images, tmp_path):
    m = extract(images, tmp_path / "lat", flips=True)["manifest"]
    assert m["flips"] is True
    assert np.load(tmp_path / "lat" / m["shards"][0]["file"], mmap_mode="r").shape == (16, 2, 1, 32, 32)
    dm = LatentDataModule(str(tmp_path / "lat"), batch_size=8)
    dm.setup()
    idx = [0, 3, 17, 39]
    plain = dm.dataset.__getitems__(idx)
    flipped = dm.dataset.__getitems__([i + N for i in idx])
    ref = images.__getitems__(idx)["image"].half().float()
    assert torch.equal(plain["latent"], ref) and torch.equal(flipped["latent"], ref.flip(-1))
    assert torch.equal(plain["label"], flipped["label"])
    # a mixed batch, out of order and across shards
    mixed = dm.dataset.__getitems__([39 + N, 0, 17 + N, 3])
    assert torch.equal(mixed["latent"], torch.stack([ref[3].flip(-1), ref[0], ref[2].flip(-1), ref[1]]))


def test_without_stored_flips_the_flip_bit_flips_the_latent(images, tmp_path):
    extract(images, tmp_path / "lat")
    dm = LatentDataModule(str(tmp_path / "lat"), batch_size=8)
    dm.setup()
    a, b = dm.dataset.__getitems__([5]), dm.dataset.__getitems__([5 + N])
    assert torch.equal(b["latent"], a["latent"].flip(-1))


# -- resume ---------------------------------------------------------------------------------------
def test_resume_recomputes_only_missing_truncated_or_partial_shards(images, tmp_path):
    out = tmp_path / "lat"
    first = extract(images, out)["manifest"]
    before = mtimes(out)
    (out / "latents_r00_00001.npy").unlink()  # missing
    raw = (out / "labels_r00_00002.npy").read_bytes()
    (out / "labels_r00_00002.npy").write_bytes(raw[:-8])  # truncated
    (out / "latents_r00_00000.npy.1234abcd.tmp").write_bytes(b"half a shard")  # killed mid-write
    before2 = mtimes(out)
    result = extract(images, out)
    assert result["written"] == [1, 2] and result["skipped"] == [0]
    after = mtimes(out)
    assert after["latents_r00_00000.npy"] == before["latents_r00_00000.npy"]
    assert after["labels_r00_00000.npy"] == before["labels_r00_00000.npy"]
    assert after["labels_r00_00002.npy"] != before2["labels_r00_00002.npy"]
    assert not list(out.glob("*.tmp"))
    assert verify(out, IDENTITY, (1, 32, 32))["shards"] == first["shards"]  # same bytes again


def test_interrupted_extraction_resumes_where_it_stopped(images, tmp_path, monkeypatch):
    out = tmp_path / "lat"
    real_write, calls = ShardWriter.write, []

    def dies_on_second_shard(self, k, *a, **kw):
        if k == 1:
            raise KeyboardInterrupt
        calls.append(k)
        return real_write(self, k, *a, **kw)

    monkeypatch.setattr(ShardWriter, "write", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        extract(images, out)
    assert not (out / MANIFEST).exists() and calls == [0]
    with pytest.raises(LightgenConfigError, match="not finished: re-run it to resume"):
        LatentDataModule(str(out), batch_size=8).check()
    monkeypatch.setattr(ShardWriter, "write", real_write)
    shard0 = (out / "latents_r00_00000.npy").stat().st_mtime_ns
    result = extract(images, out)
    assert result["written"] == [1, 2] and result["skipped"] == [0]
    assert (out / "latents_r00_00000.npy").stat().st_mtime_ns == shard0
    verify(out)


# -- ranks ----------------------------------------------------------------------------------------
def test_two_ranks_write_disjoint_shards_covering_the_dataset(images, tmp_path):
    out = tmp_path / "lat"
    r1 = extract(images, out, rank=1, world_size=2, shard_size=8)
    assert r1["manifest"] is None and not (out / MANIFEST).exists()  # rank 0 is not done yet
    r0 = extract(images, out, rank=0, world_size=2, shard_size=8)
    m = r0["manifest"]
    assert m is not None and m["world_size"] == 2
    files = {
        0: {e["file"] for e in m["shards"] if e["rank"] == 0},
        1: {e["file"] for e in m["shards"] if e["rank"] == 1},
    }
    assert files[0] and files[1] and not files[0] & files[1]
    assert all("_r00_" in f for f in files[0]) and all("_r01_" in f for f in files[1])
    assert sum(e["count"] for e in m["shards"]) == N and [e["start"] for e in m["shards"]] == [0, 8, 16, 20, 28, 36]
    z, y = all_latents(LatentDataModule(str(out), batch_size=8))
    ref = images.__getitems__(list(range(N)))
    assert torch.equal(z, ref["image"].half().float()) and torch.equal(y, ref["label"])
    # a single-process resume of a 2-process extraction is refused rather than mixed
    with pytest.raises(LightgenConfigError, match="processes=2, not 1") as err:
        extract(images, out, shard_size=8)
    one_sentence(err)


def test_two_loader_ranks_split_every_global_batch_disjointly(images, tmp_path):
    extract(images, tmp_path / "lat", flips=True)
    dms = [LatentDataModule(str(tmp_path / "lat"), batch_size=8, seed=5) for _ in range(3)]
    full, r0, r1 = (
        iter(dms[0].train_dataloader()),
        iter(dms[1].train_dataloader(rank=0, world_size=2)),
        iter(dms[2].train_dataloader(rank=1, world_size=2)),
    )
    seen = []
    for _ in range(12):  # > 2 epochs of 5 batches
        a, b, g = next(r0), next(r1), next(full)
        assert torch.equal(torch.cat([a["latent"], b["latent"]]), g["latent"])
        assert torch.equal(torch.cat([a["label"], b["label"]]), g["label"])
    s0 = iter(dms[1].train_dataloader(rank=0, world_size=2).batch_sampler)
    s1 = iter(dms[2].train_dataloader(rank=1, world_size=2).batch_sampler)
    for _ in range(5):
        i0, i1 = {i % N for i in next(s0)}, {i % N for i in next(s1)}
        assert len(i0) == len(i1) == 4 and not i0 & i1
        seen += [*i0, *i1]
    assert sorted(seen) == list(range(N))  # one epoch covers every sample once
    # resuming at a step continues the same stream
    resumed = next(iter(dms[0].train_dataloader(start_batch=7)))
    g = iter(dms[0].train_dataloader())
    for _ in range(7):
        next(g)
    assert torch.equal(next(g)["latent"], resumed["latent"])


# -- bad input ------------------------------------------------------------------------------------
def test_out_of_another_first_stage_is_refused_and_left_untouched(images, tmp_path):
    out = tmp_path / "lat"
    extract(images, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(LightgenConfigError, match="first stage") as err:
        extract(images, out, NoisyStub())
    assert "NoisyStub" in one_sentence(err)
    with pytest.raises(LightgenConfigError, match="flips=False, not True"):
        extract(images, out, flips=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_latent_module_refuses_another_first_stage_or_shape(images, tmp_path):
    out = tmp_path / "lat"
    extract(images, out)
    with pytest.raises(LightgenConfigError, match="first stage") as err:
        LatentDataModule(str(out), batch_size=8, expected_first_stage="lightgen.first_stage.kl.KLAutoencoder").check()
    one_sentence(err)
    with pytest.raises(LightgenConfigError, match=r"shape \(1, 32, 32\).*\(4, 32, 32\)") as err:
        LatentDataModule(str(out), batch_size=8, expected_shape=[4, 32, 32]).check()
    one_sentence(err)
    with pytest.raises(LightgenConfigError, match="set data.num_classes=10"):
        LatentDataModule(str(out), batch_size=8, num_classes=1000).check()
    with pytest.raises(LightgenConfigError, match="image_size=64"):  # same class, other settings
        LatentDataModule(str(out), batch_size=8, expected_first_stage={"_target_": IDENTITY, "image_size": 64}).check()
    LatentDataModule(str(out), batch_size=8, expected_first_stage={"_target_": IDENTITY, "image_size": 32}).check()


def test_missing_manifest(tmp_path):
    with pytest.raises(LightgenConfigError, match="no manifest.json in .*python -m lightgen.extract") as err:
        LatentDataModule(str(tmp_path / "nowhere"), batch_size=8).setup()
    one_sentence(err)


@pytest.mark.parametrize("damage", ["missing", "truncated", "checksum"])
def test_damaged_shard_is_named(images, tmp_path, damage):
    out = tmp_path / "lat"
    extract(images, out)
    target = out / "latents_r00_00001.npy"
    if damage == "missing":
        target.unlink()
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:-100])
    else:
        raw = bytearray(target.read_bytes())
        raw[-3] ^= 0xFF
        target.write_bytes(bytes(raw))
    dm = LatentDataModule(str(out), batch_size=8, check_hashes=True)
    with pytest.raises(
        LightgenConfigError, match={"missing": "is missing", "truncated": "truncated", "checksum": "checksum"}[damage]
    ) as err:
        dm.check()
    assert str(target) in one_sentence(err)
    if damage == "checksum":
        LatentDataModule(str(out), batch_size=8).check()  # sizes alone cannot see it; check_hashes=False is the default


def test_litdata_backend_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "litdata", None)  # as if litdata were not installed
    with pytest.raises(LightgenConfigError, match="pip install litdata") as err:
        LatentDataModule(str(tmp_path), batch_size=8, backend="litdata").check()
    one_sentence(err)


# -- CLI ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_extract_cli_writes_resumes_refuses_and_trains(tmp_path):
    out = tmp_path / "lat"
    args = ["data=synthetic", "first_stage=identity", f"out={out}", "shard_size=100", f"hydra.run.dir={tmp_path}/ex"]
    proc = run_cli("extract", *args)
    assert "3 shards written, 0 already complete" in proc.stdout
    m = json.loads((out / MANIFEST).read_text())
    assert m["num_samples"] == 256 and [e["count"] for e in m["shards"]] == [100, 100, 56]
    assert m["first_stage"]["target"] == IDENTITY and m["latent_shape"] == [1, 32, 32]
    assert "0 shards written, 3 already complete" in run_cli("extract", *args).stdout
    bad = run_cli("extract", *args, "flips=true", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("lightgen.extract: error:")
    assert len(bad.stderr.strip().splitlines()) == 1 and "flips=False, not True" in bad.stderr
    run_cli(
        "train",
        "experiment=smoke",
        "data=latents",
        f"data.path={out}",
        "data.batch_size=8",
        f"hydra.run.dir={tmp_path}/train",
    )
    assert (tmp_path / "train" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_ddp_two_processes_train_on_latents(tmp_path):
    """trainer=ddp_cpu (2 gloo processes) streams the memory-mapped shards (rank split: test above)."""
    import torch

    out = tmp_path / "lat"
    run_cli("extract", "data=synthetic", "first_stage=identity", f"out={out}", f"hydra.run.dir={tmp_path}/ex")
    run_cli(
        "train",
        "experiment=smoke",
        "trainer=ddp_cpu",
        "data=latents",
        f"data.path={out}",
        "data.batch_size=8",
        f"hydra.run.dir={tmp_path}/train",
        timeout=900,
    )
    ckpt = torch.load(tmp_path / "train" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4 and len(ckpt["lightgen"]["rng_states"]) == 2
