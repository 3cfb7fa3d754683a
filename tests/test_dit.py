"""DiT network, shared layers and official-checkpoint import.

Reference: facebookresearch/DiT ``models.py`` (architecture, init, parameter names,
``forward_with_cfg``) and diffusers' ``DiTTransformer2DModel`` (an independent port, used for a
numerical cross-check).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from lightgen.convert import (
    diffusers_dit_kwargs,
    dit_to_diffusers_state_dict,
    infer_dit_config,
    load_official_dit,
    match_official_timestep_embedding,
)
from lightgen.nets import (
    DIT_CONFIGS,
    DiT,
    LabelEmbedder,
    TimestepEmbedder,
    dit_config,
    get_2d_sincos_pos_embed,
)

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def _tiny(seed: int = 0, **overrides) -> DiT:
    """A tiny DiT whose zero-initialised layers are perturbed, so that its output is non-trivial."""
    torch.manual_seed(seed)
    net = DiT(**{**TINY, **overrides})
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def _inputs(n: int = 4, seed: int = 1, net: DiT | None = None):
    g = torch.Generator().manual_seed(seed)
    c = net.in_channels if net is not None else TINY["in_channels"]
    s = net.input_size if net is not None else TINY["input_size"]
    k = net.num_classes if net is not None else TINY["num_classes"]
    x = torch.randn(n, c, s, s, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g).float()
    y = torch.randint(0, k, (n,), generator=g)
    return x, t, y


# ---------------------------------------------------------------------------------------------
# (1) exact parameter counts of the 12 official configs (paper Table / fast-DiT logs)
# ---------------------------------------------------------------------------------------------
PARAM_COUNTS = {
    ("S", 8): 33_148_160,
    ("S", 4): 32_945_024,
    ("S", 2): 32_963_360,
    ("B", 8): 130_881_536,
    ("B", 4): 130_475_648,
    ("B", 2): 130_512_416,
    ("L", 8): 458_594_816,
    ("L", 4): 458_053_760,
    ("L", 2): 458_102_816,
    ("XL", 8): 675_683_072,
    ("XL", 4): 675_074_432,
    ("XL", 2): 675_129_632,
}


@pytest.mark.parametrize(("size", "patch"), list(PARAM_COUNTS))
def test_param_count_official_configs(size, patch):
    # The real module is built on the meta device: same modules and shapes, no memory, no init cost.
    with torch.device("meta"):
        net = DiT(
            input_size=32,
            patch_size=patch,
            in_channels=4,
            num_classes=1000,
            learn_sigma=True,
            **DIT_CONFIGS[size],
        )
    assert sum(p.numel() for p in net.parameters()) == PARAM_COUNTS[(size, patch)]
    # pos_embed is a frozen Parameter, counted above.
    assert not net.pos_embed.requires_grad
    assert any(p is net.pos_embed for p in net.parameters())


def test_dit_config_helper():
    assert dit_config("XL") == {"depth": 28, "hidden_size": 1152, "num_heads": 16}
    assert dit_config("DiT-B/4") == {"depth": 12, "hidden_size": 768, "num_heads": 12, "patch_size": 4}
    assert dit_config("s/2")["patch_size"] == 2
    with pytest.raises(ValueError, match="unknown DiT size"):
        dit_config("XXL")


# ---------------------------------------------------------------------------------------------
# (2) initialisation
# ---------------------------------------------------------------------------------------------
def test_zero_output_at_init():
    torch.manual_seed(0)
    net = DiT(**TINY)
    for train in (True, False):
        net.train(train)
        x, t, y = _inputs(5)
        out = net(100 * x, t, y)
        assert out.shape == (5, 8, 8, 8)
        assert torch.count_nonzero(out) == 0


def test_official_initialisation():
    torch.manual_seed(0)
    net = DiT(**{**TINY, "hidden_size": 128, "depth": 3})
    d, c, p = 128, 4, 2
    # adaLN-Zero: every block's and the final layer's modulation, and the final linear, are zero.
    for block in net.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
        assert torch.count_nonzero(block.adaLN_modulation[-1].bias) == 0
        # other Linear layers: xavier-uniform weights, zero bias
        bound = math.sqrt(6 / (d + 3 * d))
        assert block.attn.qkv.weight.abs().max() <= bound
        assert block.attn.qkv.weight.abs().max() > 0.9 * bound
        assert torch.count_nonzero(block.attn.qkv.bias) == 0
    fl = net.final_layer
    for tensor in (
        fl.linear.weight,
        fl.linear.bias,
        fl.adaLN_modulation[-1].weight,
        fl.adaLN_modulation[-1].bias,
    ):
        assert torch.count_nonzero(tensor) == 0
    # patch conv initialised as a Linear on (C*p*p) inputs
    w = net.x_embedder.proj.weight
    bound = math.sqrt(6 / (c * p * p + d))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.count_nonzero(net.x_embedder.proj.bias) == 0
    # N(0, 0.02) label table (incl. the null row) and timestep MLP weights; t-MLP biases zero
    assert net.y_embedder.embedding_table.weight.shape == (11, d)
    assert abs(net.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.003
    assert abs(net.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.002
    assert abs(net.t_embedder.mlp[2].weight.std().item() - 0.02) < 0.003
    assert torch.count_nonzero(net.t_embedder.mlp[0].bias) == 0
    # frozen sin-cos table
    expected = torch.from_numpy(get_2d_sincos_pos_embed(d, 4)).float()[None]
    assert torch.equal(net.pos_embed, expected) and not net.pos_embed.requires_grad


def test_sincos_pos_embed_layout():
    d, g = 16, 3
    emb = get_2d_sincos_pos_embed(d, g)
    assert emb.shape == (g * g, d) and emb.dtype == np.float64
    freqs = 1.0 / 10000 ** (np.arange(d // 4) / (d / 4))
    for row in range(g):
        for col in range(g):
            tok = emb[row * g + col]  # tokens enumerated row by row
            # first half encodes the column (w goes first), second half the row; sin then cos
            np.testing.assert_allclose(tok[: d // 4], np.sin(col * freqs))
            np.testing.assert_allclose(tok[d // 4 : d // 2], np.cos(col * freqs))
            np.testing.assert_allclose(tok[d // 2 : 3 * d // 4], np.sin(row * freqs))
            np.testing.assert_allclose(tok[3 * d // 4 :], np.cos(row * freqs))
    # non-square grids keep the same convention
    rect = get_2d_sincos_pos_embed(d, (2, 3))
    np.testing.assert_allclose(rect[1 * 3 + 2, : d // 4], np.sin(2 * freqs))


def test_timestep_embedding_cos_first():
    t = torch.tensor([0.0, 3.5])
    emb = TimestepEmbedder.timestep_embedding(t, 256)
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    torch.testing.assert_close(emb[:, :128], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(emb[:, 128:], torch.sin(t[:, None] * freqs))
    assert TimestepEmbedder.timestep_embedding(t, 7).shape == (2, 7)
    assert TimestepEmbedder(32).mlp[0].in_features == 256


def test_label_dropout():
    emb = LabelEmbedder(10, 8, 0.5)
    labels = torch.arange(10).repeat(20)
    # training: official random stream, torch.rand(N) < p on the default generator
    torch.manual_seed(3)
    expected = torch.where(torch.rand(len(labels)) < 0.5, 10, labels)
    torch.manual_seed(3)
    torch.testing.assert_close(emb(labels, train=True), emb.embedding_table(expected))
    # eval: no dropout; forced dropping works in both modes
    torch.testing.assert_close(emb(labels, train=False), emb.embedding_table(labels))
    force = (torch.arange(len(labels)) % 3 == 0).long()
    torch.testing.assert_close(
        emb(labels, train=False, force_drop_ids=force),
        emb.embedding_table(torch.where(force == 1, 10, labels)),
    )
    assert LabelEmbedder(10, 8, 0.0).embedding_table.num_embeddings == 10


# ---------------------------------------------------------------------------------------------
# (4) official parameter names and checkpoint import
# ---------------------------------------------------------------------------------------------
def _official_keys(depth: int) -> set[str]:
    """Key set of the official DiT state_dict (facebookresearch/DiT models.py)."""
    keys = {"pos_embed", "y_embedder.embedding_table.weight"}
    wb = ("weight", "bias")
    keys |= {f"x_embedder.proj.{p}" for p in wb}
    keys |= {f"t_embedder.mlp.{i}.{p}" for i in (0, 2) for p in wb}
    for i in range(depth):
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{i}.{layer}.{p}" for p in wb}
    keys |= {f"final_layer.{layer}.{p}" for layer in ("linear", "adaLN_modulation.1") for p in wb}
    return keys


def test_official_parameter_names_dit_s2():
    with torch.device("meta"):
        net = DiT(**dit_config("S/2"))
    assert set(net.state_dict()) == _official_keys(12)
    assert len(net.state_dict()) == 1 + 2 + 4 + 1 + 12 * 10 + 4  # nothing else (no buffers, no affine norms)


def test_infer_config_xl2():
    with torch.device("meta"):
        net = DiT(**dit_config("XL/2"))
    cfg = infer_dit_config(net.state_dict())
    assert cfg == dict(
        input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
        mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True,
    )  # fmt: skip


@pytest.mark.parametrize("form", ["raw", "train_ckpt", "in_memory"])
def test_load_official_round_trip(tmp_path, form):
    src = _tiny(seed=1)
    sd = src.state_dict()
    if form == "raw":
        path = tmp_path / "DiT-tiny.pt"
        torch.save(sd, path)
        arg = str(path)
    elif form == "train_ckpt":
        # official train.py layout; "ema" must be preferred over "model"
        other = _tiny(seed=2).state_dict()
        path = tmp_path / "0050000.pt"
        torch.save({"model": other, "ema": sd, "opt": {"state": {}}, "args": argparse.Namespace(lr=1e-4)}, path)
        arg = path
    else:
        arg = {"ema": sd}
    dst = _tiny(seed=3)
    assert load_official_dit(dst, arg) is dst
    for k, v in sd.items():
        assert torch.equal(dst.state_dict()[k], v), k
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(dst(x, t, y), src(x, t, y), rtol=0, atol=0)


def test_load_official_wrong_architecture(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(_tiny(depth=3, patch_size=4).state_dict(), path)
    with pytest.raises(ValueError, match=r"looks like DiT \(depth=3, hidden_size=64, patch_size=4") as err:
        load_official_dit(_tiny(), path)
    assert "but the network is DiT (depth=2, hidden_size=64, patch_size=2" in str(err.value)
    with pytest.raises(ValueError, match="does not look like a DiT checkpoint"):
        load_official_dit(_tiny(), {"weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="DiT checkpoint not found"):
        load_official_dit(_tiny(), tmp_path / "missing.pt")


def test_wrong_architecture_names_official_size():
    with torch.device("meta"):
        ckpt = DiT(**dit_config("XL/2")).state_dict()
        net = DiT(**dit_config("S/2"))
    with pytest.raises(ValueError, match=r"looks like DiT-XL/2 .* but the network is DiT-S/2"):
        load_official_dit(net, ckpt)


# ---------------------------------------------------------------------------------------------
# (5) numerical equivalence with diffusers' independent port of DiT
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, {"patch_size": 4, "learn_sigma": False, "depth": 1}])
@torch.no_grad()
def test_matches_diffusers_dit(overrides):
    from diffusers import DiTTransformer2DModel

    net = _tiny(**overrides)
    sd = net.state_dict()
    ref = DiTTransformer2DModel(**diffusers_dit_kwargs(sd, num_heads=net.num_heads)).eval()
    ref.load_state_dict(dit_to_diffusers_state_dict(sd), strict=True)
    # diffusers recomputes the sin-cos table itself (non-persistent buffer): same layout
    torch.testing.assert_close(ref.pos_embed.pos_embed, net.pos_embed, atol=1e-6, rtol=0)
    x, t, y = _inputs(4, net=net)
    y[-1] = net.num_classes  # the null class
    t[0] = 0.0
    ours = net(x, t, y)

    # Known difference: diffusers' CombinedTimestepLabelEmbeddings uses downscale_freq_shift=1, i.e.
    # timestep frequencies exp(-ln(1e4) i / 127) instead of the official / 128, so outputs differ.
    theirs_default = ref(x, t, y).sample
    assert (ours - theirs_default).abs().max() > 1e-3
    # With the official frequencies (and norm_eps=1e-6, set by diffusers_dit_kwargs) they agree.
    match_official_timestep_embedding(ref)
    theirs = ref(x, t, y).sample
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# (6) bad input fails early with one clear sentence
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"patch_size": 3}, r"patch_size=3 does not divide the input size 8; .*model.patch_size=2"),
        (
            {"hidden_size": 60, "num_heads": 8},
            r"hidden_size=60 is not divisible by num_heads=8; .*model.num_heads=6",
        ),
        ({"hidden_size": 66, "num_heads": 2}, r"divisible by 4 for the 2-D sin-cos"),
        ({"depth": 0}, r"depth=0 must be a positive integer"),
        ({"input_size": -8}, r"input_size=-8 must be a positive integer"),
        ({"hidden_size": 64.0}, r"hidden_size=64.0 must be a positive integer"),
        ({"class_dropout_prob": 1.0}, r"class_dropout_prob=1.0 must be in \[0, 1\)"),
    ],
)
def test_bad_construction(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase) as err:
        DiT(**{**TINY, **kwargs})
    assert str(err.value).startswith("DiT: ")


def test_official_error_message_example():
    with pytest.raises(ValueError) as err:
        DiT(input_size=32, patch_size=3, hidden_size=64, depth=1, num_heads=4)
    assert str(err.value) == (
        "DiT: patch_size=3 does not divide the input size 32; choose a patch size that divides it "
        "(e.g. model.patch_size=2)."
    )


@pytest.mark.parametrize(
    "shape",
    [(2, 4, 16, 16), (2, 3, 8, 8), (2, 4, 8, 6), (4, 8, 8)],
)
def test_bad_forward_shapes(shape):
    net = _tiny()
    with pytest.raises(ValueError, match=r"DiT: expected input of shape \(N, 4, 8, 8\)"):
        net(torch.zeros(shape), torch.zeros(shape[0]), torch.zeros(shape[0], dtype=torch.long))


def test_bad_timestep_and_label_shapes():
    net = _tiny()
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"timesteps must have shape \(2,\)"):
        net(x, torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"class labels must have shape \(2,\)"):
        net(x, torch.zeros(2), torch.zeros(2, 1, dtype=torch.long))
    # a scalar timestep is broadcast to the batch
    with torch.no_grad():
        torch.testing.assert_close(
            net(x, torch.tensor(5.0), torch.zeros(2, dtype=torch.long)),
            net(x, torch.full((2,), 5.0), torch.zeros(2, dtype=torch.long)),
        )


def test_grad_checkpointing_same_gradients():
    x, t, y = _inputs(2)
    grads = []
    for ckpt in (False, True):
        net = _tiny().train()
        net.y_embedder.dropout_prob = 0.0  # deterministic labels for the comparison
        net.grad_checkpointing = ckpt
        net(x, t, y).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "pos_embed" not in grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n])
