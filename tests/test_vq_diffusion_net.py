"""VQ-Diffusion's denoiser (lightgen.nets.vq_diffusion) against the official layout, as specifications.

The official model is microsoft/VQ-Diffusion ``Condition2ImageTransformer`` (``transformer_utils.py``) with
``DalleMaskImageEmbedding`` as configured by ``configs/imagenet.yaml``: per block
``x += Attn(AdaLN_t(x))``, ``x += ConvMLP(AdaLN_y(x))``, AdaLN = ``LN(x) * (1 + scale) + shift`` with
``scale, shift = chunk(Linear(SiLU(emb[c])), 2)``, GELU2 = ``x * sigmoid(1.702 x)``, row + column position
tables of which the first L entries of the row-major S x S table are used, ``LN -> Linear(K)`` head,
(N, K, L) logits. The null label of a class table without a null row uses the mean class row.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose
from hydra.utils import instantiate
from torch import nn

from lightgen.nets import VQDiffusion

# spatial_size 8 > token_size 4: the position quirk (the 16 positions are the first 2 rows x 8 columns)
TINY = dict(
    codebook_size=11, num_classes=5, token_size=4, spatial_size=8, num_timesteps=7, hidden_size=32, depth=2, num_heads=4
)
IMAGENET = dict(codebook_size=974, num_classes=1000, token_size=16, spatial_size=32)  # the other fields' defaults


def tiny(**kw) -> VQDiffusion:
    torch.manual_seed(0)
    return VQDiffusion(**{**TINY, **kw})


def random_inputs(net: VQDiffusion, n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, net.codebook_size, (n, net.num_tokens), generator=g)
    tokens[torch.rand(tokens.shape, generator=g) < 0.4] = net.mask_token_id
    t = torch.randint(0, net.num_timesteps, (n,), generator=g)
    y = torch.randint(0, net.num_classes, (n,), generator=g)
    return tokens, t, y


def perturbed(net: VQDiffusion) -> VQDiffusion:
    """Every parameter moved off its initial value (biases 0, LN 1), so every one shows in the output."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def n_params(net: nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for name, p in net.named_parameters() if name.startswith(prefix))


# -- sizes -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("learnable_null", "total"), [(False, 518_025_678), (True, 518_037_966)])
def test_official_imagenet_size_has_the_issue_counts_part_by_part(learnable_null, total):
    with torch.device("meta"):
        net = VQDiffusion(**IMAGENET, learnable_null=learnable_null)
    d, hidden, k, t, s = 512, 2048, 974, 100, 32
    classes = 1000 + learnable_null
    assert (net.num_tokens, net.mask_token_id, net.null_class, net.class_number) == (256, 974, 1000, classes)
    parts = {
        "content_emb.emb.": (k + 1) * d,  # 974 codes + the mask row
        "content_emb.height_emb.": s * d,
        "content_emb.width_emb.": s * d,
        "to_logits.0.": 2 * d,  # LayerNorm
        "to_logits.1.": d * k + k,  # no logit for the mask class
    }
    block = {
        "ln1.emb.": t * d,  # learned step table
        "ln1.linear.": d * 2 * d + 2 * d,
        "ln2.emb.": classes * d,  # class table (+ the learned null row)
        "ln2.linear.": d * 2 * d + 2 * d,
        "attn.": 4 * (d * d + d),
        "mlp.conv1.": d * hidden * 9 + hidden,
        "mlp.conv2.": hidden * d * 9 + d,
    }
    for prefix, count in parts.items():
        assert n_params(net, prefix) == count, prefix
    for i in range(24):
        for prefix, count in block.items():
            assert n_params(net, f"blocks.{i}.{prefix}") == count, (i, prefix)
    assert sum(block.values()) == 21_541_376 + 512 * learnable_null
    assert sum(parts.values()) + 24 * sum(block.values()) == total
    assert n_params(net) == total


# -- the official key layout -----------------------------------------------------------------------------------------
def test_state_dict_keys_are_the_official_names_in_the_official_order():
    with torch.device("meta"):
        net = VQDiffusion(**IMAGENET)
    sd = net.state_dict()
    keys = list(sd)
    assert keys[:3] == ["content_emb.emb.weight", "content_emb.height_emb.weight", "content_emb.width_emb.weight"]
    block0 = [k[len("blocks.0.") :] for k in keys if k.startswith("blocks.0.")]
    assert block0 == [
        "ln1.emb.weight",
        "ln1.linear.weight",
        "ln1.linear.bias",
        "ln2.emb.weight",
        "ln2.linear.weight",
        "ln2.linear.bias",
        "attn.key.weight",
        "attn.key.bias",
        "attn.query.weight",
        "attn.query.bias",
        "attn.value.weight",
        "attn.value.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "mlp.conv1.weight",
        "mlp.conv1.bias",
        "mlp.conv2.weight",
        "mlp.conv2.bias",
    ]
    assert keys[-4:] == ["to_logits.0.weight", "to_logits.0.bias", "to_logits.1.weight", "to_logits.1.bias"]
    assert len(keys) == 3 + 24 * 18 + 4 == 439  # no buffers: the AdaLN LayerNorms have no affine parameters
    shapes = {
        "content_emb.emb.weight": (975, 512),
        "content_emb.height_emb.weight": (32, 512),
        "blocks.23.ln1.emb.weight": (100, 512),
        "blocks.23.ln2.emb.weight": (1000, 512),
        "blocks.23.ln2.linear.weight": (1024, 512),
        "blocks.23.mlp.conv1.weight": (2048, 512, 3, 3),
        "blocks.23.mlp.conv2.weight": (512, 2048, 3, 3),
        "to_logits.1.weight": (974, 512),
    }
    for name, shape in shapes.items():
        assert tuple(sd[name].shape) == shape, name
    with torch.device("meta"):
        fc = VQDiffusion(**IMAGENET, mlp_type="fc")
    assert [k for k in fc.state_dict() if k.startswith("blocks.0.mlp.")] == [
        "blocks.0.mlp.0.weight",
        "blocks.0.mlp.0.bias",
        "blocks.0.mlp.2.weight",
        "blocks.0.mlp.2.bias",
    ]


def test_an_official_layout_state_dict_loads_strictly():
    """A state dict written with the official names (as under ``transformer.transformer.`` of the checkpoint)."""
    net = tiny()
    official = {k: torch.randn_like(v) for k, v in net.state_dict().items()}
    other = tiny()
    other.load_state_dict(official, strict=True)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in official.items())


# -- the forward against a plain-torch reference ---------------------------------------------------------------------
def reference_forward(
    sd,
    tokens,
    t,
    y,
    *,
    num_heads,
    depth,
    spatial_size,
    mlp_type="conv_mlp",
    chunk_shift_first=False,
    plain_scale=False,
    exact_gelu=False,
    grid_positions=False,
):
    """The official net written out from the state dict (eval); the flags break it on purpose."""
    emb_w = sd["content_emb.emb.weight"]
    d = emb_w.shape[1]
    n, length = tokens.shape
    side = math.isqrt(length)

    def ln(x, weight=None, bias=None):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        x = (x - mu) / torch.sqrt(var + 1e-5)
        return x if weight is None else x * weight + bias

    def act(x):
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2))) if exact_gelu else x * torch.sigmoid(1.702 * x)

    def ada(x, name, c):
        table = sd[f"{name}.emb.weight"]
        rows = table[c.clamp(max=table.shape[0] - 1)]
        rows = torch.where((c >= table.shape[0])[:, None], table.mean(0, keepdim=True), rows)  # official fallback
        h = F.silu(rows) @ sd[f"{name}.linear.weight"].T + sd[f"{name}.linear.bias"]
        scale, shift = h[:, :d], h[:, d:]
        if chunk_shift_first:
            scale, shift = shift, scale
        gain = scale if plain_scale else 1 + scale
        return ln(x) * gain[:, None] + shift[:, None]

    # the official position table: S x S, row-major, its first L entries
    height, width = sd["content_emb.height_emb.weight"], sd["content_emb.width_emb.weight"]
    table = (height[:, None, :] + width[None, :, :]).reshape(-1, d)
    if grid_positions:  # the "natural" reading: an h x w sub-grid of the table
        p = torch.arange(length)
        pos = height[p // side] + width[p % side]
    else:
        pos = table[:length]
    x = emb_w[tokens] + pos[None]
    hd = d // num_heads
    for i in range(depth):
        b = f"blocks.{i}"
        h = ada(x, f"{b}.ln1", t)
        q, k, v = (
            (h @ sd[f"{b}.attn.{w}.weight"].T + sd[f"{b}.attn.{w}.bias"]).view(n, length, num_heads, hd).transpose(1, 2)
            for w in ("query", "key", "value")
        )
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        o = (probs @ v).transpose(1, 2).reshape(n, length, d)
        x = x + o @ sd[f"{b}.attn.proj.weight"].T + sd[f"{b}.attn.proj.bias"]
        h = ada(x, f"{b}.ln2", y)
        if mlp_type == "conv_mlp":
            m = h.transpose(1, 2).reshape(n, d, side, side)
            m = F.conv2d(m, sd[f"{b}.mlp.conv1.weight"], sd[f"{b}.mlp.conv1.bias"], padding=1)
            m = F.conv2d(act(m), sd[f"{b}.mlp.conv2.weight"], sd[f"{b}.mlp.conv2.bias"], padding=1)
            m = m.reshape(n, d, length).transpose(1, 2)
        else:
            m = act(h @ sd[f"{b}.mlp.0.weight"].T + sd[f"{b}.mlp.0.bias"])
            m = m @ sd[f"{b}.mlp.2.weight"].T + sd[f"{b}.mlp.2.bias"]
        x = x + m
    h = ln(x, sd["to_logits.0.weight"], sd["to_logits.0.bias"])
    logits = h @ sd["to_logits.1.weight"].T + sd["to_logits.1.bias"]
    return logits.transpose(1, 2)


def _ref_kw(net: VQDiffusion) -> dict:
    return dict(num_heads=net.num_heads, depth=net.depth, spatial_size=net.spatial_size, mlp_type=net.mlp_type)


@pytest.mark.parametrize("mlp_type", ["conv_mlp", "fc"])
def test_forward_equals_the_plain_torch_reference_in_float64(mlp_type):
    net = perturbed(tiny(mlp_type=mlp_type).double()).eval()
    tokens, t, y = random_inputs(net)
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    with torch.no_grad():
        out = net(tokens, t, y)
        ref = reference_forward(sd, tokens, t, y, **_ref_kw(net))
        assert out.dtype == torch.float64 and out.shape == (3, net.codebook_size, net.num_tokens)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        # the reference is discriminating: each departure from the official layout moves the logits
        for broken in ("chunk_shift_first", "plain_scale", "exact_gelu", "grid_positions"):
            assert (reference_forward(sd, tokens, t, y, **_ref_kw(net), **{broken: True}) - out).abs().max() > 1e-6


def test_positions_are_the_first_entries_of_the_row_major_spatial_table():
    net = tiny()
    emb = net.content_emb
    pos = emb.position_embeddings(net.num_tokens)
    full = (emb.height_emb.weight[:, None] + emb.width_emb.weight[None]).reshape(64, -1)  # official 8 x 8 table
    torch.testing.assert_close(pos, full[:16], rtol=0, atol=0)
    # position 9 is row 1, column 1 of the 8 x 8 table (not row 2 of a 4 x 4 grid)
    torch.testing.assert_close(pos[9], emb.height_emb.weight[1] + emb.width_emb.weight[1], rtol=0, atol=0)
    assert net.content_emb.num_embed == net.codebook_size + 1


def test_grid_input_is_flattened_row_major_and_scalar_t_broadcasts():
    net = tiny().eval()
    tokens, _, y = random_inputs(net)
    with torch.no_grad():
        flat = net(tokens, torch.tensor([2, 2, 2]), y)
        grid = net(tokens.view(3, 4, 4), torch.tensor(2), y)
        int32 = net(tokens.int(), torch.tensor([2, 2, 2], dtype=torch.int32), y.int())
    torch.testing.assert_close(flat, grid, rtol=0, atol=0)
    torch.testing.assert_close(flat, int32, rtol=0, atol=0)


def test_step_and_class_condition_every_position_and_samples_do_not_mix():
    net = perturbed(tiny().double()).eval()
    tokens, t, y = random_inputs(net, n=2)
    with torch.no_grad():
        base = net(tokens, t, y)
        other_t = net(tokens, t + torch.tensor([1, 0]), y)
        other_y = net(tokens, t, (y + torch.tensor([1, 0])) % net.num_classes)
    for changed in (other_t, other_y):
        assert (changed[0] - base[0]).abs().amax(0).min() > 0  # every position of sample 0 moved
        torch.testing.assert_close(changed[1], base[1], rtol=0, atol=1e-12)


# -- the null class --------------------------------------------------------------------------------------------------
def test_null_label_without_a_null_row_uses_the_mean_class_embedding():
    net = perturbed(tiny().double()).eval()
    assert (net.null_class, net.class_number) == (net.num_classes, net.num_classes)
    tokens, t, _ = random_inputs(net)
    null = torch.full((3,), net.null_class)
    # the same net with a learned null row set to the mean class row gives the same logits
    learned = tiny(learnable_null=True).double().eval()
    sd = net.state_dict()
    for i in range(net.depth):
        table = sd[f"blocks.{i}.ln2.emb.weight"]
        sd[f"blocks.{i}.ln2.emb.weight"] = torch.cat([table, table.mean(0, keepdim=True)])
    learned.load_state_dict(sd, strict=True)
    with torch.no_grad():
        out = net(tokens, t, null)
        torch.testing.assert_close(out, learned(tokens, t, null), rtol=0, atol=1e-10)
        ref = reference_forward({k: v.detach() for k, v in net.state_dict().items()}, tokens, t, null, **_ref_kw(net))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        # per sample: a mixed batch equals its all-null and all-conditional halves (the official all-null call)
        y = torch.tensor([0, net.null_class, 3])
        mixed = net(tokens, t, y)
        cond = net(tokens, t, torch.tensor([0, 1, 3]))
    torch.testing.assert_close(mixed[1], out[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(mixed[[0, 2]], cond[[0, 2]], rtol=0, atol=1e-12)


def test_learnable_null_is_its_own_row():
    net = perturbed(tiny(learnable_null=True).double()).eval()
    assert (net.null_class, net.class_number) == (5, 6)
    assert net.blocks[0].ln2.emb.weight.shape == (6, 32)
    tokens, t, _ = random_inputs(net)
    null = torch.full((3,), 5)
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(net(tokens, t, null), reference_forward(sd, tokens, t, null, **_ref_kw(net)))


# -- initialisation --------------------------------------------------------------------------------------------------
def official_init_replay(seed: int, k: int, s: int, d: int, depth: int, steps: int, classes: int, hidden: int):
    """The official construction (default inits consume the random stream) then ``apply(_init_weights)``."""
    torch.manual_seed(seed)
    m = {"content_emb.emb": nn.Embedding(k + 1, d)}
    m["content_emb.height_emb"] = nn.Embedding(s, d)
    m["content_emb.width_emb"] = nn.Embedding(s, d)
    for i in range(depth):  # official Block.__init__: ln1, (ln2 placeholder), attn, ln2, mlp
        b = f"blocks.{i}"
        m[f"{b}.ln1.emb"], m[f"{b}.ln1.linear"] = nn.Embedding(steps, d), nn.Linear(d, 2 * d)
        for w in ("key", "query", "value", "proj"):
            m[f"{b}.attn.{w}"] = nn.Linear(d, d)
        m[f"{b}.ln2.emb"], m[f"{b}.ln2.linear"] = nn.Embedding(classes, d), nn.Linear(d, 2 * d)
        m[f"{b}.mlp.conv1"] = nn.Conv2d(d, hidden, 3, padding=1)
        m[f"{b}.mlp.conv2"] = nn.Conv2d(hidden, d, 3, padding=1)
    m["to_logits.0"], m["to_logits.1"] = nn.LayerNorm(d), nn.Linear(d, k)
    # apply() visits modules in registration order: ln1, ln2, attn (key, query, value, proj), mlp (no init)
    order = ["content_emb.emb", "content_emb.height_emb", "content_emb.width_emb"]
    for i in range(depth):
        b = f"blocks.{i}"
        order += [f"{b}.ln1.emb", f"{b}.ln1.linear", f"{b}.ln2.emb", f"{b}.ln2.linear"]
        order += [f"{b}.attn.{w}" for w in ("key", "query", "value", "proj")]
    order.append("to_logits.1")
    for name in order:
        m[name].weight.data.normal_(0.0, 0.02)
        if isinstance(m[name], nn.Linear):
            m[name].bias.data.zero_()
    return {f"{name}.{p}": v for name, mod in m.items() for p, v in mod.state_dict().items()}


def test_init_is_the_official_random_stream():
    kw = dict(TINY)
    torch.manual_seed(7)
    net = VQDiffusion(**kw)
    replay = official_init_replay(7, 11, 8, 32, 2, 7, 5, 128)
    sd = net.state_dict()
    assert set(sd) == set(replay)
    for name, value in sd.items():
        assert torch.equal(value, replay[name]), name
    # and what that means: normal(0.02) tables and linears, zero biases, LN (1, 0), PyTorch-default convs
    for name, p in net.named_parameters():
        if ".mlp.conv" in name:
            continue
        if name.startswith("to_logits.0."):
            assert torch.all(p == (1 if name.endswith("weight") else 0)), name
        elif name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
    conv = net.blocks[0].mlp.conv2.weight
    assert conv.abs().max() <= 1 / math.sqrt(128 * 9) and conv.std() > 0.01  # kaiming-uniform(a=sqrt 5) bound


def test_dropout_only_in_training():
    net = tiny(attn_pdrop=0.3, resid_pdrop=0.3)
    tokens, t, y = random_inputs(net)
    with torch.no_grad():
        e1, e2 = net.eval()(tokens, t, y), net(tokens, t, y)
        tr = net.train()(tokens, t, y)
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    assert not torch.allclose(e1, tr)


# -- one-sentence errors ---------------------------------------------------------------------------------------------
def _bad_inputs():
    ok, t, y = torch.zeros(2, 16, dtype=torch.long), torch.tensor([0, 1]), torch.tensor([0, 1])
    return [
        ("code too big", torch.full((2, 16), 12), t, y, "model.codebook_size"),
        ("negative code", torch.full((2, 16), -1), t, y, "mask_token_id"),
        ("float tokens", torch.zeros(2, 16), t, y, "encode_to_indices"),
        ("too many tokens", torch.zeros(2, 25, dtype=torch.long), t, y, "model.token_size=5"),
        ("not square", torch.zeros(2, 7, dtype=torch.long), t, y, "first_stage.token_size"),
        ("wrong grid", torch.zeros(2, 8, 2, dtype=torch.long), t, y, "4x4"),
        ("t too big", ok, torch.tensor([0, 7]), y, "model.num_timesteps"),
        ("negative t", ok, torch.tensor([-1, 0]), y, "[0, 7)"),
        ("float t", ok, torch.tensor([0.5, 0.1]), y, "step indices"),
        ("t shape", ok, torch.tensor([0, 1, 2]), y, "batch of 2"),
        ("y missing", ok, t, None, "y=labels"),
        ("label too big", ok, t, torch.tensor([0, 6]), "data.num_classes"),
        ("negative label", ok, t, torch.tensor([-1, 0]), "data.num_classes"),
        ("label shape", ok, t, torch.tensor([0, 1, 2]), "one label per image"),
    ]


@pytest.mark.parametrize(("case", "tokens", "t", "y", "fix"), _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_inputs_give_one_sentence_naming_the_fix(case, tokens, t, y, fix):
    net = tiny()
    with pytest.raises((ValueError, TypeError)) as err:
        net(tokens, t, y)
    msg = str(err.value)
    assert msg.startswith("VQ-Diffusion: ") and "\n" not in msg and fix in msg, msg


def test_a_16x16_tokenizer_into_an_8x8_net_names_both_sizes():
    net = VQDiffusion(codebook_size=8, num_classes=2, token_size=8, hidden_size=8, depth=1, num_heads=2)
    with pytest.raises(ValueError) as err:
        net(torch.zeros(1, 16, 16, dtype=torch.long), torch.tensor([0]), torch.tensor([0]))
    msg = str(err.value)
    assert "16x16" in msg and "8x8" in msg and "model.token_size=16" in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("kw", "fix"),
    [
        (dict(num_heads=5), "model.num_heads=4"),
        (dict(depth=0), "model.depth"),
        (dict(codebook_size=0), "first_stage.codebook_size"),
        (dict(token_size=2.5), "first_stage.token_size"),
        (dict(num_classes=-1), "data.num_classes"),
        (dict(spatial_size=3), "model.spatial_size >= 4"),
        (dict(num_timesteps=0), "process"),
        (dict(mlp_type="swiglu"), "model.mlp_type=conv_mlp"),
        (dict(mlp_hidden_times=0), "model.mlp_hidden_times"),
        (dict(learnable_null="yes"), "model.learnable_null"),
        (dict(attn_pdrop=1.0), "model.attn_pdrop"),
        (dict(resid_pdrop=-0.1), "model.resid_pdrop"),
    ],
)
def test_bad_config_gives_one_sentence(kw, fix):
    with pytest.raises(ValueError) as err:
        VQDiffusion(**{**TINY, **kw})
    msg = str(err.value)
    assert msg.startswith("VQ-Diffusion: ") and "\n" not in msg and fix in msg, msg


# -- configs ---------------------------------------------------------------------------------------------------------
def test_tiny_config_composes_with_the_vq_tokenizer_and_fashion_mnist():
    cfg = compose(["model=vq_diffusion_tiny", "first_stage=vq_small", "data=fashion_mnist"])
    net = instantiate(cfg.model)
    assert isinstance(net, VQDiffusion)
    assert (net.codebook_size, net.token_size, net.spatial_size, net.num_classes) == (512, 8, 8, 10)
    assert (net.depth, net.hidden_size, net.num_heads, net.num_timesteps, net.mlp_type) == (2, 32, 2, 100, "conv_mlp")
    assert (net.mask_token_id, net.null_class, net.num_tokens) == (512, 10, 64)
    tokens = torch.randint(0, 513, (2, 8, 8))
    out = net.eval()(tokens, torch.tensor([0, 99]), torch.tensor([3, 10]))
    assert out.shape == (2, 512, 64)


def test_small_and_imagenet_config_sizes():
    cfg = compose(["model=vq_diffusion_s", "first_stage=vq_small", "data=fashion_mnist"])
    with torch.device("meta"):
        net = instantiate(cfg.model)
    assert (net.depth, net.hidden_size, net.num_heads, net.mlp_hidden_times) == (4, 192, 6, 2)
    assert n_params(net) == 6_781_760
    cfg = compose(
        [
            "model=vq_diffusion_imagenet",
            "first_stage=vqgan_f16_1024",
            "data.num_classes=1000",
            "model.codebook_size=974",
        ]
    )
    with torch.device("meta"):
        net = instantiate(cfg.model)
    assert (net.token_size, net.spatial_size, net.depth, net.hidden_size, net.num_heads) == (16, 32, 24, 512, 16)
    assert n_params(net) == 518_025_678
