"""One table of bad input for every entry point: exit status 2, one short message naming the problem, no
traceback, and the files already there (a run, samples, shards, references) byte-identical afterwards.

Each row: (entry point, arguments, a phrase the message must contain). ``{ws}`` is the workspace below, with
an existing training run (``{ws}/run``), samples, references, latents and an image folder. Every new method adds
its rows here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMOKE, run_cli, tree_digest
from PIL import Image

pytestmark = pytest.mark.slow

RUN = ["experiment=smoke", "logger=csv", "hydra.run.dir={ws}/run"]

ROWS = [
    # -- lightgen.train: groups, options, types, sizes ---------------------------------------------------------
    ("train", [*RUN, "model=dit_q"], "Could not find 'model/dit_q'; choose one of: diffit_b,"),
    ("train", [*RUN, "trainer=ddp99"], "Could not find 'trainer/ddp99'; choose one of: auto,"),
    ("train", [*RUN, "data.batchsize=8"], "Could not override 'data.batchsize'; To append to your config use +"),
    ("sample", ["ckpt={ws}/run/checkpoints/last.ckpt", "smaple=ddim"], "Could not override 'smaple'"),
    ("evaluate", ["data=imagenet1k"], "Could not find 'data/imagenet1k'"),
    ("extract", ["first_stage=vae9", "out={ws}/lat2"], "Could not find 'first_stage/vae9'"),
    ("train", [*RUN, "optim.optimizer.lr=fast"], "optim.optimizer.lr='fast' must be a number"),
    ("train", [*RUN, "optim.optimizer.lr=-1"], "optim.optimizer is not valid (Invalid learning rate: -1"),
    ("train", [*RUN, "data.batch_size=0"], "data.batch_size=0 must be a whole number >= 1"),
    ("train", [*RUN, "trainer.max_steps=-3"], "trainer.max_steps must be a positive step budget"),
    ("train", [*RUN, "model.num_heads=5"], "num_heads"),
    ("train", [*RUN, "model.patch_size=3"], "patch_size=3 does not divide"),
    ("train", [*RUN, "model=mdt_s", "masking=mdt", "masking.ratio=1.0"], "masking.ratio=1.0 must be in [0, 1)"),
    ("train", [*RUN, "method.ema_decay=1.5"], "method.ema_decay=1.5 must be in [0, 1)"),
    ("train", [*RUN, "callbacks.checkpoint.keep_last=0"], "callbacks.checkpoint.keep_last=0 must be a positive"),
    ("train", [*RUN, "callbacks.nonfinite.max_consecutive=0"], "max_consecutive=0 must be a whole number >= 1"),
    ("train", [*RUN, "data=fashion_mnist", "data.root=/nonexistent/fmnist"], "data.root=/nonexistent/fmnist does not"),
    # -- lightgen.train: checkpoints ------------------------------------------------------------------------------
    ("train", [*RUN, "ckpt_path={ws}/missing.ckpt"], "missing.ckpt does not exist"),
    ("train", [*RUN, "ckpt_path={ws}/text.ckpt"], "text.ckpt cannot be read"),
    ("train", [*RUN, "ckpt_path={ws}/foreign.ckpt"], "is not a lightgen training checkpoint"),
    ("train", [*RUN, "model.depth=3"], "holds a DiT("),  # the existing run's checkpoint is another architecture
    (
        "train",
        [*RUN, "init_from={ws}/run/checkpoints/last.ckpt", "ckpt_path={ws}/run/checkpoints/last.ckpt"],
        "pass only one",
    ),
    # -- lightgen.train: missing weights, data of another first stage -------------------------------------------
    ("train", [*RUN, "data=latents", "data.path={ws}/latents", "first_stage=small_kl"], "first stage"),
    (
        "train",
        [
            *RUN,
            "first_stage=sd_vae_ft_ema",
            "data.channels=3",
            "data.image_size=256",
            "first_stage.path_or_id={ws}/no_vae",
        ],
        "no AutoencoderKL weights at {ws}/no_vae",
    ),
    # -- lightgen.sample --------------------------------------------------------------------------------------
    ("sample", ["ckpt={ws}/missing.ckpt", "out={ws}/s1"], "missing.ckpt does not exist"),
    ("sample", ["ckpt={ws}/text.ckpt", "out={ws}/s1"], "text.ckpt"),
    (
        "sample",
        ["ckpt={ws}/run/checkpoints/last.ckpt", "num_samples=0", "out={ws}/s1"],
        "num_samples and batch_size must be positive",
    ),
    (
        "sample",
        ["ckpt={ws}/run/checkpoints/last.ckpt", "batch_size=0", "out={ws}/s1"],
        "num_samples and batch_size must be positive",
    ),
    ("sample", ["ckpt={ws}/run/checkpoints/last.ckpt", "sampler=heun9", "out={ws}/s1"], "heun9"),
    (
        "sample",
        ["ckpt={ws}/run/checkpoints/last.ckpt", "cfg_scale=strong", "out={ws}/s1"],
        "cfg_scale='strong' must be a number",
    ),
    (
        "sample",
        ["ckpt={ws}/run/checkpoints/last.ckpt", "first_stage=sd_vae_ft_ema", "out={ws}/s1"],
        "first_stage=sd_vae_ft_ema applies to released weights only",
    ),
    # -- lightgen.evaluate ------------------------------------------------------------------------------------
    ("evaluate", ["samples={ws}/missing.npz", "ref={ws}/ref32.npz"], "missing.npz"),
    ("evaluate", ["samples={ws}/samples32.npz", "ref={ws}/nope.npz"], "ref={ws}/nope.npz does not exist"),
    ("evaluate", ["samples={ws}/samples32.npz", "ref={ws}/ref32.npz", "num_samples=1"], "num_samples=1"),
    ("evaluate", ["samples={ws}/samples32.npz", "ref={ws}/ref64.npz"], "different image sizes"),
    ("evaluate", ["samples={ws}/samples32.npz", "ref={ws}/ref32.npz", "inception_weights={ws}/none.pth"], "none.pth"),
    ("evaluate", ["samples={ws}/text.ckpt", "ref={ws}/ref32.npz"], "text.ckpt"),
    ("evaluate", ["mode=judge"], "mode='judge' is not known"),
    # -- lightgen.extract -------------------------------------------------------------------------------------
    ("extract", ["data=synthetic", "first_stage=identity"], "out=<directory> is required"),
    (
        "extract",
        ["data=synthetic", "first_stage=identity", "out={ws}/lat2", "shard_size=0"],
        "shard_size and batch_size must be positive",
    ),
    (
        "extract",
        ["data=synthetic", "data.image_size=256", "data.channels=3", "first_stage=vqgan_f16_1024", "out={ws}/lat2"],
        "is a pretrained tokenizer but no weights were given",
    ),
    ("extract", ["data=synthetic", "first_stage=identity", "out={ws}/latents", "flips=true"], "flips=False, not True"),
    (
        "extract",
        ["data=imagenet", "data.root={ws}/nowhere", "first_stage=identity", "out={ws}/lat2"],
        "nowhere does not exist",
    ),
    (
        "extract",
        [
            "data=imagenet",
            "data.root={ws}/images",
            "data.num_classes=2",
            "data.image_size=32",
            "data.num_workers=0",
            "first_stage=identity",
            "out={ws}/lat3",
        ],
        "broken.JPEG cannot be read as an image",
    ),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("ws")
    run_cli("train", *SMOKE, "callbacks.sample_grid=null", f"hydra.run.dir={ws}/run")
    run_cli("extract", "data=synthetic", "first_stage=identity", f"out={ws}/latents", f"hydra.run.dir={ws}/h")
    rng = np.random.default_rng(0)
    np.savez(ws / "samples32.npz", arr_0=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    np.savez(ws / "ref32.npz", arr_0=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    np.savez(ws / "ref64.npz", arr_0=rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8))
    (ws / "text.ckpt").write_text("these are not the weights you are looking for\n")
    torch.save({"model": {"w": torch.zeros(2)}}, ws / "foreign.ckpt")
    for c in ("a", "b"):
        (ws / "images" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(ws / "images" / c / f"{i}.JPEG")
    (ws / "images" / "b" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 half a jpeg")
    return ws


def test_the_table_has_at_least_30_rows_across_the_four_entry_points():
    assert len(ROWS) >= 30 and {entry for entry, _, _ in ROWS} == {"train", "sample", "evaluate", "extract"}


@pytest.mark.parametrize("entry, args, phrase", ROWS, ids=[f"{e}:{' '.join(a[-1:])}" for e, a, _ in ROWS])
def test_bad_input_gets_one_sentence_exit_2_and_touches_nothing(workspace, tmp_path, entry, args, phrase):
    ws = str(workspace)
    before = tree_digest(workspace)
    hydra_dir = [] if entry == "train" else [f"hydra.run.dir={tmp_path}"]  # (train rows: the existing run)
    proc = run_cli(entry, *(a.format(ws=ws) for a in args), *hydra_dir, check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err[-3000:], proc.stdout[-1000:])
    assert "Traceback" not in err + proc.stdout, err[-3000:]
    assert len(err.splitlines()) <= 3, err[-3000:]
    assert phrase.format(ws=ws) in err, err[-3000:]
    assert tree_digest(workspace) == before, "bad input must not change any file that was there"
