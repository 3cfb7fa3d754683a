"""Stage-1 training of VQ first stages: VQAutoencoderLoss, the quantizer seam, a tiny CLI run with the GAN on."""

from __future__ import annotations

import csv
import functools

import pytest
import torch
from conftest import compose, run_cli

from lightgen.first_stage.kl import SmallKLAutoencoder
from lightgen.first_stage.losses import KLAutoencoderLoss, Stage1Loss, VQAutoencoderLoss
from lightgen.first_stage.quantize import STAT_BUFFERS, VectorQuantizer
from lightgen.first_stage.vq import VQFirstStage
from lightgen.methods.autoencoder import AutoencoderModule
from lightgen.utils.errors import LightgenConfigError

TINY = dict(channels=1, block_out_channels=(32, 32, 32), layers_per_block=1, mid_block_add_attention=False)


def tiny_vq(**quantizer_kwargs) -> VQFirstStage:
    quantizer = VectorQuantizer(64, 16, **quantizer_kwargs)
    return VQFirstStage(codebook_size=64, codebook_dim=16, quantizer=quantizer, **TINY)


def test_vq_loss_matches_the_hand_computed_terms():
    x = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]]])
    rec = torch.tensor([[[[0.0, -1.0], [0.0, 0.0]]]])  # |x - rec| = 1, 0, 0.5, 0: mean 0.375, sum 1.5
    info = {"usage": torch.tensor(0.75), "perplexity": torch.tensor(3.0), "codebook": torch.tensor(0.1),
            "commitment": torch.tensor(0.4), "entropy": torch.tensor(0.0)}  # fmt: skip
    loss, logs = VQAutoencoderLoss(codebook_weight=2.0).generator_loss(x, rec, (torch.tensor(0.5), info))
    assert loss.item() == pytest.approx(0.375 + 2.0 * 0.5)  # taming: mean L1 + codebook_weight * q_loss
    assert logs["codebook_usage"].item() == 0.75 and logs["perplexity"].item() == 3.0
    assert logs["q_loss"].item() == 0.5 and logs["commitment_loss"].item() == pytest.approx(0.4)
    # the KL loss sums over pixels (LDM) on the same reconstruction
    post = type("P", (), {"mean": torch.zeros(1, 1), "logvar": torch.zeros(1, 1)})()
    kl_loss, _ = KLAutoencoderLoss().generator_loss(x, rec, post)
    assert kl_loss.item() == pytest.approx(1.5)
    assert isinstance(KLAutoencoderLoss(), Stage1Loss) and isinstance(VQAutoencoderLoss(), Stage1Loss)
    # a quantizer without statistics (diffusers'): perplexity from the indices
    _, logs = VQAutoencoderLoss().generator_loss(x, rec, (torch.tensor(0.0), {"indices": torch.tensor([0, 0, 1, 1])}))
    assert logs["perplexity"].item() == pytest.approx(2.0) and "codebook_usage" not in logs


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    loss = VQAutoencoderLoss(disc_weight=0.5)
    d = loss.adaptive_weight((w * torch.tensor([6.0, 8.0])).sum(), (w * torch.tensor([0.6, 0.8])).sum(), w)
    assert d.item() == pytest.approx(0.5 * 10.0 / (1.0 + 1e-4))  # ‖∇nll‖ = 10, ‖∇g‖ = 1


def test_lightgen_quantizer_plugs_into_the_seam_and_loads_bare_codebooks():
    torch.manual_seed(0)
    fs = tiny_vq()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    rec, q_loss, idx = fs(x)  # the dict info of lightgen's quantizer (diffusers' is a tuple)
    assert rec.shape == x.shape and idx.shape == (2, 8, 8) and q_loss.ndim == 0
    assert torch.equal(idx, fs.encode_to_indices(x))
    rec2, _, info = fs(x, return_info=True)
    assert torch.equal(info["indices"], idx) and {"usage", "perplexity", "codebook"} <= set(info)
    # a taming / diffusers-layout state dict (no usage statistics) loads into it
    bare = {k: v for k, v in fs.vq.state_dict().items() if k.split(".")[-1] not in STAT_BUFFERS}
    other = tiny_vq()
    other.load_weights(bare)
    assert torch.equal(other.codebook, fs.codebook) and int(other.quantizer.batches_seen) == 0


def test_module_rejects_a_loss_of_the_other_kind():
    opt = functools.partial(torch.optim.Adam, lr=1e-3)
    with pytest.raises(LightgenConfigError, match="VQAutoencoderLoss") as e:
        AutoencoderModule(first_stage=tiny_vq(), optimizer=opt, loss=KLAutoencoderLoss())
    assert str(e.value).count(". ") == 0
    kl = SmallKLAutoencoder(block_out_channels=(16, 32, 32), mid_block_add_attention=False)
    with pytest.raises(LightgenConfigError, match="KLAutoencoderLoss"):
        AutoencoderModule(first_stage=kl, optimizer=opt, loss=VQAutoencoderLoss())
    m = AutoencoderModule(first_stage=tiny_vq(), optimizer=opt, loss=VQAutoencoderLoss())
    assert not m.tracks_scale and "latent_moments" not in m.state_dict()


def test_vq_fashion_config_composes():
    cfg = compose(["experiment=vq_fashion"])
    assert cfg.method.loss._target_.endswith("VQAutoencoderLoss") and cfg.method.loss.disc_weight > 0
    assert cfg.first_stage.quantizer._target_.endswith("VectorQuantizer") and cfg.first_stage.quantizer.kmeans_init
    assert cfg.optim.optimizer._target_ == "torch.optim.Adam" and list(cfg.optim.optimizer.betas) == [0.5, 0.9]
    assert (cfg.data.image_size, cfg.data.channels) == (32, 1)


def test_tiny_vq_stage1_run_through_the_cli_with_the_gan(tmp_path):
    run = tmp_path / "run"
    run_cli(
        "train",
        "experiment=vq_fashion",
        "data=synthetic",
        "data.batch_size=4",
        "first_stage.block_out_channels=[32,32,32]",
        "first_stage.mid_block_add_attention=false",
        "first_stage.codebook_size=64",
        "first_stage.codebook_dim=16",
        "first_stage.z_channels=32",
        "method.loss.disc_start=0",
        "method.loss.disc_ndf=8",
        "trainer.max_steps=8",  # autoencoder + discriminator steps: 4 of each
        "trainer.log_every_n_steps=1",
        "callbacks.checkpoint.every_n_train_steps=4",
        "callbacks.progress=null",
        "logger=csv",
        f"hydra.run.dir={run}",
    )
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and len(ckpts) >= 2, ckpts
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train/loss")]
    assert len(rows) == 4  # every autoencoder step logged
    for key in ("train/codebook_usage", "train/perplexity", "train/q_loss", "train/g_loss", "train/d_loss",
                "train/d_weight"):  # fmt: skip
        assert all(r[key] for r in rows), key
    usage = [float(r["train/codebook_usage"]) for r in rows]
    assert all(0 < u <= 1 for u in usage) and float(rows[-1]["train/perplexity"]) > 1
    # the checkpoint rebuilds the run and its first stage loads as a tokenizer
    from lightgen.compose import method_from_checkpoint

    module, cfg, _ = method_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert int(module.ae_steps) == 4 and module.loss.uses_gan
    fs = VQFirstStage(checkpoint=str(run / "checkpoints" / "last.ckpt"), codebook_size=64, codebook_dim=16,
                      z_channels=32, quantizer=VectorQuantizer(64, 16), **TINY)  # fmt: skip
    assert torch.equal(fs.codebook, module.net.codebook)
    assert fs.encode_to_indices(torch.zeros(1, 1, 32, 32)).shape == (1, 8, 8)
