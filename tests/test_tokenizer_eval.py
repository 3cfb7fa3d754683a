"""``python -m lightgen.evaluate tokenizer``: rFID, PSNR, SSIM and codebook usage of a VQ tokenizer; bad input."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from conftest import compose, run_cli
from hydra.utils import instantiate
from test_evaluate import needs_inception

from lightgen.data.reference_images import iter_dataset_images
from lightgen.evaluate import run
from lightgen.metrics.reconstruction import ReconstructionStats, codebook_usage
from lightgen.utils.errors import LightgenConfigError
from lightgen.utils.image_grids import to_uint8

# A narrow vq_small (same class and layout) for the in-process test that needs a working tokenizer.
TINY = ["first_stage.block_out_channels=[32,32,32]", "first_stage.z_channels=32", "first_stage.layers_per_block=1",
        "first_stage.codebook_size=32", "first_stage.codebook_dim=8"]  # fmt: skip


# -- the maths -------------------------------------------------------------------------------------
def test_psnr_and_ssim_equal_hand_computations_on_a_fixed_pair():
    """Image 1 is off by 51/255 = 0.2 everywhere (MSE 0.04: PSNR 10 log10 25), image 2 by 1.0 on a quarter of its
    pixels (MSE 0.25: PSNR 10 log10 4); their mean is 10 log10(100) / 2 = 10 dB exactly."""
    originals = np.zeros((2, 16, 16, 1), np.uint8)
    recon = originals.copy()
    recon[0] += 51
    recon[1, :8, :8] = 255
    stats = ReconstructionStats(codebook_size=4).update(originals[:1], recon[:1]).update(originals[1:], recon[1:])
    m = stats.compute()
    # torchmetrics divides by a float32 log(10): 5e-8 relative
    assert m["psnr"] == pytest.approx(10.0, rel=1e-6)
    assert m["psnr"] == pytest.approx((10 * math.log10(25) + 10 * math.log10(4)) / 2, rel=1e-6)
    assert m["ssim"] < 0.9
    same = ReconstructionStats(codebook_size=4).update(recon, recon).compute()
    assert same["ssim"] == pytest.approx(1.0, abs=1e-9)
    rgb = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    nchw = ReconstructionStats(4).update(rgb.transpose(0, 3, 1, 2), rgb.transpose(0, 3, 1, 2)[::-1].copy())
    nhwc = ReconstructionStats(4).update(rgb, rgb[::-1].copy())
    assert nchw.compute() == nhwc.compute()


def test_codebook_usage_and_perplexity_equal_hand_computations():
    # 8 codes, histogram (2, 1, 1, 0, ...): 3 of 8 used, p = (1/2, 1/4, 1/4), entropy 1.5 ln 2, perplexity 2^1.5
    indices = torch.tensor([[[0, 0], [1, 2]]])  # (N=1, 2, 2)
    stats = ReconstructionStats(codebook_size=8)
    stats.update_codes(indices)
    assert stats.counts.tolist() == [2, 1, 1, 0, 0, 0, 0, 0]
    m = codebook_usage(stats.counts)
    assert m["codebook_usage"] == 3 / 8 and m["codes_used"] == 3
    assert m["codebook_perplexity"] == pytest.approx(2**1.5, rel=1e-12)
    uniform = codebook_usage([5] * 16)
    assert uniform["codebook_usage"] == 1.0 and uniform["codebook_perplexity"] == pytest.approx(16.0, rel=1e-12)
    assert codebook_usage([0, 7, 0, 0])["codebook_perplexity"] == pytest.approx(1.0)
    with pytest.raises(LightgenConfigError, match="codebook has 8"):
        stats.update_codes(torch.tensor([[[8]]]))


# -- the entry point -------------------------------------------------------------------------------
def save_vq_small(path, seed: int = 0) -> str:
    """A random-weights vq_small (1 x 32 x 32) saved as a state dict, as a trained one would be."""
    cfg = compose(["first_stage=vq_small", "data=fashion_mnist"], config_name="evaluate")
    torch.manual_seed(seed)
    fs = instantiate(cfg.first_stage)
    torch.save(fs.state_dict(), path)
    return str(path)


@needs_inception
@pytest.mark.slow
def test_tokenizer_evaluation_end_to_end(fake_fashion_mnist, tmp_path):
    """4 test images through a random-weights vq_small checkpoint: the JSON's numbers equal the same
    reconstruction done here by hand (PSNR, usage, perplexity; rFID from the same Inception features), the
    tokenizer is identified by its checkpoint's SHA-256; with ref = the originals, fid_ref = rFID."""
    from lightgen.metrics import InceptionFeatures, fid_from_features

    ckpt = save_vq_small(tmp_path / "vq.pt")
    data = [f"data.root={fake_fashion_mnist}", "data.system_dirs=[]", "data.split=test"]
    ref = tmp_path / "originals.npz"
    dm = instantiate(compose(["data=fashion_mnist", *data], config_name="evaluate").data)
    originals = np.concatenate(list(iter_dataset_images(dm, 4, seed=0, batch_size=4)))
    np.savez(ref, arr_0=originals)
    args = ["tokenizer", "first_stage=vq_small", f"first_stage.checkpoint={ckpt}", *data, "num_samples=4",
            "batch_size=3", "fd_method=eigh", f"ref={ref}"]  # fmt: skip
    proc = run_cli("evaluate", *args)
    out = tmp_path / "vq_tokenizer_test_n4.json"  # default: beside the checkpoint
    result = json.loads(out.read_text())
    m = result["metrics"]
    assert set(m) == {"rfid", "psnr", "ssim", "codebook_usage", "codebook_perplexity", "codes_used", "fid_ref",
                      "fid_ref_originals"}  # fmt: skip
    assert "rfid" in proc.stdout and "psnr" in proc.stdout  # the printed table
    assert (
        result["num_images"] == 4 and result["data"]["split"] == "test" and result["data"]["num_images_in_split"] == 50
    )
    tok = result["tokenizer"]
    assert tok["name"] == "vq_small" and tok["class"] == "lightgen.first_stage.vq.VQFirstStage"
    assert tok["checkpoint"] == ckpt and tok["checkpoint_sha256"] == hashlib.sha256(open(ckpt, "rb").read()).hexdigest()
    assert tok["config"]["codebook_size"] == 512 and tok["token_size"] == 8

    # the same reconstruction by hand
    fs = instantiate(compose(["first_stage=vq_small", f"first_stage.checkpoint={ckpt}", *data], "evaluate").first_stage)
    x = torch.from_numpy(originals).permute(0, 3, 1, 2).float() / 127.5 - 1
    indices = fs.eval().encode_to_indices(x)
    recon = to_uint8(fs.decode_indices(indices)).numpy()
    mse = ((recon.astype(np.float64) - originals) / 255.0) ** 2
    assert m["psnr"] == pytest.approx(np.mean(10 * np.log10(1 / mse.mean((1, 2, 3)))), rel=1e-6)
    counts = np.bincount(indices.flatten().numpy(), minlength=512)
    p = counts[counts > 0] / counts.sum()
    assert m["codes_used"] == (counts > 0).sum() and m["codebook_usage"] == (counts > 0).sum() / 512
    assert m["codebook_perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
    inception = InceptionFeatures()
    pool_o, pool_r = inception.features(originals)["pool"], inception.features(recon)["pool"]
    assert m["rfid"] == pytest.approx(fid_from_features(pool_r, pool_o, method="eigh"), rel=1e-6)
    assert m["rfid"] > 1.0 and m["fid_ref"] == pytest.approx(m["rfid"], rel=1e-6)  # ref = the same originals
    assert abs(m["fid_ref_originals"]) < 1e-3


def fails(overrides: list[str], capsys) -> str:
    """The one line a bad ``lightgen.evaluate tokenizer`` call prints (exit status 2, nothing else)."""
    cfg = compose(["mode=tokenizer", "rfid=false", *overrides], config_name="evaluate")
    with pytest.raises(SystemExit) as exc:
        run(cfg)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightgen.evaluate: error: ") and "\n" not in err and err.endswith(".")
    return err


SYNTHETIC = ["data=synthetic", "data.num_samples=4"]


def test_bad_inputs_fail_with_one_sentence_before_any_work(tmp_path, capsys):
    out = tmp_path / "metrics.json"
    out.write_text('{"metrics": "from an earlier run"}')
    keep = [f"out={out}", "overwrite=true"]
    err = fails(["first_stage=identity", *SYNTHETIC, *keep], capsys)
    assert "is not a VQ tokenizer" in err and "vq_small" in err
    err = fails(["first_stage=small_kl", *SYNTHETIC, *keep], capsys)
    assert "is not a VQ tokenizer" in err
    err = fails(["first_stage=vq_small", *SYNTHETIC, "data.image_size=30", *keep], capsys)
    assert "downsamples by 4" in err and "image_size=30" in err  # VQFirstStage's own sentence
    err = fails(["first_stage=vqgan_f16_1024", *SYNTHETIC, "data.image_size=256", "data.channels=3", *keep], capsys)
    assert "pretrained tokenizer" in err and "first_stage.checkpoint" in err
    err = fails(["first_stage=vq_small", *SYNTHETIC, "num_samples=5", *keep], capsys)
    assert "num_samples=5" in err and "holds 4" in err
    err = fails(["first_stage=vq_small", *SYNTHETIC, "first_stage.channels=3", *keep], capsys)
    assert "takes 3 x 32 x 32 images" in err and "gives 1 x 32 x 32" in err
    err = fails(["first_stage=vq_small", *SYNTHETIC, f"first_stage.checkpoint={tmp_path / 'nope.ckpt'}", *keep], capsys)
    assert "nope.ckpt" in err
    err = fails(["first_stage=vq_small", *SYNTHETIC, f"out={out}"], capsys)  # no overwrite=true
    assert "already exists" in err
    assert out.read_text() == '{"metrics": "from an earlier run"}'


def test_a_run_that_fails_midway_leaves_the_existing_json_intact(tmp_path, monkeypatch):
    import lightgen.evaluate as evaluate

    out = tmp_path / "metrics.json"
    out.write_text("old")

    def broken(*args, **kwargs):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(evaluate, "reconstruct", broken)
    cfg = compose(["mode=tokenizer", "rfid=false", "first_stage=vq_small", *TINY, *SYNTHETIC, f"out={out}",
                   "overwrite=true"], config_name="evaluate")  # fmt: skip
    with pytest.raises(RuntimeError, match="killed mid-run"):
        run(cfg)
    assert out.read_text() == "old" and list(tmp_path.iterdir()) == [out]
    monkeypatch.undo()
    result = run(cfg)  # the same command, not broken: replaces it (overwrite=true), atomically
    assert json.loads(out.read_text()) == result and result["rfid_definition"] is None and result["metrics"]["psnr"] > 0
