"""Token shards of a VQ tokenizer: extraction (ranks, resume, flips, dtype), ``data=tokens``, bad input."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from conftest import compose, run_cli
from hydra.utils import instantiate
from test_latents import N, extract, mtimes, one_sentence

from lightgen.data import FashionMNISTDataModule, SyntheticDataModule
from lightgen.data.shards import MANIFEST, read_manifest, token_dtype, verify
from lightgen.data.tokens import TokenDataModule
from lightgen.extract import array_kind, extract_rank
from lightgen.first_stage.vq import VQFirstStage
from lightgen.utils.errors import LightgenConfigError

VQ = "lightgen.first_stage.vq.VQFirstStage"
# 32x32 -> 8x8 tokens, 32 codes, ~6k parameters: a few milliseconds per batch on a CPU.
ARCH = dict(image_size=32, channels=1, block_out_channels=[8, 8, 8], layers_per_block=1, z_channels=8,
            codebook_size=32, codebook_dim=4, norm_num_groups=4, mid_block_add_attention=False,
            name="tiny_vq")  # fmt: skip


def tiny_vq(seed: int = 0, **kw) -> VQFirstStage:
    torch.manual_seed(seed)
    fs = VQFirstStage(**{**ARCH, **kw})
    if kw.get("checkpoint") is None:
        with torch.no_grad():  # codes on the scale of the encoder's output: many distinct tokens
            fs.codebook.normal_(0, 0.3)
    return fs.eval()


def config(**kw) -> dict:
    return {"_target_": VQ, **ARCH, "checkpoint": None, **kw}


def extract_tokens(dataset, out, fs=None, **kw):
    fs = tiny_vq() if fs is None else fs
    kw.setdefault("first_stage_config", config(checkpoint=fs.checkpoint))
    return extract(dataset, out, fs, **kw)


def save_checkpoint(fs: VQFirstStage, path) -> str:
    torch.save(fs.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def images():
    dm = SyntheticDataModule(num_samples=N, batch_size=8)
    dm.setup()
    return dm.dataset


@pytest.fixture(scope="module")
def reference(images):
    """Tokens of every image and of every flipped image, straight from the tokenizer."""
    x = images.__getitems__(list(range(N)))["image"]
    fs = tiny_vq()
    return fs.encode_to_indices(x), fs.encode_to_indices(x.flip(-1))


def tokens_of(path, **kw):
    dm = TokenDataModule(str(path), batch_size=8, **kw)
    dm.setup()
    return dm, dm.dataset.__getitems__(list(range(N)))


# -- extraction -----------------------------------------------------------------------------------
def test_token_shards_manifest_and_batches(images, reference, tmp_path):
    fs = tiny_vq()
    assert array_kind(fs) == "tokens"
    result = extract_tokens(images, tmp_path / "tok")
    m = result["manifest"]
    assert result["written"] == [0, 1, 2]
    assert m["kind"] == "tokens" and m["dtype"] == "int16" and m["token_shape"] == [8, 8]
    assert m["codebook_size"] == 32 and m["tokenizer_sha256"] is None and "latent_shape" not in m
    assert [e["file"] for e in m["shards"]] == [f"tokens_r00_{k:05d}.npy" for k in range(3)]
    raw = np.load(tmp_path / "tok" / m["shards"][0]["file"])
    assert raw.dtype == np.int16 and raw.shape == (16, 8, 8)
    dm = TokenDataModule(str(tmp_path / "tok"), batch_size=8, shuffle=False, expected_codebook_size=32,
                         expected_token_size=8, expected_first_stage=VQ)  # fmt: skip
    batches = [b for b, _ in zip(dm.train_dataloader(), range(N // 8), strict=False)]
    assert set(batches[0]) == {"tokens", "label"}
    tokens = torch.cat([b["tokens"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert tokens.dtype == torch.long and tokens.shape == (N, 8, 8) and labels.dtype == torch.long
    assert torch.equal(tokens, reference[0]) and torch.equal(labels, images.labels)
    assert len(reference[0].unique()) > 4  # a real test: many distinct codes
    assert (dm.codebook_size, dm.token_size, dm.num_classes, dm.random_flip) == (32, 8, 10, False)


def test_flipped_copies_are_tokens_of_the_flipped_images(images, reference, tmp_path):
    m = extract_tokens(images, tmp_path / "tok", flips=True)["manifest"]
    assert np.load(tmp_path / "tok" / m["shards"][0]["file"], mmap_mode="r").shape == (16, 2, 8, 8)
    dm, plain = tokens_of(tmp_path / "tok")
    flipped = dm.dataset.__getitems__([i + N for i in range(N)])
    assert dm.random_flip is True  # random_flip=None: flip exactly when the flipped copies are there
    assert torch.equal(plain["tokens"], reference[0]) and torch.equal(flipped["tokens"], reference[1])
    assert not torch.equal(flipped["tokens"], plain["tokens"].flip(-1))  # not flipped tokens
    assert torch.equal(flipped["label"], plain["label"])
    mixed = dm.dataset.__getitems__([39 + N, 0, 17 + N])
    assert torch.equal(mixed["tokens"], torch.stack([reference[1][39], reference[0][0], reference[1][17]]))


class WideStub(torch.nn.Module):
    """A 'tokenizer' with 40,000 codes (indices past int16) and a 2x2 grid."""

    codebook_size, token_size, checkpoint = 40_000, 2, None

    def encode_to_indices(self, images):
        return (images[:, 0, :2, :2] * 20_000 + 20_000).long().clamp(0, 39_999)


def test_int32_past_32767_codes(images, tmp_path):
    assert (token_dtype(32767), token_dtype(32768), token_dtype(1024)) == ("int16", "int32", "int16")
    m = extract(images, tmp_path / "tok", WideStub())["manifest"]
    assert m["dtype"] == "int32" and np.load(tmp_path / "tok" / m["shards"][0]["file"]).dtype == np.int32
    _, batch = tokens_of(tmp_path / "tok")
    assert torch.equal(batch["tokens"], WideStub().encode_to_indices(images.__getitems__(list(range(N)))["image"]))
    assert int(batch["tokens"].max()) > 32767


def test_resume_skips_finished_token_shards(images, tmp_path):
    out = tmp_path / "tok"
    first = extract_tokens(images, out)["manifest"]
    before = mtimes(out)
    (out / "tokens_r00_00001.npy").unlink()
    result = extract_tokens(images, out)
    assert result["written"] == [1] and result["skipped"] == [0, 2]
    after = mtimes(out)
    assert all(after[f] == before[f] for f in ("tokens_r00_00000.npy", "tokens_r00_00002.npy"))
    assert verify(out, VQ, (8, 8), kind="tokens")["shards"] == first["shards"]  # the same bytes again


def _gloo_worker(rank: int, world: int, port: int, out: str, ckpt: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from lightgen.extract import dist_env

        r, w = dist_env()
        dm = SyntheticDataModule(num_samples=N, batch_size=8)
        dm.setup()
        fs = tiny_vq(seed=123 + rank, checkpoint=ckpt)  # other random init per rank: the weights come from ckpt
        extract_rank(dm.dataset, fs, out, rank=r, world_size=w, shard_size=8, batch_size=8, num_classes=10,
                     flips=True, first_stage_config=config(checkpoint=ckpt))  # fmt: skip
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_write_disjoint_token_shards(images, reference, tmp_path):
    import torch.multiprocessing as mp

    ckpt = save_checkpoint(tiny_vq(), tmp_path / "vq.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "tok"
    mp.spawn(_gloo_worker, args=(2, port, str(out), ckpt), nprocs=2, join=True)
    m = json.loads((out / MANIFEST).read_text())
    assert m["world_size"] == 2 and m["kind"] == "tokens" and len(m["tokenizer_sha256"]) == 64
    files = [{e["file"] for e in m["shards"] if e["rank"] == r} for r in range(2)]
    assert files[0] and files[1] and not files[0] & files[1]
    assert all(f"_r0{r}_" in f for r in range(2) for f in files[r])
    assert [e["start"] for e in m["shards"]] == [0, 8, 16, 20, 28, 36]
    dm, batch = tokens_of(out, expected_checkpoint=ckpt, expected_codebook_size=32, expected_token_size=8)
    flipped = dm.dataset.__getitems__([i + N for i in range(N)])
    assert torch.equal(batch["tokens"], reference[0]) and torch.equal(flipped["tokens"], reference[1])  # = 1 process


# -- the DataModule -------------------------------------------------------------------------------
def test_token_stream_resumes_mid_epoch_exactly_and_splits_over_ranks(images, tmp_path):
    extract_tokens(images, tmp_path / "tok", flips=True)
    dms = [TokenDataModule(str(tmp_path / "tok"), batch_size=8, seed=5) for _ in range(3)]
    full = iter(dms[0].train_dataloader())
    r0, r1 = (iter(dms[1 + r].train_dataloader(rank=r, world_size=2)) for r in range(2))
    stream = []
    for _ in range(12):  # > 2 epochs of 5 batches
        a, b, g = next(r0), next(r1), next(full)
        assert torch.equal(torch.cat([a["tokens"], b["tokens"]]), g["tokens"])
        assert torch.equal(torch.cat([a["label"], b["label"]]), g["label"])
        stream.append(g)
    for start in (2, 7):  # mid-epoch (epoch 0 and epoch 1)
        resumed = iter(TokenDataModule(str(tmp_path / "tok"), batch_size=8, seed=5).train_dataloader(start))
        for k in range(start, 12):
            b = next(resumed)
            assert torch.equal(b["tokens"], stream[k]["tokens"]) and torch.equal(b["label"], stream[k]["label"])


def test_data_tokens_config_reads_the_runs_tokenizer(images, tmp_path):
    cfg = compose(["data=tokens", f"data.path={tmp_path}", "first_stage=vq_small", "data.batch_size=8"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, TokenDataModule)
    assert (dm.expected_first_stage, dm.expected_codebook_size, dm.expected_shape) == (VQ, 512, (8, 8))
    assert dm.expected_checkpoint is None and dm.flip_setting is None
    extract_tokens(images, tmp_path)  # 32 codes, not vq_small's 512
    with pytest.raises(LightgenConfigError, match="32-code tokenizer, but this run's first stage has 512") as err:
        dm.check()
    one_sentence(err)


# -- bad input ------------------------------------------------------------------------------------
def test_extraction_refuses_shards_of_another_tokenizer_and_overwrites_nothing(images, tmp_path):
    out = tmp_path / "tok"
    extract_tokens(images, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other_k = tiny_vq(codebook_size=64)
    with pytest.raises(LightgenConfigError, match="codebook_size=32, but this run has codebook_size=64") as err:
        extract_tokens(images, out, other_k, first_stage_config=config(codebook_size=64))
    one_sentence(err)
    ckpt = save_checkpoint(tiny_vq(seed=1), tmp_path / "other.pt")
    with pytest.raises(LightgenConfigError, match="no checkpoint .random weights., but this run's first") as err:
        extract_tokens(images, out, tiny_vq(checkpoint=ckpt))
    assert "other.pt" in one_sentence(err)
    with pytest.raises(LightgenConfigError, match="holds tokens, but this first stage makes latents") as err:
        extract(images, out)  # the identity first stage: latents
    one_sentence(err)
    lat = tmp_path / "lat"
    extract(images, lat)
    with pytest.raises(LightgenConfigError, match="holds latents, but this first stage makes tokens"):
        extract_tokens(images, lat)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_token_module_refuses_another_tokenizer(images, tmp_path):
    ckpt = save_checkpoint(tiny_vq(), tmp_path / "vq.pt")
    other = save_checkpoint(tiny_vq(seed=1), tmp_path / "other.pt")
    out = tmp_path / "tok"
    extract_tokens(images, out, tiny_vq(checkpoint=ckpt))
    TokenDataModule(str(out), batch_size=8, expected_checkpoint=ckpt, expected_codebook_size=32).check()
    cases = {
        "32-code tokenizer, but this run's first stage has 1024 codes": dict(expected_codebook_size=1024),
        "on a 8x8 grid, but this run's tokenizer makes 16x16": dict(expected_token_size=16),
        "vq.pt of SHA-256 .*, but this run's first stage has checkpoint .*other.pt": dict(expected_checkpoint=other),
        "but this run's first stage has no checkpoint": dict(expected_checkpoint=None),
        "holds tokens of first stage .*VQFirstStage, but this run uses .*KLAutoencoder": dict(
            expected_first_stage="lightgen.first_stage.kl.KLAutoencoder"
        ),
        "data.random_flip=true but .* holds no tokens of flipped images": dict(random_flip=True),
        "does not exist|is not a file": dict(expected_checkpoint=str(tmp_path / "gone.pt")),
    }
    for pattern, kw in cases.items():
        kw.setdefault("expected_checkpoint", ckpt)
        with pytest.raises(LightgenConfigError, match=pattern) as err:
            TokenDataModule(str(out), batch_size=8, **kw).check()
        one_sentence(err)


def test_latents_and_tokens_are_not_mixed_up(images, tmp_path):
    from lightgen.data.latents import LatentDataModule

    extract_tokens(images, tmp_path / "tok")
    extract(images, tmp_path / "lat")
    with pytest.raises(LightgenConfigError, match="holds tokens, but data=latents reads latents; use data=tokens"):
        LatentDataModule(str(tmp_path / "tok"), batch_size=8).check()
    with pytest.raises(LightgenConfigError, match="holds latents, but data=tokens reads tokens; use data=latents"):
        TokenDataModule(str(tmp_path / "lat"), batch_size=8).check()
    with pytest.raises(LightgenConfigError, match="extract tokens first .*first_stage=<tokenizer>") as err:
        TokenDataModule(str(tmp_path / "nowhere"), batch_size=8).check()
    one_sentence(err)
    assert read_manifest(tmp_path / "lat").get("kind") is None  # latent manifests are as before


def test_litdata_backend_streams_tokens(images, reference, tmp_path):
    pytest.importorskip("litdata")
    extract_tokens(images, tmp_path / "tok", flips=True)
    dm = TokenDataModule(str(tmp_path / "tok"), batch_size=8, backend="litdata", seed=3)
    dm.prepare_data()
    dm.setup()
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == N // 8 and batches[0]["tokens"].dtype == torch.long
    assert batches[0]["tokens"].shape == (8, 8, 8)
    views = {t.numpy().tobytes(): (i, 0) for i, t in enumerate(reference[0])}
    views.update({t.numpy().tobytes(): (i, 1) for i, t in enumerate(reference[1])})
    seen = [views[t.numpy().tobytes()] for b in batches for t in b["tokens"]]
    assert sorted(i for i, _ in seen) == list(range(N)) and 0 < sum(v for _, v in seen) < N


# -- CLI ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_extract_cli_tokenizes_fashion_mnist_resumes_and_refuses_another_checkpoint(fake_fashion_mnist, tmp_path):
    """`python -m lightgen.extract first_stage=vq_small first_stage.checkpoint=... out=...` (narrow widths)."""
    narrow = ["first_stage.block_out_channels=[32,32,32]", "first_stage.z_channels=32"]
    narrow.append("first_stage.layers_per_block=1")
    cfg = compose(["first_stage=vq_small", *narrow], config_name="extract")
    torch.manual_seed(0)
    fs = instantiate(cfg.first_stage)
    ckpt = save_checkpoint(fs, tmp_path / "vq.pt")
    torch.manual_seed(1)
    other = save_checkpoint(instantiate(cfg.first_stage), tmp_path / "other.pt")
    out = tmp_path / "tok"
    args = ["data=fashion_mnist", f"data.root={fake_fashion_mnist}", "first_stage=vq_small", *narrow,
            f"out={out}", "shard_size=64", "flips=true", "progress=false", f"hydra.run.dir={tmp_path}/ex"]  # fmt: skip
    proc = run_cli("extract", *args, f"first_stage.checkpoint={ckpt}")
    assert "4 shards written, 0 already complete" in proc.stdout and "data=tokens" in proc.stdout
    m = json.loads((out / MANIFEST).read_text())
    assert m["kind"] == "tokens" and m["num_samples"] == 200 and m["codebook_size"] == 512
    assert m["token_shape"] == [8, 8] and len(m["tokenizer_sha256"]) == 64
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = run_cli("extract", *args, f"first_stage.checkpoint={other}", check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("lightgen.extract: error:") and "other.pt" in bad.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # data=tokens of the run's tokenizer reads them: the tokens of the images and of the flipped images
    cfg = compose(["data=tokens", f"data.path={out}", "first_stage=vq_small", f"first_stage.checkpoint={ckpt}"])
    dm = instantiate(cfg.data)
    dm.setup()
    batch = dm.dataset.__getitems__([0, 5, 200 + 5])
    src = FashionMNISTDataModule(root=str(fake_fashion_mnist), batch_size=8)
    src.setup()
    x = src.dataset.__getitems__([0, 5])["image"]
    fs.eval()
    assert torch.equal(batch["tokens"][:2], fs.encode_to_indices(x))
    assert torch.equal(batch["tokens"][2], fs.encode_to_indices(x.flip(-1))[1])
    assert dm.random_flip is True and dm.num_classes == 10


@pytest.mark.slow  # builds the 72M-parameter VQGAN
def test_pretrained_tokenizer_without_checkpoint_is_refused_before_work(tmp_path, capsys):
    from lightgen.extract import extract as extract_cli

    out = tmp_path / "tok"
    cfg = compose(
        ["data=synthetic", "data.channels=3", "first_stage=vqgan_f16_1024", "first_stage.token_size=2", f"out={out}"],
        config_name="extract",
    )
    with pytest.raises(SystemExit) as exit_:
        extract_cli(cfg)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "first_stage.checkpoint" in err
    assert not out.exists()
