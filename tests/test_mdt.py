"""MDT / MDTv2 network, token masking, the masked training pass and the MDT configs.

Reference: sail-sg/MDT ``masked_diffusion/models.py`` (``main`` = MDTv2, ``mdtv1`` branch = MDT v1)
and ``train_util.py:TrainLoop.forward_backward``. The reference functions below re-derive the
official forward pass step by step (repeat + gather for the masked bias, the official block order)
with plain torch ops on the state_dict tensors (official names), never through lightgen's modules, so a
wiring mistake in lightgen's implementation, shared layers included, shows up as a mismatch.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose, run_cli
from hydra.utils import instantiate

from lightgen.diffusion import GaussianDiffusionProcess
from lightgen.first_stage import IdentityFirstStage
from lightgen.masking import TokenMask, TokenMasking
from lightgen.methods import DiffusionModule
from lightgen.nets.dit import DiT
from lightgen.nets.layers import get_2d_sincos_pos_embed
from lightgen.nets.mdt import MDT, MDT_CONFIGS, RelativePositionBias

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=6, num_heads=4, num_classes=10)


def _tiny(version="v2", seed=0, perturb=True, **overrides) -> MDT:
    """A tiny MDT; its zero-initialised layers are perturbed so that every path matters."""
    torch.manual_seed(seed)
    net = MDT(**{**TINY, "version": version, "decode_layer": 2, "mask_ratio": 0.3, **overrides})
    if perturb:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def _inputs(n=4, seed=1, net: MDT | None = None):
    g = torch.Generator().manual_seed(seed)
    c = net.in_channels if net is not None else TINY["in_channels"]
    s = net.input_size if net is not None else TINY["input_size"]
    x = torch.randn(n, c, s, s, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g).float()
    y = torch.randint(0, TINY["num_classes"], (n,), generator=g)
    return x, t, y


# ---------------------------------------------------------------------------------------------
# Re-derivation of the official forward pass (the reference the net is compared with)
# ---------------------------------------------------------------------------------------------
# Everything below is computed with plain torch ops from the state_dict tensors under their official
# names (sail-sg/MDT models.py); nothing calls into lightgen's modules, so a mistake in a shared
# piece (patch embedding, timestep features, label table, final layer, unpatchify, relative-bias
# index) shows up as a mismatch instead of being reproduced by the reference.
def _ref_linear(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _ref_ln(x):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)  # elementwise_affine=False


def _ref_timestep_features(t, dim=256, max_period=10000.0):
    """GLIDE's sinusoidal features, cos half first: cos(t * f_i), sin(t * f_i), f_i = P^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(max_period) / half))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


def _ref_rel_index(side):
    """BEiT's relative position index of a side x side grid, token pairs enumerated row-major."""
    pos = [(i, j) for i in range(side) for j in range(side)]
    idx = [[(a[0] - b[0] + side - 1) * (2 * side - 1) + (a[1] - b[1] + side - 1) for b in pos] for a in pos]
    return torch.tensor(idx)


def _ref_attention(sd, name, x, num_heads, side, ids_keep=None):
    b, n, c = x.shape
    h, d = num_heads, c // num_heads
    q, k, v = _ref_linear(sd, f"{name}.qkv", x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * d**-0.5
    table = sd[f"{name}.rel_pos_bias.relative_position_bias_table"]  # (rows, heads)
    idx = _ref_rel_index(side)
    t = side * side
    bias = table[idx.reshape(-1)].reshape(t, t, h).permute(2, 0, 1)  # (heads, T, T)
    if ids_keep is not None:  # official get_masked_rel_bias: repeat per sample, gather rows then columns
        bias = bias.unsqueeze(0).repeat(b, 1, 1, 1)
        kk = ids_keep.shape[1]
        bias = torch.gather(bias, 2, ids_keep[:, None, :, None].repeat(1, h, 1, t))
        bias = torch.gather(bias, 3, ids_keep[:, None, None, :].repeat(1, h, kk, 1))
    probs = (logits + bias).softmax(dim=-1)
    return _ref_linear(sd, f"{name}.proj", (probs @ v).transpose(1, 2).reshape(b, n, c))


def _ref_block(sd, name, x, c, num_heads, side, skip=None, ids_keep=None):
    if skip is not None:
        x = _ref_linear(sd, f"{name}.skip_linear", torch.cat([x, skip], dim=-1))
    s1, sc1, g1, s2, sc2, g2 = _ref_linear(sd, f"{name}.adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
    h = _ref_ln(x) * (1 + sc1[:, None]) + s1[:, None]
    x = x + g1[:, None] * _ref_attention(sd, f"{name}.attn", h, num_heads, side, ids_keep)
    h = _ref_ln(x) * (1 + sc2[:, None]) + s2[:, None]
    h = _ref_linear(sd, f"{name}.mlp.fc2", F.gelu(_ref_linear(sd, f"{name}.mlp.fc1", h), approximate="tanh"))
    return x + g2[:, None] * h


def _ref_random_masking(n, length, ratio):
    """The official ``random_masking`` on the global RNG (ratio a float or a 1-element tensor)."""
    len_keep = int(length * (1 - ratio))
    noise = torch.rand(n, length)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, length)
    mask[:, :len_keep] = 0
    return ids_shuffle[:, :len_keep], ids_restore, torch.gather(mask, 1, ids_restore)


def _ref_forward(sd, x, t, y, *, version, num_heads, decode_layer, masked=None):
    """Official MDT / MDTv2 ``forward`` (eval mode) from a state_dict, with the given (ids_keep, ids_restore, mask)."""
    sd = {k: v.detach() for k, v in sd.items()}
    n_blocks = lambda prefix: len({k.split(".")[1] for k in sd if k.startswith(prefix + ".")})  # noqa: E731
    w = sd["x_embedder.proj.weight"]  # (D, C, p, p): a stride-p convolution, tokens row-major
    p = w.shape[-1]
    x = F.conv2d(x, w, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2) + sd["pos_embed"]
    t_emb = _ref_linear(sd, "t_embedder.mlp.2", F.silu(_ref_linear(sd, "t_embedder.mlp.0", _ref_timestep_features(t))))
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]
    side = int(round(x.shape[1] ** 0.5))  # the token grid
    block = lambda name, h, **kw: _ref_block(sd, name, h, c, num_heads, side, **kw)  # noqa: E731
    input_skip = x
    ids_keep = None
    if masked is not None:
        ids_keep, ids_restore, mask = masked
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[2]))

    def interpolate(x):
        if masked is None:
            return x + sd["decoder_pos_embed"]
        fill = sd["mask_token"].repeat(x.shape[0], ids_restore.shape[1] - x.shape[1], 1)
        x = torch.gather(torch.cat([x, fill], 1), 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = x + sd["decoder_pos_embed"]
        before = x
        x = block("sideblocks.0", x)
        return x * mask.unsqueeze(-1) + (1 - mask.unsqueeze(-1)) * before

    if version == "v1":
        depth = n_blocks("blocks")
        for i in range(depth):
            if i == depth - decode_layer:
                x, ids_keep = interpolate(x), None
            x = block(f"blocks.{i}", x, ids_keep=ids_keep)
    else:
        skips = []
        for i in range(n_blocks("en_inblocks")):
            x = block(f"en_inblocks.{i}", x, ids_keep=ids_keep)
            skips.append(x)
        for i in range(n_blocks("en_outblocks")):
            x = block(f"en_outblocks.{i}", x, skip=skips.pop(), ids_keep=ids_keep)
        x = interpolate(x)
        for i in range(n_blocks("de_blocks")):
            x = block(f"de_blocks.{i}", x, skip=input_skip)
    shift, scale = _ref_linear(sd, "final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    x = _ref_linear(sd, "final_layer.linear", _ref_ln(x) * (1 + scale[:, None]) + shift[:, None])
    # unpatchify: token (i, j) holds its p x p patch as (row, column, channel)
    nb = x.shape[0]
    out_c = x.shape[-1] // (p * p)
    x = x.reshape(nb, side, side, p, p, out_c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(nb, out_c, side * p, side * p)


# ---------------------------------------------------------------------------------------------
# (1) parameter counts and official names
# ---------------------------------------------------------------------------------------------
PARAM_COUNTS = {
    ("v1", "XL", 2): 699_778_144,
    ("v2", "XL", 4): 742_263_904,
    ("v1", "S", 2): 35_797_208,
    ("v2", "S", 6): 38_454_872,
    ("v2", "S", 4): 38_159_576,
}


@pytest.mark.parametrize(("version", "size", "decode_layer"), list(PARAM_COUNTS))
def test_param_count_official_configs(version, size, decode_layer):
    with torch.device("meta"):  # same modules and shapes, no memory
        net = MDT(
            input_size=32,
            patch_size=2,
            in_channels=4,
            num_classes=1000,
            learn_sigma=True,
            version=version,
            decode_layer=decode_layer,
            mask_ratio=0.3,
            **MDT_CONFIGS[size],
        )
    # every Parameter, incl. the learnable pos embeds and mask_token (as the official figures)
    assert sum(p.numel() for p in net.parameters()) == PARAM_COUNTS[(version, size, decode_layer)]


def test_param_count_is_independent_of_mask_ratio_and_buffers_are_not_parameters():
    a = MDT(**{**TINY, "mask_ratio": None})
    b = MDT(**{**TINY, "mask_ratio": 0.3})
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    # official: mask_ratio=None -> frozen all-zero mask token; a ratio -> trainable N(0, 0.02)
    assert not a.mask_token.requires_grad and torch.count_nonzero(a.mask_token) == 0
    assert b.mask_token.requires_grad and torch.count_nonzero(b.mask_token) == b.hidden_size


def _official_keys(version: str, depth: int, decode_layer: int) -> set[str]:
    """The state_dict keys of the official models (names taken from sail-sg/MDT models.py)."""
    per_block = [
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "attn.rel_pos_bias.relative_position_bias_table",
        "attn.rel_pos_bias.relative_position_index",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
        "adaLN_modulation.1.weight",
        "adaLN_modulation.1.bias",
    ]
    skip = ["skip_linear.weight", "skip_linear.bias"]
    keys = {
        "pos_embed",
        "decoder_pos_embed",
        "mask_token",
        "x_embedder.proj.weight",
        "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight",
        "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias",
    }
    lists = [("sideblocks", 1, False)]
    if version == "v1":
        lists.append(("blocks", depth, False))
    else:
        half = (depth - decode_layer) // 2
        lists += [("en_inblocks", half, False), ("en_outblocks", half, True), ("de_blocks", decode_layer, True)]
    for name, count, has_skip in lists:
        for i in range(count):
            keys.update(f"{name}.{i}.{k}" for k in per_block + (skip if has_skip else []))
    return keys


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_official_state_dict_names_load_strictly(version):
    net = _tiny(version)
    sd = net.state_dict()
    assert set(sd) == _official_keys(version, TINY["depth"], 2)
    # relative_position_index is a persistent buffer (official register_buffer), not a Parameter
    assert "en_inblocks.0.attn.rel_pos_bias.relative_position_index" not in dict(net.named_parameters())
    other = MDT(**{**TINY, "version": version, "decode_layer": 2})
    other.load_state_dict(sd, strict=True)
    x, t, y = _inputs(net=net)
    torch.testing.assert_close(other.eval()(x, t, y), net(x, t, y), rtol=0, atol=0)


def test_relative_position_index_and_table():
    rpb = RelativePositionBias((3, 3), num_heads=2)
    w = 3
    assert rpb.relative_position_bias_table.shape == ((2 * w - 1) ** 2 + 3, 2)
    idx = rpb.relative_position_index
    assert idx.shape == (9, 9) and idx.dtype == torch.int64
    for i in range(9):
        for j in range(9):
            dh, dw = i // w - j // w, i % w - j % w
            assert idx[i, j] == (dh + w - 1) * (2 * w - 1) + (dw + w - 1)
    # the 3 extra (cls) rows are never indexed
    assert idx.max() == (2 * w - 1) ** 2 - 1
    bias = rpb()
    assert bias.shape == (2, 9, 9)
    torch.testing.assert_close(bias[1, 4, 0], rpb.relative_position_bias_table[idx[4, 0], 1])
    # trunc_normal(std=0.02) initialisation
    big = RelativePositionBias((16, 16), num_heads=16).relative_position_bias_table
    assert abs(big.std().item() - 0.02) < 0.001 and abs(big.mean().item()) < 0.001


def test_masked_relative_bias_is_the_full_bias_indexed_by_ids_keep():
    torch.manual_seed(0)
    rpb = RelativePositionBias((4, 4), num_heads=3)
    info = TokenMasking(0.4).sample(5, 16)
    masked = rpb.masked(info.ids_keep)
    full = rpb()
    assert masked.shape == (5, 3, info.len_keep, info.len_keep)
    for n in range(5):
        keep = info.ids_keep[n]
        torch.testing.assert_close(masked[n], full[:, keep][:, :, keep], rtol=0, atol=0)


@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_fused_attention_equals_the_official_explicit_softmax(masked):
    """MDT's attention runs through scaled_dot_product_attention with the relative bias as attn_mask; the
    official code computes softmax(q k^T * scale + bias) v explicitly. Same weights, same input: equal to 1e-5."""
    from lightgen.nets.mdt import MDTAttention

    torch.manual_seed(0)
    attn = MDTAttention(dim=48, num_heads=3, num_patches=16)
    torch.nn.init.normal_(attn.rel_pos_bias.relative_position_bias_table, std=1.0)  # a bias that matters
    info = TokenMasking(0.4).sample(2, 16) if masked else None
    x = torch.randn(2, info.len_keep if masked else 16, 48)
    b, n, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, 3, c // 3).permute(2, 0, 3, 1, 4).unbind(0)
    bias = attn.rel_pos_bias.masked(info.ids_keep) if masked else attn.rel_pos_bias()
    logits = (q @ k.transpose(-2, -1)) * attn.scale + bias
    official = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))
    out = attn(x, ids_keep=info.ids_keep if masked else None)
    torch.testing.assert_close(out, official, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# (2) initialisation and forward passes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_zero_output_at_init_in_both_passes(version):
    net = _tiny(version, perturb=False).train()
    x, t, y = _inputs(5)
    info = TokenMasking(0.3, 0.2).sample(5, 16)
    for mask in (None, info):
        out = net(100 * x, t, y, mask=mask)
        assert out.shape == (5, 8, 8, 8)
        assert torch.count_nonzero(out) == 0


def test_official_initialisation():
    net = _tiny("v2", perturb=False, hidden_size=128)
    d = 128
    expected = torch.from_numpy(get_2d_sincos_pos_embed(d, 4)).float()[None]
    for pe in (net.pos_embed, net.decoder_pos_embed):
        assert torch.equal(pe, expected) and pe.requires_grad  # learnable in MDT
    blocks = [*net.en_inblocks, *net.en_outblocks, *net.de_blocks, *net.sideblocks]
    for blk in blocks:
        assert torch.count_nonzero(blk.adaLN_modulation[-1].weight) == 0
        assert torch.count_nonzero(blk.adaLN_modulation[-1].bias) == 0
        bound = math.sqrt(6 / (d + 3 * d))
        assert 0.9 * bound < blk.attn.qkv.weight.abs().max() <= bound
    for blk in [*net.en_outblocks, *net.de_blocks]:  # skip_linear: xavier, not zero
        bound = math.sqrt(6 / (2 * d + d))
        assert 0.9 * bound < blk.skip_linear.weight.abs().max() <= bound
        assert torch.count_nonzero(blk.skip_linear.bias) == 0
    fl = net.final_layer
    for tensor in (fl.linear.weight, fl.linear.bias, fl.adaLN_modulation[-1].weight, fl.adaLN_modulation[-1].bias):
        assert torch.count_nonzero(tensor) == 0
    assert abs(net.mask_token.std().item() - 0.02) < 0.005


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_full_and_masked_pass_match_the_official_algorithm(version):
    """The net against the official forward recomputed from its state_dict alone (no lightgen module is called)."""
    net = _tiny(version)
    x, t, y = _inputs(3, net=net)
    sd = net.state_dict()

    def ref(x, t, y, masked=None):
        return _ref_forward(sd, x, t, y, version=version, num_heads=TINY["num_heads"], decode_layer=2, masked=masked)

    with torch.no_grad():
        torch.testing.assert_close(net(x, t, y), ref(x, t, y), rtol=1e-5, atol=1e-5)
        info = TokenMasking(0.3, 0.2).sample(3, 16, generator=torch.Generator().manual_seed(4))
        out = net(x, t, y, mask=info)
        torch.testing.assert_close(
            out, ref(x, t, y, masked=(info.ids_keep, info.ids_restore, info.mask)), rtol=1e-5, atol=1e-5
        )
        assert not torch.allclose(out, net(x, t, y), atol=1e-3)


def test_v1_layout_encoder_then_decoder_blocks():
    net = _tiny("v1", depth=5, decode_layer=2)
    assert len(net.blocks) == 5 and len(net.sideblocks) == 1
    assert not hasattr(net, "en_inblocks")


def test_v2_layout_and_official_floor_of_odd_encoder_depth():
    net = _tiny("v2", depth=12, decode_layer=6)
    assert (len(net.en_inblocks), len(net.en_outblocks), len(net.de_blocks)) == (3, 3, 6)
    assert net.en_inblocks[0].skip_linear is None and net.en_outblocks[0].skip_linear is not None
    assert net.de_blocks[0].skip_linear is not None and net.sideblocks[0].skip_linear is None
    with pytest.warns(UserWarning, match="odd"):
        odd = MDT(**{**TINY, "depth": 5, "decode_layer": 2})
    assert (len(odd.en_inblocks), len(odd.de_blocks)) == (1, 2)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_masked_shortcut_leaves_visible_tokens_unchanged(version):
    net = _tiny(version)
    n, length, d = 4, 16, TINY["hidden_size"]
    info = TokenMasking(0.5).sample(n, length, generator=torch.Generator().manual_seed(0))
    enc = torch.randn(n, info.len_keep, d)
    c = torch.randn(n, d)
    with torch.no_grad():
        out = net.forward_side_interpolater(enc, c, info.mask, info.ids_restore)
    assert out.shape == (n, length, d)
    visible = info.mask == 0
    # x_before: kept tokens put back at their positions, + decoder_pos_embed
    before = net.decoder_pos_embed.expand(n, -1, -1).clone()
    for i in range(n):
        before[i, info.ids_keep[i]] += enc[i]
    assert torch.equal(out[visible], before[visible])  # exactly, not approximately
    # masked positions come from the side block (mask token + pos embed + attention), not x_before
    masked = ~visible
    assert not torch.allclose(out[masked], before[masked], atol=1e-3)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_gradients_of_the_full_and_the_masked_pass(version):
    net = _tiny(version).train()
    x, t, y = _inputs(4, net=net)
    side = [*net.sideblocks.parameters(), net.mask_token]
    net(x, t, y).square().mean().backward()
    assert all(p.grad is None for p in side), "the full pass never uses the side-interpolater"
    trained = [p for p in net.parameters() if p.requires_grad and all(p is not q for q in side)]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    net.zero_grad(set_to_none=True)
    info = TokenMasking(0.3, 0.2).sample(4, 16, generator=torch.Generator().manual_seed(1))
    net(x, t, y, mask=info).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in side)


# ---------------------------------------------------------------------------------------------
# (3) token masking
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("ratio", "jitter"), [(0.3, 0.0), (0.3, 0.2), (0.0, 0.0), (0.75, 0.0)])
def test_masking_invariants(ratio, jitter):
    g = torch.Generator().manual_seed(0)
    masking = TokenMasking(ratio, jitter)
    n, length = 6, 256
    for _ in range(20):
        info = masking.sample(n, length, generator=g)
        assert isinstance(info, TokenMask)
        assert ratio <= info.ratio <= ratio + jitter
        assert info.len_keep == int(length * (1 - info.ratio)) or jitter > 0
        assert info.ids_keep.shape == (n, info.len_keep)
        assert torch.equal(info.ids_keep, info.ids_shuffle[:, : info.len_keep])
        # ids_restore o ids_shuffle = identity (per sample)
        ar = torch.arange(length).expand(n, -1)
        assert torch.equal(torch.gather(info.ids_shuffle, 1, info.ids_restore), ar)
        assert torch.equal(torch.gather(info.ids_restore, 1, info.ids_shuffle), ar)
        # exactly L - len_keep ones, and they are the removed tokens
        assert torch.equal(info.mask.sum(1), torch.full((n,), float(length - info.len_keep)))
        for i in range(n):
            assert torch.all(info.mask[i, info.ids_keep[i]] == 0)
            assert len(set(info.ids_keep[i].tolist())) == info.len_keep
    if jitter == 0:
        assert info.len_keep == int(length * (1 - ratio))  # v1: 0.3 -> 179 of 256


def test_v2_ratio_is_drawn_once_per_batch_in_the_jitter_range():
    g = torch.Generator().manual_seed(0)
    masking = TokenMasking(0.3, 0.2)
    ratios = [masking.sample(4, 256, generator=g).ratio for _ in range(200)]
    assert 0.3 <= min(ratios) and max(ratios) <= 0.5
    assert max(ratios) - min(ratios) > 0.15  # it does vary
    keeps = {masking.sample(4, 256, generator=g).len_keep for _ in range(200)}
    assert min(keeps) >= 128 and max(keeps) <= 179


@pytest.mark.parametrize(("ratio", "jitter"), [(0.3, 0.0), (0.3, 0.2)])
def test_masking_follows_the_official_random_stream(ratio, jitter):
    torch.manual_seed(7)
    info = TokenMasking(ratio, jitter).sample(3, 64)
    torch.manual_seed(7)
    r = torch.rand(1) * jitter + ratio if jitter else ratio  # MDTv2 draws the ratio first
    ids_keep, ids_restore, mask = _ref_random_masking(3, 64, r)
    assert torch.equal(info.ids_keep, ids_keep) and torch.equal(info.ids_restore, ids_restore)
    assert torch.equal(info.mask, mask)


def test_masking_generator_reproducible_and_device():
    a = TokenMasking(0.3, 0.2).sample(2, 16, device="cpu", generator=torch.Generator().manual_seed(5))
    b = TokenMasking(0.3, 0.2).sample(2, 16, device="cpu", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.ids_keep, b.ids_keep) and a.ratio == b.ratio
    assert a.mask.dtype == torch.float32 and a.ids_keep.dtype == torch.int64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ratio=1.0), r"masking.ratio=1.0 must be in \[0, 1\)"),
        (dict(ratio=-0.1), r"masking.ratio=-0.1 must be in \[0, 1\)"),
        (dict(ratio=0.9, jitter=0.2), r"masking.ratio=0.9 plus masking.jitter=0.2 must stay below 1"),
        (dict(ratio=0.3, jitter=-0.1), r"masking.jitter=-0.1 must be non-negative"),
        (dict(ratio="a lot"), r"masking.ratio='a lot' must be a number"),
    ],
)
def test_bad_masking_ratio_is_one_sentence(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        TokenMasking(**kwargs)
    assert "\n" not in str(err.value)


def test_masking_that_keeps_no_token_is_refused():
    with pytest.raises(ValueError, match="keeps no token of 4"):
        TokenMasking(0.8).sample(2, 4)


# ---------------------------------------------------------------------------------------------
# (4) constructor errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(patch_size=3), "patch_size=3 does not divide the input size 8"),
        (dict(num_heads=5), "hidden_size=64 is not divisible by num_heads=5"),
        (dict(version="v3"), "version='v3' is not an MDT version"),
        (dict(decode_layer=7), "decode_layer=7 exceeds depth=6"),
        (dict(decode_layer=0), "decode_layer=0 must be a positive integer"),
        (dict(mask_ratio="high"), "mask_ratio='high' must be null or a number"),
    ],
)
def test_bad_constructor_arguments_are_one_sentence(overrides, match):
    with pytest.raises(ValueError, match=match) as err:
        MDT(**{**TINY, **overrides})
    assert "\n" not in str(err.value)


def test_default_decode_layer_per_version():
    assert MDT(**{**TINY, "version": "v2"}).decode_layer == 4
    assert MDT(**{**TINY, "version": "v1"}).decode_layer == 2


def test_wrong_masking_info_is_refused():
    net = _tiny("v2")
    x, t, y = _inputs(2, net=net)
    info = TokenMasking(0.3).sample(2, 64)  # drawn for 64 tokens, the net has 16
    with pytest.raises(ValueError, match="masking info must hold"):
        net(x, t, y, mask=info)


# ---------------------------------------------------------------------------------------------
# (5) the training method
# ---------------------------------------------------------------------------------------------
def _module(net, masking, **kw):
    return DiffusionModule(
        net=net,
        process=GaussianDiffusionProcess(masking=masking),
        first_stage=IdentityFirstStage(channels=net.in_channels, image_size=net.input_size),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4),
        **kw,
    )


def test_training_step_adds_the_masked_pass_on_the_same_x0_and_t():
    net = _tiny("v2", in_channels=1, num_classes=4).train()
    masking = TokenMasking(0.3, 0.2)
    module = _module(net, masking)
    logged = {}
    module.log_mean_across_ranks = lambda values, batch_size, **_: logged.update(values)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, "label": torch.tensor([0, 1, 2, 3])}
    torch.manual_seed(11)
    loss = module.training_step(batch, 0)
    assert set(logged) == {f"train/{p}{k}" for p in ("", "m_") for k in ("loss", "mse", "vb")}
    # the same computation by hand, in the same random order: one t, full pass, then masked pass
    torch.manual_seed(11)
    x, y = batch["image"], batch["label"]
    diffusion = module.process.diffusion
    t = torch.randint(0, diffusion.num_timesteps, (4,))
    full = diffusion.training_losses(net, x, t, model_kwargs={"y": y})
    info = masking.sample(4, 16)
    masked = diffusion.training_losses(net, x, t, model_kwargs={"y": y, "mask": info})
    torch.testing.assert_close(loss, full["loss"].mean() + masked["loss"].mean())
    torch.testing.assert_close(logged["train/m_mse"], masked["mse"].mean())
    torch.testing.assert_close(logged["train/loss"], full["loss"].mean())
    assert not torch.allclose(full["mse"], masked["mse"])  # independent noise per pass
    loss.backward()
    assert net.sideblocks[0].attn.qkv.weight.grad is not None and net.mask_token.grad is not None


def test_masking_with_a_net_without_masked_pass_fails_at_startup():
    net = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    with pytest.raises(ValueError, match="needs a net with a masked pass"):
        _module(net, TokenMasking(0.3, name="mdt"))


def test_mdt_without_masking_warns_once_and_trains_the_full_pass_only():
    net = _tiny("v2", in_channels=1, num_classes=4).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # building it (e.g. for sampling) does not warn
        module = _module(net, None)
    assert not any(p.requires_grad for p in net.sideblocks.parameters()) and not net.mask_token.requires_grad
    logged = {}
    module.log_mean_across_ranks = lambda values, batch_size, **_: logged.update(values)
    batch = {"image": torch.rand(2, 1, 8, 8) * 2 - 1, "label": torch.tensor([0, 1])}
    with pytest.warns(UserWarning, match="plain DiT-style training"):
        module.training_step(batch, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one time only
        loss = module.training_step(batch, 1)
    assert set(logged) == {"train/loss", "train/mse", "train/vb"}
    loss.backward()
    assert net.en_inblocks[0].attn.qkv.weight.grad is not None
    assert all(p.grad is None for p in net.sideblocks.parameters())


# ---------------------------------------------------------------------------------------------
# (6) configs
# ---------------------------------------------------------------------------------------------
def test_model_mdt_xl_selects_the_mdtv2_recipe():
    cfg = compose(["model=mdt_xl", "trainer=ddp8"])
    assert cfg.model._target_ == "lightgen.nets.mdt.MDT" and cfg.model.version == "v2"
    assert (cfg.model.depth, cfg.model.hidden_size, cfg.model.num_heads, cfg.model.decode_layer) == (28, 1152, 16, 4)
    assert cfg.masking.name == "mdt_v2" and (cfg.masking.ratio, cfg.masking.jitter) == (0.3, 0.2)
    assert cfg.diffusion.mse_loss_weighting == "min_snr" and cfg.diffusion.min_snr_gamma == 5.0
    opt = cfg.optim.optimizer
    assert opt._target_ == "torch.optim.AdamW" and (opt.lr, opt.weight_decay) == (3e-4, 0.0)
    assert cfg.optim.scheduler is None and cfg.trainer.devices == 8


def test_command_line_overrides_win_over_the_model_recipe():
    cfg = compose(["model=mdt_s", "masking=mdt", "optim=adamw_warmup_cosine", "diffusion=gaussian"])
    assert cfg.masking.name == "mdt" and cfg.masking.jitter == 0.0
    assert cfg.optim.scheduler is not None and cfg.diffusion.mse_loss_weighting is None
    assert instantiate(compose(["model=mdt_s", "masking=none"]).masking) is None
    assert compose(["model=mdt_b"]).model.decode_layer == 6 and compose(["model=mdt_l"]).model.decode_layer == 4
    assert compose(["model=mdt_s"]).model.decode_layer == 6


def test_experiments_compose_and_build():
    cfg = compose(["experiment=mdt_xl2_imagenet256", "trainer=ddp8", "data.path=/nowhere"])
    assert (
        cfg.model.decode_layer == 4
        and cfg.masking.name == "mdt_v2"
        and cfg.first_stage.path_or_id == "stabilityai/sd-vae-ft-mse"
    )
    s = cfg.method.sampling
    assert (s.cfg_schedule, s.cfg_scale, s.scale_pow, s.steps) == ("power_cosine", 3.8, 4.0, 250)
    assert cfg.diffusion.mse_loss_weighting == "min_snr" and cfg.optim.optimizer.lr == 3e-4

    quick = compose(["experiment=quickstart_mdt", "masking.ratio=0.5"])
    dit = compose(["experiment=quickstart"])
    for k in ("patch_size", "hidden_size", "depth", "num_heads"):
        assert quick.model[k] == dit.model[k]
    assert quick.data.batch_size == dit.data.batch_size and quick.trainer.max_steps == dit.trainer.max_steps
    assert quick.optim == dit.optim and quick.method.ema_decay == dit.method.ema_decay
    assert quick.callbacks == dit.callbacks
    assert quick.method.sampling.cfg_schedule == "power_cosine"
    masking = instantiate(quick.masking)
    assert isinstance(masking, TokenMasking) and masking.ratio == 0.5
    net = instantiate(quick.model)
    assert isinstance(net, MDT) and net.num_patches == 64 and net.in_channels == 1
    # an experiment that overrides the groups the model recipe sets composes too (v1 variant)
    v1 = compose(["experiment=quickstart_mdt", "masking=mdt", "model.version=v1"])
    assert v1.masking.jitter == 0.0 and instantiate(v1.model).version == "v1"


# ---------------------------------------------------------------------------------------------
# (7) end to end through the CLI
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quickstart_mdt_trains_and_logs_the_masked_terms(fake_fashion_mnist, tmp_path):
    run = tmp_path / "run"
    run_cli(
        "train",
        "experiment=quickstart_mdt",
        f"data.root={fake_fashion_mnist}",
        "data.batch_size=8",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "callbacks.sample_grid.samples_per_class=1",
        "method.sampling.steps=2",
        "callbacks.fid.at_end=false",
        f"hydra.run.dir={run}",
    )
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    logged = {k for r in rows for k, v in r.items() if v}
    for key in ("train/loss", "train/mse", "train/vb", "train/m_loss", "train/m_mse", "train/m_vb"):
        assert key in logged, key
    m_mse = [float(r["train/m_mse"]) for r in rows if r.get("train/m_mse")]
    assert len(m_mse) == 3 and all(math.isfinite(v) for v in m_mse)
    assert (run / "samples" / "step_0000003.png").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert "net.sideblocks.0.attn.rel_pos_bias.relative_position_bias_table" in ckpt["state_dict"]
    assert ckpt["lightgen"]["config"]["masking"]["name"] == "mdt_v2"


@pytest.mark.slow
def test_bad_masking_ratio_fails_at_startup(fake_fashion_mnist, tmp_path):
    run = tmp_path / "run"
    args = ["experiment=quickstart_mdt", f"data.root={fake_fashion_mnist}", "masking.ratio=1.2", f"hydra.run.dir={run}"]
    proc = run_cli("train", *args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "masking.ratio=1.2 must be in [0, 1)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run / "checkpoints").exists()


def test_adan_optimiser_config_builds_timm_adan_and_mdt_xl2_uses_it_with_clipping():
    from hydra.utils import instantiate

    cfg = compose(["experiment=mdt_xl2_imagenet256", "trainer=ddp8", "data.path=/nonexistent"])
    assert cfg.optim.optimizer._target_ == "timm.optim.Adan" and cfg.optim.optimizer.lr == 3e-4
    assert cfg.trainer.gradient_clip_val == 1.0, "Adan's max_grad_norm=1 as the official MDTv2 script"
    net = torch.nn.Linear(3, 2)
    opt = instantiate(cfg.optim.optimizer)(params=net.parameters())
    before = net.weight.detach().clone()
    net(torch.ones(4, 3)).sum().backward()
    opt.step()
    assert not torch.equal(before, net.weight), "one Adan step moves the weights"
    assert compose(["model=mdt_xl", "optim=adamw_mdt"]).optim.optimizer._target_ == "torch.optim.AdamW"


@pytest.mark.slow
def test_mask_ratio_by_patch_size_sweep_runs_six_jobs_and_writes_the_summary(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(
        "train",
        "-m",
        "experiment=quickstart_mdt",
        "data=synthetic",
        "logger=csv",
        "model.hidden_size=32",
        "model.num_heads=2",
        "trainer.max_steps=1",
        "trainer.log_every_n_steps=1",
        "callbacks.progress=null",
        "callbacks.sample_grid=null",
        "callbacks.fid.at_end=false",
        "masking.ratio=0.1,0.3,0.5",
        "model.patch_size=2,4",
        f"hydra.sweep.dir={sweep}",
    )
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert {(r["masking.ratio"], r["model.patch_size"]) for r in rows} == {
        (r, p) for r in ("0.1", "0.3", "0.5") for p in ("2", "4")
    }
    md = (sweep / "summary.md").read_text()
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + 6
    for r in rows:
        metrics = list(csv.DictReader(open(Path(r["run_dir"]) / "metrics.csv")))
        assert any(m.get("train/m_loss") for m in metrics), "the masked pass is logged in every job"
