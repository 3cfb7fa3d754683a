"""DiffiT networks: TMSA, the latent model (released NVlabs/DiffiT layout) and the U-shaped image model.

Reference: NVlabs/DiffiT ``diffit/diffit.py`` (release 9f6f0a57) for the latent model (names, init,
parameter count), the paper (Eqs. 3-10) for TMSA and the DiffiT ResBlock.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import compose, run_cli
from hydra.utils import instantiate

from lightgen.nets.diffit import (
    DIFFIT_CONFIGS,
    TMSA,
    DiffiT,
    DiffiTUNet,
    relative_position_index,
    window_partition,
    window_reverse,
)
from lightgen.nets.dit import DiT

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
TINY_UNET = dict(
    input_size=32, in_channels=1, num_classes=10, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
    num_heads=2, norm_groups=4,
)  # fmt: skip


def _perturb(net: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Add noise to every trainable parameter (so zero-initialised layers produce a real output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return net.eval()


def _inputs(net, n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, net.in_channels, net.input_size, net.input_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g).float()
    y = torch.randint(0, net.num_classes, (n,), generator=g)
    return x, t, y


# ---------------------------------------------------------------------------------------------
# (1) parameter counts and names of the released latent model
# ---------------------------------------------------------------------------------------------
def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_param_count_released_xl2_depth28():
    with torch.device("meta"):
        net = DiffiT(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16)
    assert _count(net) == 561_330_144
    with torch.device("meta"):
        assert _count(DiffiT()) == 601_201_664  # the class default depth 30


@pytest.mark.parametrize("size", list(DIFFIT_CONFIGS))
def test_param_count_is_dit_minus_adaln_plus_tmsa(size):
    """DiffiT = DiT without adaLN (6D^2+6D per block, 2D^2+2D in the head) plus the time projection
    of q, k, v (3D^2+3D) and a (2W-1)^2 x heads bias table per block (reference notes, section 7)."""
    cfg = DIFFIT_CONFIGS[size]
    d, depth, heads, w = cfg["hidden_size"], cfg["depth"], cfg["num_heads"], 16
    with torch.device("meta"):
        dit = _count(DiT(patch_size=2, **cfg))
        diffit = _count(DiffiT(patch_size=2, **cfg))
        ablation = _count(DiffiT(patch_size=2, time_in_attention=False, **cfg))
    expected = dit - depth * (6 * d * d + 6 * d) - (2 * d * d + 2 * d) + depth * (3 * d * d + 3 * d)
    expected += depth * (2 * w - 1) ** 2 * heads
    assert diffit == expected
    assert diffit - ablation == depth * (3 * d * d + 3 * d)


def test_released_parameter_names():
    net = DiffiT(**TINY)
    keys = set(net.state_dict())
    top = {k for k in keys if not k.startswith("blocks.")}
    assert top == {
        "pos_embed",
        "x_embedder.proj.weight",
        "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight",
        "final_layer.linear.bias",
    }
    block = {k.removeprefix("blocks.0.") for k in keys if k.startswith("blocks.0.")}
    assert block == {
        "attn.qkv_temb.weight",
        "attn.qkv_temb.bias",
        "attn.relative_position_bias_table",
        "attn.relative_position_index",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    }
    assert not any("adaLN" in k for k in keys)
    grid = TINY["input_size"] // TINY["patch_size"]
    assert net.blocks[0].attn.relative_position_bias_table.shape == ((2 * grid - 1) ** 2, TINY["num_heads"])
    assert net.final_layer.linear.out_features == TINY["patch_size"] ** 2 * 2 * TINY["in_channels"]


# ---------------------------------------------------------------------------------------------
# (2) initialisation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["latent", "unet"])
def test_zero_output_at_init(kind):
    torch.manual_seed(0)
    net = DiffiT(**TINY) if kind == "latent" else DiffiTUNet(**TINY_UNET)
    x, t, y = _inputs(net)
    out = net(x, t, y)
    assert out.shape == (4, 2 * net.in_channels, net.input_size, net.input_size)
    assert torch.count_nonzero(out) == 0


def test_released_initialisation():
    torch.manual_seed(0)
    net = DiffiT(**{**TINY, "hidden_size": 128, "depth": 4})
    blk = net.blocks[0]
    # blocks are not identity at init (no zero-init inside the blocks, unlike DiT's adaLN-Zero)
    for lin in (blk.attn.qkv, blk.attn.qkv_temb, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
        bound = math.sqrt(6.0 / (lin.in_features + lin.out_features))  # xavier-uniform
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
        assert torch.count_nonzero(lin.bias) == 0
    table = torch.cat([b.attn.relative_position_bias_table.flatten() for b in net.blocks])
    assert 0.015 < table.std() < 0.025 and table.abs().max() < 0.2
    assert 0.015 < net.y_embedder.embedding_table.weight.std() < 0.025
    assert not net.pos_embed.requires_grad and torch.count_nonzero(net.pos_embed) > 0
    assert torch.count_nonzero(net.final_layer.linear.weight) == 0


def test_relative_position_index_layout():
    w = 3
    idx = relative_position_index(w)
    assert idx.shape == (9, 9) and idx.dtype == torch.int64
    for i in range(9):
        for j in range(9):
            dh, dw = i // w - j // w, i % w - j % w
            assert idx[i, j] == (dh + w - 1) * (2 * w - 1) + (dw + w - 1)
    assert idx.min() == 0 and idx.max() == (2 * w - 1) ** 2 - 1


# ---------------------------------------------------------------------------------------------
# (3) TMSA
# ---------------------------------------------------------------------------------------------
def _reference_attention(attn: TMSA, x: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """Paper identity: q, k, v of TMSA are one linear projection of [x_s, x_t] (each spatial token
    concatenated with the time token) by the stacked weights [W_s; W_t]; then softmax(QK^T/sqrt(d) + B)V."""
    b, n, c = x.shape
    h, d, w = attn.num_heads, c // attn.num_heads, attn.window_size
    z = torch.cat([x, xt.unsqueeze(1).expand(b, n, xt.shape[-1])], dim=-1)  # (B, N, C + D_t)
    weight = torch.cat([attn.qkv.weight, attn.qkv_temb.weight], dim=1)  # (3C, C + D_t)
    qkv = z @ weight.T + attn.qkv.bias + attn.qkv_temb.bias
    q, k, v = (qkv[..., i * c : (i + 1) * c].reshape(b, n, h, d).transpose(1, 2) for i in range(3))
    # B from the table, indexed by the token offsets (computed here independently of the module)
    bias = torch.empty(h, n, n)
    for i in range(n):
        for j in range(n):
            dh, dw = i // w - j // w, i % w - j % w
            bias[:, i, j] = attn.relative_position_bias_table[(dh + w - 1) * (2 * w - 1) + (dw + w - 1)]
    logits = q @ k.transpose(-2, -1) / math.sqrt(d) + bias
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    return attn.proj(out)


@pytest.mark.parametrize("temb_dim", [32, 24])
def test_tmsa_is_attention_over_tokens_concatenated_with_the_time_token(temb_dim):
    torch.manual_seed(0)
    attn = _perturb(TMSA(32, 4, window_size=4, temb_dim=temb_dim), scale=0.3)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(0, 1.0)  # a bias large enough to matter
    x, xt = torch.randn(2, 16, 32), torch.randn(2, temb_dim)
    with torch.no_grad():
        out, ref = attn(x, xt), _reference_attention(attn, x, xt)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the bias and the time term both matter (the identity is not trivially satisfied)
    with torch.no_grad():
        plain = TMSA(32, 4, window_size=4, temb_dim=temb_dim)
        plain.load_state_dict(attn.state_dict())
        plain.relative_position_bias_table.zero_()
        assert (plain(x, xt) - out).abs().max() > 1e-3
        assert (attn(x, xt + 1.0) - out).abs().max() > 1e-3


def test_tmsa_depends_on_time_only_through_the_time_weights():
    torch.manual_seed(0)
    attn = _perturb(TMSA(32, 4, window_size=4, temb_dim=32), scale=0.3)
    x, t1, t2 = torch.randn(2, 16, 32), torch.randn(2, 32), torch.randn(2, 32)
    with torch.no_grad():
        assert (attn(x, t1) - attn(x, t2)).abs().max() > 1e-3
        attn.qkv_temb.weight.zero_()
        attn.qkv_temb.bias.zero_()
        torch.testing.assert_close(attn(x, t1), attn(x, t2), atol=0, rtol=0)
    assert not TMSA(32, 4, window_size=4, temb_dim=None).time_in_attention
    with pytest.raises(ValueError, match="4x4 grid"):
        attn(torch.randn(2, 9, 32), t1)


def test_latent_output_changes_with_t_and_not_when_time_weights_are_zero():
    torch.manual_seed(0)
    net = _perturb(DiffiT(**TINY))
    x, _, y = _inputs(net)
    t_a, t_b = torch.full((4,), 10.0), torch.full((4,), 900.0)
    with torch.no_grad():
        assert (net(x, t_a, y) - net(x, t_b, y)).abs().max() > 1e-3
        for blk in net.blocks:  # the time token enters nowhere else (the head is unconditioned)
            blk.attn.qkv_temb.weight.zero_()
            blk.attn.qkv_temb.bias.zero_()
        torch.testing.assert_close(net(x, t_a, y), net(x, t_b, y), atol=0, rtol=0)


def test_ablation_without_time_in_attention_adds_the_time_token_once():
    torch.manual_seed(0)
    net = _perturb(DiffiT(**TINY, time_in_attention=False))
    assert all(blk.attn.qkv_temb is None for blk in net.blocks)
    x, _, y = _inputs(net)
    with torch.no_grad():
        out_a, out_b = net(x, torch.full((4,), 10.0), y), net(x, torch.full((4,), 900.0), y)
        assert (out_a - out_b).abs().max() > 1e-3  # time still enters (added to the tokens)
        # exactly: blocks see x_embed + pos_embed + c, and nothing else depends on t
        c = net.t_embedder(torch.full((4,), 10.0)) + net.y_embedder(y, False)
        h = net.x_embedder(x) + net.pos_embed + c.unsqueeze(1)
        for blk in net.blocks:
            h = blk(h, None)
        torch.testing.assert_close(net.unpatchify(net.final_layer(h)), out_a)


# ---------------------------------------------------------------------------------------------
# (4) the U-shaped image-space model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "channels", "learn_sigma", "extra"),
    [
        (32, 1, True, {}),  # global attention at every resolution
        (32, 1, False, {"window_size": 8}),
        (64, 3, True, {"window_size": 8, "channel_mult": (1, 2, 2), "num_res_blocks": (1, 1, 2)}),
    ],
)
def test_unet_output_shape_equals_input_shape(size, channels, learn_sigma, extra):
    torch.manual_seed(0)
    kw = {**TINY_UNET, "input_size": size, "in_channels": channels, "learn_sigma": learn_sigma, **extra}
    net = _perturb(DiffiTUNet(**kw))
    x, t, y = _inputs(net, n=2)
    with torch.no_grad():
        out = net(x, t, y)
    assert out.shape == (2, channels * (2 if learn_sigma else 1), size, size)
    assert net.out_channels == out.shape[1] and torch.isfinite(out).all()
    # it is a function of the time step and of the class (null class = num_classes)
    with torch.no_grad():
        assert (net(x, t + 300, y) - out).abs().max() > 1e-4
        assert (net(x, t, torch.full_like(y, net.num_classes)) - out).abs().max() > 1e-4


def test_unet_layout():
    net = DiffiTUNet(**{**TINY_UNET, "channel_mult": (1, 2, 2), "window_size": 8, "num_res_blocks": 2})
    assert net.resolutions == [32, 16, 8] and net.windows == [8, 8, 8] and net.channels == [16, 32, 32]
    assert [len(s) for s in net.down_blocks] == [2, 2, 2] and [len(s) for s in net.up_blocks] == [2, 2]
    assert len(net.skip_projs) == 2 and net.skip_projs[0].in_channels == 32
    assert net.down_blocks[0][0].block.attn.relative_position_bias_table.shape == (15 * 15, 2)
    assert "down_blocks.0.0.block.attn.relative_position_index" not in net.state_dict()  # not persistent
    res = net.down_blocks[1][0]
    assert isinstance(res.norm, torch.nn.GroupNorm) and res.conv.kernel_size == (3, 3) and res.time_proj is None
    ablation = DiffiTUNet(**{**TINY_UNET, "time_in_attention": False})
    assert ablation.down_blocks[0][0].time_proj is not None
    assert ablation.down_blocks[0][0].block.attn.qkv_temb is None


def test_unet_ablation_depends_on_time_through_the_additive_projection_only():
    torch.manual_seed(0)
    net = _perturb(DiffiTUNet(**{**TINY_UNET, "time_in_attention": False}))
    x, _, y = _inputs(net, n=2)
    t_a, t_b = torch.full((2,), 10.0), torch.full((2,), 900.0)
    with torch.no_grad():
        assert (net(x, t_a, y) - net(x, t_b, y)).abs().max() > 1e-4
        for m in net.modules():
            if getattr(m, "time_proj", None) is not None:
                m.time_proj.weight.zero_()
                m.time_proj.bias.zero_()
        torch.testing.assert_close(net(x, t_a, y), net(x, t_b, y), atol=0, rtol=0)


def test_window_partition_round_trip_and_order():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    tokens = window_partition(x, 4)
    assert tokens.shape == (2 * 4, 16, 3)
    # second window of the first sample = rows 0..3, columns 4..7, row by row
    torch.testing.assert_close(tokens[1, :, 0], x[0, 0, :4, 4:].reshape(-1))
    torch.testing.assert_close(tokens[4, :, 2], x[1, 2, :4, :4].reshape(-1))
    torch.testing.assert_close(window_reverse(tokens, 2, 8, 8), x)


def test_windowed_attention_is_local():
    """With 8x8 windows, a change of the input inside one window cannot reach the attention output
    of another window (checked on one ResBlock's transformer part: conv output -> block)."""
    torch.manual_seed(0)
    net = _perturb(DiffiTUNet(**{**TINY_UNET, "window_size": 8}))
    res = net.down_blocks[0][0]
    h = torch.randn(1, 16, 32, 32)
    c = torch.randn(1, net.time_embed_dim)

    def transformer(h):
        tokens = window_partition(h, 8)
        return window_reverse(res.block(tokens, c.repeat_interleave(tokens.shape[0], 0)), 1, 32, 32)

    h2 = h.clone()
    h2[..., 0, 0] += 5.0  # top-left window
    with torch.no_grad():
        diff = (transformer(h2) - transformer(h)).abs().amax(dim=1)[0]
    assert diff[:8, :8].max() > 1e-3 and diff[8:, :].max() == 0 and diff[:, 8:].max() == 0


# ---------------------------------------------------------------------------------------------
# (6) bad configurations fail with one sentence
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "kwargs", "phrase"),
    [
        (DiffiT, {"patch_size": 3}, "does not divide the input size"),
        (DiffiT, {"num_heads": 5}, "not divisible by num_heads=5"),
        (DiffiT, {"hidden_size": 66, "num_heads": 2}, "divisible by 4"),
        (DiffiT, {"depth": 0}, "depth=0 must be a positive integer"),
        (DiffiT, {"class_dropout_prob": 1.0}, "must be in [0, 1)"),
        (DiffiT, {"mlp_ratio": -1}, "mlp_ratio=-1 must be positive"),
        (DiffiTUNet, {"channel_mult": (1, 2, 2, 2, 2, 2, 2)}, "cannot be halved 6 times"),
        (DiffiTUNet, {"num_heads": 3}, "not divisible by num_heads=3"),
        (DiffiTUNet, {"norm_groups": 5}, "not divisible by norm_groups=5"),
        (DiffiTUNet, {"window_size": 12}, "window_size=12 does not divide the 32x32 feature map"),
        (DiffiTUNet, {"num_res_blocks": (1, 2, 3)}, "num_res_blocks has 3 entries"),
        (DiffiTUNet, {"channel_mult": []}, "must be a non-empty list"),
        (DiffiTUNet, {"base_channels": 0}, "base_channels=0 must be a positive integer"),
    ],
)
def test_bad_construction(cls, kwargs, phrase):
    base = TINY if cls is DiffiT else TINY_UNET
    with pytest.raises(ValueError) as err:
        cls(**{**base, **kwargs})
    assert phrase in str(err.value)
    assert "\n" not in str(err.value)  # one line for the start-up error


@pytest.mark.parametrize("kind", ["latent", "unet"])
def test_bad_input_shapes(kind):
    net = DiffiT(**TINY) if kind == "latent" else DiffiTUNet(**TINY_UNET)
    x, t, y = _inputs(net, n=2)
    with pytest.raises(ValueError, match="expected input of shape"):
        net(x[:, :, :-2], t, y)
    with pytest.raises(ValueError, match="timesteps must have shape"):
        net(x, t[:1], y)
    with pytest.raises(ValueError, match="class labels must have shape"):
        net(x, t, y[:1])


# ---------------------------------------------------------------------------------------------
# (7) configs
# ---------------------------------------------------------------------------------------------
def test_diffit_xl_composes_with_ddp8_and_is_the_released_model():
    cfg = compose(["model=diffit_xl", "trainer=ddp8", "first_stage=sd_vae_ft_ema", "data=latents", "data.path=x"])
    assert cfg.trainer.devices == 8
    assert (cfg.model.input_size, cfg.model.in_channels, cfg.model.depth) == (32, 4, 28)
    with torch.device("meta"):
        net = instantiate(cfg.model, num_classes=1000)
    assert isinstance(net, DiffiT) and _count(net) == 561_330_144


@pytest.mark.parametrize(("name", "size"), [("s", "S"), ("b", "B"), ("l", "L"), ("xl", "XL")])
def test_model_configs_have_the_sizes(name, size):
    cfg = compose([f"model=diffit_{name}"])
    for k, v in DIFFIT_CONFIGS[size].items():
        assert cfg.model[k] == v
    assert cfg.model.patch_size == 2 and cfg.model.time_in_attention is True


def test_experiment_diffit_xl2_imagenet256_composes():
    cfg = compose(["experiment=diffit_xl2_imagenet256", "data.path=/data/latents"])
    assert cfg.model._target_ == "lightgen.nets.diffit.DiffiT"
    assert (cfg.model.input_size, cfg.model.in_channels, cfg.model.num_classes) == (32, 4, 1000)
    assert cfg.model.depth == 28 and cfg.model.learn_sigma is True and cfg.trainer.devices == 8
    s = cfg.method.sampling
    assert (s.cfg_schedule, s.cfg_scale, s.scale_pow, s.steps) == ("power_cosine", 4.4, 4.0, 250)


@pytest.mark.parametrize("flag", [True, False])
def test_quickstart_and_ablation_experiments_compose_and_build(flag):
    quick = compose(["experiment=quickstart_diffit", f"model.time_in_attention={flag}"])
    net = instantiate(quick.model)
    assert isinstance(net, DiffiTUNet) and net.in_channels == 1 and net.input_size == 32
    assert net.out_channels == 2 and net.num_classes == 10 and net.time_in_attention is flag
    abl = compose(["experiment=diffit_tmsa_ablation", f"model.time_in_attention={flag}"])
    net = instantiate(abl.model)
    assert isinstance(net, DiffiT) and net.time_in_attention is flag
    assert (net.input_size, net.patch_size, net.hidden_size, net.depth) == (32, 4, 192, 6)
    dit_quick = compose(["experiment=quickstart"])
    assert abl.data.batch_size == dit_quick.data.batch_size and abl.trainer.max_steps == dit_quick.trainer.max_steps


def test_unet_config_defaults_build():
    cfg = compose(["model=diffit_unet"])
    net = instantiate(cfg.model)
    assert isinstance(net, DiffiTUNet) and net.resolutions == [32, 16, 8, 4] and net.channels == [128, 256, 256, 256]


# ---------------------------------------------------------------------------------------------
# (8) end to end through the CLI
# ---------------------------------------------------------------------------------------------
def _check_run(run, key: str):
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert (run / "samples" / "step_0000003.png").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert f"net.{key}" in ckpt["state_dict"] and f"ema.{key}" in ckpt["state_dict"]
    return ckpt


TINY_RUN = [
    "data.batch_size=8",
    "trainer.max_steps=3",
    "trainer.log_every_n_steps=1",
    "callbacks.sample_grid.samples_per_class=1",
    "method.sampling.steps=2",
]


@pytest.mark.slow
def test_latent_diffit_trains_on_pixels_through_the_cli(fake_fashion_mnist, tmp_path):
    run = tmp_path / "run"
    run_cli(
        "train",
        "model=diffit_s",
        "data=fashion_mnist",
        f"data.root={fake_fashion_mnist}",
        "model.patch_size=8",
        "model.hidden_size=32",
        "model.depth=2",
        "model.num_heads=2",
        "method.sampling.cfg_schedule=power_cosine",
        *TINY_RUN,
        f"hydra.run.dir={run}",
    )
    ckpt = _check_run(run, "blocks.0.attn.qkv_temb.weight")
    assert ckpt["lightgen"]["config"]["model"]["_target_"] == "lightgen.nets.diffit.DiffiT"


@pytest.mark.slow
def test_quickstart_diffit_trains_through_the_cli(fake_fashion_mnist, tmp_path):
    run = tmp_path / "run"
    run_cli(
        "train",
        "experiment=quickstart_diffit",
        f"data.root={fake_fashion_mnist}",
        "model.base_channels=8",
        "model.channel_mult=[1,2]",
        "model.norm_groups=4",
        "model.time_in_attention=false",
        *TINY_RUN,
        f"hydra.run.dir={run}",
    )
    ckpt = _check_run(run, "down_blocks.0.0.time_proj.weight")
    assert ckpt["lightgen"]["config"]["model"]["_target_"] == "lightgen.nets.diffit.DiffiTUNet"


@pytest.mark.slow
def test_bad_window_size_fails_at_startup(fake_fashion_mnist, tmp_path):
    run = tmp_path / "run"
    args = ["experiment=quickstart_diffit", f"data.root={fake_fashion_mnist}", "model.window_size=12"]
    proc = run_cli("train", *args, f"hydra.run.dir={run}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "window_size=12 does not divide the 32x32 feature map" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run / "checkpoints").exists()
