"""VQ first stages: the tokenizer interface, configs, and the taming-transformers VQGAN import.

The taming checkpoint is built here from taming's documented names and shapes (random tensors) and
its forward pass is written with plain torch ops on those tensors, independently of diffusers and of
``lightgen.convert.taming``, so the test checks the renaming against taming's own computation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import compose

from lightgen.convert.taming import is_taming_vqgan, taming_to_diffusers_vq
from lightgen.first_stage.vq import VQFirstStage, nearest_codes
from lightgen.utils.errors import LightgenConfigError

# taming's configs/imagenet_vqgan.yaml (the MaskGIT re-implementations' tokenizer)
TAMING_F16 = dict(
    ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), resolution=256, z_channels=256,
    embed_dim=256, n_embed=1024, in_channels=3, out_ch=3,
)  # fmt: skip
F16_KWARGS = dict(
    block_out_channels=(128, 128, 256, 256, 512), layers_per_block=2, attention_levels=(4,), z_channels=256,
    codebook_size=1024, codebook_dim=256, channels=3,
)  # fmt: skip
F16_PARAMS = 72_141_699


def one_sentence(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg.endswith(".") and msg.count(". ") == 0 and "\n" not in msg, msg
    return msg


# -- a taming VQGAN state dict from its documented layout ---------------------------------------
def taming_state_dict(cfg: dict, seed: int = 0, dtype=torch.float32, with_loss: bool = True) -> dict:
    """Names and shapes of taming's ``VQModel`` (``taming/modules/diffusionmodules/model.py``
    ``Encoder``/``Decoder``/``ResnetBlock``/``AttnBlock``/``Downsample``/``Upsample``, ``quantize.py``
    ``VectorQuantizer2``), filled with random values of a sane scale."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name, cin, cout, k):
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g, dtype=dtype) / (cin * k * k) ** 0.5
        sd[f"{name}.bias"] = 0.1 * torch.randn(cout, generator=g, dtype=dtype)

    def norm(name, c):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g, dtype=dtype)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g, dtype=dtype)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{n}", c, c, 1)

    ch, mult, nres = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"]
    levels = len(mult)
    # encoder
    conv("encoder.conv_in", cfg["in_channels"], ch, 3)
    res = cfg["resolution"]
    in_mult = (1,) + tuple(mult)
    for i in range(levels):
        cin, cout = ch * in_mult[i], ch * mult[i]
        for j in range(nres):
            resnet(f"encoder.down.{i}.block.{j}", cin, cout)
            cin = cout
            if res in cfg["attn_resolutions"]:
                attn(f"encoder.down.{i}.attn.{j}", cout)
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", cout, cout, 3)
            res //= 2
    top = ch * mult[-1]
    resnet("encoder.mid.block_1", top, top)
    attn("encoder.mid.attn_1", top)
    resnet("encoder.mid.block_2", top, top)
    norm("encoder.norm_out", top)
    conv("encoder.conv_out", top, cfg["z_channels"], 3)
    # quantisation
    conv("quant_conv", cfg["z_channels"], cfg["embed_dim"], 1)
    sd["quantize.embedding.weight"] = torch.randn(cfg["n_embed"], cfg["embed_dim"], generator=g, dtype=dtype)
    conv("post_quant_conv", cfg["embed_dim"], cfg["z_channels"], 1)
    # decoder
    conv("decoder.conv_in", cfg["z_channels"], top, 3)
    resnet("decoder.mid.block_1", top, top)
    attn("decoder.mid.attn_1", top)
    resnet("decoder.mid.block_2", top, top)
    cin = top
    for i in reversed(range(levels)):
        cout = ch * mult[i]
        for j in range(nres + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, cout)
            cin = cout
            if res in cfg["attn_resolutions"]:
                attn(f"decoder.up.{i}.attn.{j}", cout)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cout, cout, 3)
            res *= 2
    norm("decoder.norm_out", ch)
    conv("decoder.conv_out", ch, cfg["out_ch"], 3)
    if with_loss:  # the training loss lives in the same state dict (LPIPS + PatchGAN); it is ignored
        sd["loss.logvar"] = torch.zeros(())
        sd["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4, generator=g)
        sd["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1, generator=g)
    return sd


# -- taming's forward pass with plain torch ops -----------------------------------------------
def _conv(x, sd, name, stride=1, padding=None):
    w = sd[f"{name}.weight"]
    return F.conv2d(x, w, sd[f"{name}.bias"], stride=stride, padding=w.shape[-1] // 2 if padding is None else padding)


def _norm(x, sd, name):
    return F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def _resnet(x, sd, name):
    h = _conv(F.silu(_norm(x, sd, f"{name}.norm1")), sd, f"{name}.conv1")
    h = _conv(F.silu(_norm(h, sd, f"{name}.norm2")), sd, f"{name}.conv2")
    if f"{name}.nin_shortcut.weight" in sd:
        x = _conv(x, sd, f"{name}.nin_shortcut")
    return x + h


def _attn(x, sd, name):
    n, c, hh, ww = x.shape
    h = _norm(x, sd, f"{name}.norm")
    q, k, v = (_conv(h, sd, f"{name}.{p}").reshape(n, c, hh * ww) for p in ("q", "k", "v"))
    w = torch.softmax(torch.einsum("nci,ncj->nij", q, k) * c**-0.5, dim=2)  # query i attends to keys j
    out = torch.einsum("ncj,nij->nci", v, w).reshape(n, c, hh, ww)
    return x + _conv(out, sd, f"{name}.proj_out")


def _levels(sd, half):
    part = "down" if half == "encoder" else "up"
    return 1 + max(int(k.split(".")[2]) for k in sd if k.startswith(f"{half}.{part}."))


def taming_encode(sd, x):
    """``quant_conv(Encoder(x))`` and taming's nearest codes (``argmin |z|² + |e|² − 2 z·e``)."""
    h = _conv(x, sd, "encoder.conv_in")
    levels = _levels(sd, "encoder")
    for i in range(levels):
        j = 0
        while f"encoder.down.{i}.block.{j}.conv1.weight" in sd:
            h = _resnet(h, sd, f"encoder.down.{i}.block.{j}")
            if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
                h = _attn(h, sd, f"encoder.down.{i}.attn.{j}")
            j += 1
        if i != levels - 1:
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.down.{i}.downsample.conv", stride=2, padding=0)
    h = _resnet(h, sd, "encoder.mid.block_1")
    h = _attn(h, sd, "encoder.mid.attn_1")
    h = _resnet(h, sd, "encoder.mid.block_2")
    h = _conv(F.silu(_norm(h, sd, "encoder.norm_out")), sd, "encoder.conv_out")
    z = _conv(h, sd, "quant_conv")
    n, d, hh, ww = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    e = sd["quantize.embedding.weight"]
    dist = (flat**2).sum(1, keepdim=True) + (e**2).sum(1) - 2 * flat @ e.t()
    return z, dist.argmin(1).reshape(n, hh, ww)


def taming_decode(sd, indices):
    """``Decoder(post_quant_conv(codebook[indices]))`` (taming's ``decode_code``)."""
    h = sd["quantize.embedding.weight"][indices].permute(0, 3, 1, 2)
    h = _conv(_conv(h, sd, "post_quant_conv"), sd, "decoder.conv_in")
    h = _resnet(h, sd, "decoder.mid.block_1")
    h = _attn(h, sd, "decoder.mid.attn_1")
    h = _resnet(h, sd, "decoder.mid.block_2")
    for i in reversed(range(_levels(sd, "decoder"))):
        j = 0
        while f"decoder.up.{i}.block.{j}.conv1.weight" in sd:
            h = _resnet(h, sd, f"decoder.up.{i}.block.{j}")
            if f"decoder.up.{i}.attn.{j}.q.weight" in sd:
                h = _attn(h, sd, f"decoder.up.{i}.attn.{j}")
            j += 1
        if i != 0:
            h = _conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"decoder.up.{i}.upsample.conv")
    return _conv(F.silu(_norm(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")


@pytest.fixture(scope="module")
def taming_f16_double():
    return taming_state_dict(TAMING_F16, seed=0, dtype=torch.float64)


def images(n, size, channels=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, channels, size, size, generator=g, dtype=dtype) * 2 - 1).clamp(-1, 1)


# -- parameter counts and round trips ------------------------------------------------------------
def test_parameter_counts_match_the_taming_layout(taming_f16_double):
    f16 = VQFirstStage(image_size=256, **F16_KWARGS)
    assert sum(p.numel() for p in f16.parameters()) == F16_PARAMS
    taming = {k: v for k, v in taming_f16_double.items() if not k.startswith("loss.")}
    assert sum(v.numel() for v in taming.values()) == F16_PARAMS  # the same tensors, renamed
    assert sum(p.numel() for p in f16.vq.encoder.parameters()) == 29_298_176
    assert sum(p.numel() for p in f16.vq.decoder.parameters()) == 42_449_795
    small = VQFirstStage(channels=1)  # vq_small's defaults
    assert sum(p.numel() for p in small.parameters()) == 5_292_417
    assert VQFirstStage(channels=3).vq.quantize.embedding.weight.shape == (512, 64)


def test_f4_round_trip_shapes():
    torch.manual_seed(0)
    fs = VQFirstStage(channels=1, image_size=32)
    assert (fs.codebook_size, fs.codebook_dim, fs.token_size, fs.downsample) == (512, 64, 8, 4)
    assert (fs.latent_channels, fs.latent_size, fs.scale_factor) == (64, 8, 1.0)
    x = images(2, 32, channels=1)
    idx = fs.encode_to_indices(x)
    assert idx.shape == (2, 8, 8) and idx.dtype == torch.long and 0 <= int(idx.min()) <= int(idx.max()) < 512
    out = fs.decode_indices(idx)
    assert out.shape == (2, 1, 32, 32) and out.abs().max() <= 1.0
    z = fs.encode(x)  # the quantised latent: the codebook vectors of the indices
    assert z.shape == (2, 64, 8, 8) and torch.equal(z, fs.codebook[idx].permute(0, 3, 1, 2))
    assert torch.equal(fs.decode(z), out)
    assert torch.equal(fs.decode(z + 1e-4, quantize=True), out)  # snapping back to the codes
    rec, loss, ind = fs(x)  # training pass: straight-through, the quantizer's loss and indices
    assert rec.shape == x.shape and rec.requires_grad and loss.ndim == 0 and torch.equal(ind, idx)


def test_f16_round_trip_shapes_with_the_real_layout():
    torch.manual_seed(0)
    fs = VQFirstStage(image_size=64, **F16_KWARGS)
    assert (fs.codebook_size, fs.token_size, fs.downsample) == (1024, 4, 16)
    idx = fs.encode_to_indices(images(1, 64))
    assert idx.shape == (1, 4, 4) and idx.dtype == torch.long
    assert fs.decode_indices(idx).shape == (1, 3, 64, 64)


# -- the taming import ----------------------------------------------------------------------------
def test_taming_checkpoint_loads_strictly_and_matches_tamings_computation(tmp_path, taming_f16_double):
    sd = taming_f16_double
    assert is_taming_vqgan(sd)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": sd, "global_step": 1, "epoch": 0}, path)  # taming's Lightning file shape
    fs = VQFirstStage(image_size=32, requires_checkpoint=True, **F16_KWARGS).double()  # float64 before loading
    fs.load_weights(path)
    assert fs.has_weights and all(torch.equal(p, sd[k]) for k, p in {"quantize.embedding.weight": fs.codebook}.items())
    converted = taming_to_diffusers_vq(sd)
    assert len(converted) == len([k for k in sd if not k.startswith("loss.")]) == len(fs.vq.state_dict())

    # every weight lands where taming's forward uses it: conv_in, the first resnet, the first attention
    x = images(2, 32, dtype=torch.float64)
    enc = fs.vq.encoder
    h = enc.conv_in(x)
    assert torch.allclose(h, _conv(x, sd, "encoder.conv_in"), atol=1e-12)
    r = enc.down_blocks[0].resnets[0](h, None)
    assert torch.allclose(r, _resnet(h, sd, "encoder.down.0.block.0"), atol=1e-10)
    y = torch.randn(2, 512, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = enc.down_blocks[4].attentions[0](y)
    assert torch.allclose(a, _attn(y, sd, "encoder.down.4.attn.0"), atol=1e-10)
    s = y[:, :128].repeat(1, 1, 2, 2)  # a resnet with a 1x1 shortcut (128 -> 256)
    assert torch.allclose(enc.down_blocks[2].resnets[0](s, None), _resnet(s, sd, "encoder.down.2.block.0"), atol=1e-10)
    dec = fs.vq.decoder  # the decoder's levels run in reverse: up_blocks.0 is taming's up.4 (16² at 256²)
    assert torch.allclose(dec.up_blocks[0].attentions[2](y), _attn(y, sd, "decoder.up.4.attn.2"), atol=1e-10)
    assert torch.allclose(dec.up_blocks[3].resnets[0](s[:, :].repeat(1, 2, 1, 1), None),
                          _resnet(s.repeat(1, 2, 1, 1), sd, "decoder.up.1.block.0"), atol=1e-10)  # fmt: skip

    # the whole tokenizer: pre-quantisation latent, indices (= nearest codes by hand), decoded images
    z_ref, idx_ref = taming_encode(sd, x)
    z = fs.encode_continuous(x)
    assert torch.allclose(z, z_ref, atol=1e-9, rtol=1e-9)
    by_hand = ((z.permute(0, 2, 3, 1)[..., None, :] - fs.codebook) ** 2).sum(-1).argmin(-1)
    idx = fs.encode_to_indices(x)
    assert idx.shape == (2, 2, 2) and torch.equal(idx, idx_ref) and torch.equal(idx, by_hand)
    dec_ref = taming_decode(sd, idx_ref)
    assert torch.allclose(fs.decode_indices(idx), dec_ref.clamp(-1, 1), atol=1e-9, rtol=1e-9)


def test_nearest_codes_is_the_argmin_of_squared_distances():
    g = torch.Generator().manual_seed(0)
    z, e = torch.randn(3, 8, 4, 5, generator=g), torch.randn(32, 8, generator=g)
    by_hand = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 8).double(), e.double()).argmin(1).reshape(3, 4, 5)
    assert torch.equal(nearest_codes(z.double(), e.double()), by_hand)


def test_other_layouts_load_and_mismatches_name_both_architectures(tmp_path):
    torch.manual_seed(0)
    fs = VQFirstStage(channels=1)
    torch.save(fs.state_dict(), tmp_path / "lightgen.pt")  # keys vq.*
    torch.save({"state_dict": {f"net.{k}": v for k, v in fs.state_dict().items()}}, tmp_path / "run.ckpt")
    torch.save(fs.vq.state_dict(), tmp_path / "diffusers.pt")
    x = images(1, 32, channels=1)
    ref = fs.encode_to_indices(x)
    for name in ("lightgen.pt", "run.ckpt", "diffusers.pt"):
        other = VQFirstStage(channels=1, checkpoint=str(tmp_path / name))
        assert other.has_weights and torch.equal(other.encode_to_indices(x), ref)
    small_taming = dict(TAMING_F16, ch=32, ch_mult=(1, 2), attn_resolutions=(), n_embed=16, embed_dim=8)
    with pytest.raises(LightgenConfigError) as e:
        VQFirstStage(channels=3).load_weights(taming_state_dict(small_taming))
    msg = one_sentence(e)
    assert "16 x 8 codebook" in msg and "512 x 64 codebook" in msg


# -- bad input: one sentence each, before any work -------------------------------------------
@pytest.mark.parametrize(
    "state, words",
    [
        ({"x_embedder.proj.weight": torch.zeros(1), "blocks.0.mlp.fc1.weight": torch.zeros(1)}, "a DiT checkpoint"),
        (
            {
                "encoder.conv_in.weight": torch.zeros(1),
                "decoder.conv_out.weight": torch.zeros(1),
                "quant_conv.weight": torch.zeros(1),
            },
            "a KL autoencoder",
        ),  # fmt: skip
        ({"model.layer.weight": torch.zeros(1), "model.head.weight": torch.zeros(1)}, "2 tensors with keys starting"),
    ],
)
def test_a_checkpoint_that_is_not_a_vq_model_fails_with_one_sentence(tmp_path, state, words):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(LightgenConfigError) as e:
        VQFirstStage(channels=1, checkpoint=str(path))
    msg = one_sentence(e)
    assert words in msg and str(path) in msg


def test_bad_indices_images_and_sizes_fail_with_one_sentence(tmp_path):
    torch.manual_seed(0)
    fs = VQFirstStage(channels=1)
    for bad in (torch.tensor([[[512]]]), torch.full((1, 8, 8), -1)):
        with pytest.raises(LightgenConfigError) as e:
            fs.decode_indices(bad)
        assert "[0, 512)" in one_sentence(e)
    with pytest.raises(LightgenConfigError) as e:
        fs.decode_indices(torch.zeros(1, 8, 8))
    assert "integer" in one_sentence(e)
    with pytest.raises(LightgenConfigError) as e:
        fs.encode_to_indices(images(1, 30, channels=1))
    assert "multiple of 4" in one_sentence(e)
    with pytest.raises(LightgenConfigError) as e:
        fs.encode_to_indices(images(1, 32, channels=3))
    one_sentence(e)
    for build in (
        lambda: VQFirstStage(image_size=30),
        lambda: VQFirstStage(image_size=32, token_size=16),
        lambda: VQFirstStage(attention_levels=(3,)),
        lambda: VQFirstStage(image_size=64, checkpoint=str(tmp_path / "missing.ckpt")),
    ):
        with pytest.raises(LightgenConfigError) as e:
            build()
        one_sentence(e)


def test_pretrained_tokenizer_without_weights_asks_for_the_checkpoint():
    fs = VQFirstStage(image_size=32, requires_checkpoint=True, name="vqgan_f16_1024", **F16_KWARGS)
    for call in (lambda: fs.encode_to_indices(images(1, 32)), lambda: fs.decode_indices(torch.zeros(1, 2, 2).long())):
        with pytest.raises(LightgenConfigError) as e:
            call()
        assert "first_stage.checkpoint=" in one_sentence(e)


# -- configs ----------------------------------------------------------------------------------------
def test_configs_compose_and_instantiate(tmp_path):
    from hydra.utils import instantiate

    small = instantiate(compose(["first_stage=vq_small"]).first_stage)
    assert isinstance(small, VQFirstStage) and (small.token_size, small.codebook_size, small.channels) == (8, 512, 1)
    assert small.encode_to_indices(images(1, 32, channels=1)).shape == (1, 8, 8)

    cfg = compose(["first_stage=vqgan_f16_1024", "data.image_size=256"]).first_stage
    assert cfg.checkpoint is None and cfg.requires_checkpoint and cfg.latent_size == 16
    f16 = instantiate(cfg)
    assert (f16.token_size, f16.codebook_size, f16.codebook_dim, f16.downsample) == (16, 1024, 256, 16)
    assert sum(p.numel() for p in f16.parameters()) == F16_PARAMS
    with pytest.raises(LightgenConfigError, match="first_stage.checkpoint"):
        f16.encode_to_indices(images(1, 256))

    # first_stage.checkpoint=<taming file> loads it; its weights stay out of the enclosing checkpoints
    sd = taming_state_dict(TAMING_F16, seed=3)
    torch.save({"state_dict": sd}, tmp_path / "taming.ckpt")
    cfg = compose(
        [
            "first_stage=vqgan_f16_1024",
            "data.image_size=32",
            "first_stage.token_size=2",
            f"first_stage.checkpoint={tmp_path}/taming.ckpt",
        ]
    )
    loaded = instantiate(cfg.first_stage)
    assert loaded.has_weights and torch.equal(loaded.codebook, sd["quantize.embedding.weight"])
    outer = torch.nn.ModuleDict({"first_stage": loaded})
    assert not any(k.startswith("first_stage.vq.") for k in outer.state_dict())
    outer.load_state_dict(outer.state_dict(), strict=True)


def test_a_replacement_quantizer_plugs_into_the_seam():
    class Nearest(torch.nn.Module):  # any module with `embedding` and forward(z) -> (z_q, loss, info)
        def __init__(self, k, d):
            super().__init__()
            self.embedding = torch.nn.Embedding(k, d)

        def forward(self, z):
            idx = nearest_codes(z, self.embedding.weight)
            z_q = self.embedding(idx).permute(0, 3, 1, 2)
            return z + (z_q - z).detach(), (z_q - z.detach()).square().mean(), (None, None, idx.reshape(-1))

    torch.manual_seed(0)
    fs = VQFirstStage(channels=1, block_out_channels=(32, 32, 32), layers_per_block=1, quantizer=Nearest(512, 64))
    assert "vq.quantize.embedding.weight" in fs.state_dict() and fs.quantizer is fs.vq.quantize
    x = images(2, 32, channels=1)
    rec, loss, idx = fs(x)
    assert rec.shape == x.shape and torch.equal(idx, fs.encode_to_indices(x))
    with pytest.raises(LightgenConfigError) as e:
        VQFirstStage(channels=1, quantizer=Nearest(16, 64))
    assert "512 x 64" in one_sentence(e)
