"""MaskGIT's token transformer (lightgen.nets.maskgit) against the official Flax layout, as specifications.

The official model is google-research/maskgit ``maskgit/nets/maskgit_transformer.py``: a post-LN BERT
encoder (tanh GELU, LayerNorm eps 1e-12, truncated-normal init) whose MLM head is tied to the word
embeddings; the class token ``K + label`` is prepended to the image tokens and the mask token is the
last vocabulary row.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose
from hydra.utils import instantiate
from torch import nn

from lightgen.nets import MaskGIT

TINY = dict(codebook_size=24, num_classes=5, token_size=3, hidden_size=32, depth=2, num_heads=4, mlp_dim=48)
BASE = dict(hidden_size=768, depth=24, num_heads=16, mlp_dim=3072, dropout=0.1, attention_dropout=0.1)


def tiny(**kw) -> MaskGIT:
    torch.manual_seed(0)
    return MaskGIT(**{**TINY, **kw})


def random_tokens(net: MaskGIT, n: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, net.codebook_size, (n, net.num_tokens), generator=g)
    tokens[torch.rand(tokens.shape, generator=g) < 0.4] = net.mask_token_id
    return tokens


# -- sizes and interface ---------------------------------------------------------------------------------------------
def test_official_imagenet_size_has_the_hand_counted_parameters():
    with torch.device("meta"):
        net = MaskGIT(codebook_size=1024, num_classes=1000, token_size=16, **BASE)
    d, mlp, vocab = 768, 3072, 1024 + 1000 + 1
    assert (net.vocab_size, net.seq_len, net.num_tokens, net.mask_token_id) == (vocab, 257, 256, 2024)

    def count(prefix: str) -> int:
        return sum(p.numel() for name, p in net.named_parameters() if name.startswith(prefix))

    layer = 4 * (d * d + d) + 2 * d + (d * mlp + mlp) + (mlp * d + d) + 2 * d
    assert layer == 7_087_872
    assert count("embed.word_embeddings.") == 2025 * 768
    assert count("embed.position_embeddings.") == 257 * 768
    assert count("embed.embeddings_ln.") == 2 * 768
    assert all(count(f"layers.{i}.") == layer for i in range(24))
    assert count("mlm_layer.mlm_dense.") == 768 * 768 + 768
    assert count("mlm_layer.mlm_ln.") == 2 * 768
    assert count("mlm_layer.mlm_bias.") == 2025
    total = 2025 * 768 + 257 * 768 + 2 * 768 + 24 * layer + (768 * 768 + 768) + 2 * 768 + 2025
    assert total == 172_457_193
    assert sum(p.numel() for p in net.parameters()) == total

    with torch.device("meta"):
        cfg_net = MaskGIT(codebook_size=1024, num_classes=1000, token_size=16, cfg_dropout=0.1, **BASE)
    assert (
        sum(p.numel() for p in cfg_net.parameters()) == total + 768 + 1
    )  # one null-class row: embedding row + its mlm_bias entry
    assert (cfg_net.vocab_size, cfg_net.mask_token_id, cfg_net.null_class) == (2026, 2025, 1000)


def test_state_dict_names_are_the_flax_names():
    net = tiny(depth=1)
    per_layer = [
        "attention.self_attention.query",
        "attention.self_attention.key",
        "attention.self_attention.value",
        "attention.self_attention.out",
        "attention.attention_output_ln",
        "mlp.intermediate_output",
        "mlp.layer_output",
        "mlp.layer_output_ln",
    ]
    expected = {"embed.word_embeddings.weight", "embed.position_embeddings.weight", "mlm_layer.mlm_bias.bias"}
    expected |= {
        f"{m}.{p}"
        for m in ("embed.embeddings_ln", "mlm_layer.mlm_dense", "mlm_layer.mlm_ln")
        for p in ("weight", "bias")
    }
    expected |= {f"layers.0.{m}.{p}" for m in per_layer for p in ("weight", "bias")}
    assert set(net.state_dict()) == expected  # tied head: no second copy of the embedding matrix


def test_interface_attributes_and_token_space():
    net = tiny()
    assert (net.codebook_size, net.num_classes, net.token_size, net.num_tokens) == (24, 5, 3, 9)
    assert net.vocab_size == 24 + 5 + 1 and net.mask_token_id == net.vocab_size - 1
    assert net.null_class is None and net.seq_len == 10
    assert net.embed.position_embeddings.weight.shape[0] == net.seq_len
    cfg = tiny(cfg_dropout=0.2)
    assert cfg.vocab_size == 24 + 5 + 2 and cfg.mask_token_id == 30 and cfg.null_class == 5
    assert cfg.class_tokens(torch.tensor([5])).item() == 24 + 5  # null token sits before the mask row


# -- forward against a plain-torch reference ---------------------------------------------------------------------------
def reference_forward(
    sd: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    y: torch.Tensor,
    *,
    codebook_size: int,
    depth: int,
    num_heads: int,
    eps: float = 1e-12,
    pre_ln: bool = False,
    untie: torch.Tensor | None = None,
    append_class: bool = False,
    exact_gelu: bool = False,
) -> torch.Tensor:
    """The official forward written out from the state dict (eval: no dropout); flags break it on purpose."""

    def ln(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]

    def dense(x, name):
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def gelu(x):
        if exact_gelu:
            return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    cls = (y + codebook_size)[:, None]
    ids = torch.cat([tokens, cls], 1) if append_class else torch.cat([cls, tokens], 1)
    word = sd["embed.word_embeddings.weight"]
    x = ln(word[ids] + sd["embed.position_embeddings.weight"][: ids.shape[1]][None], "embed.embeddings_ln")
    n, length, d = x.shape
    hd = d // num_heads
    for i in range(depth):
        p = f"layers.{i}"

        def attn(h, p=p):
            q, k, v = (
                dense(h, f"{p}.attention.self_attention.{w}").view(n, length, num_heads, hd).transpose(1, 2)
                for w in ("query", "key", "value")
            )
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
            o = (probs @ v).transpose(1, 2).reshape(n, length, d)
            return dense(o, f"{p}.attention.self_attention.out")

        def mlp(h, p=p):
            return dense(gelu(dense(h, f"{p}.mlp.intermediate_output")), f"{p}.mlp.layer_output")

        if pre_ln:
            x = x + attn(ln(x, f"{p}.attention.attention_output_ln"))
            x = x + mlp(ln(x, f"{p}.mlp.layer_output_ln"))
        else:
            x = ln(x + attn(x), f"{p}.attention.attention_output_ln")
            x = ln(x + mlp(x), f"{p}.mlp.layer_output_ln")
    h = ln(gelu(dense(x, "mlm_layer.mlm_dense")), "mlm_layer.mlm_ln")
    out_matrix = word if untie is None else untie
    logits = h @ out_matrix.T + sd["mlm_layer.mlm_bias.bias"]
    return logits[:, :-1] if append_class else logits[:, 1:]


def perturbed(net: MaskGIT) -> MaskGIT:
    """Non-trivial LayerNorm and bias parameters, so every parameter shows in the output."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias") or "_ln." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def test_forward_equals_the_plain_torch_reference_in_float64():
    net = perturbed(tiny().double()).eval()
    tokens, y = random_tokens(net), torch.tensor([0, 3, 4])
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    kw = dict(codebook_size=net.codebook_size, depth=net.depth, num_heads=net.num_heads)
    with torch.no_grad():
        out = net(tokens, None, y=y)
        ref = reference_forward(sd, tokens, y, **kw)
        assert out.dtype == torch.float64 and out.shape == (3, net.num_tokens, net.vocab_size)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        # the reference is discriminating: each departure from the official layout moves the logits
        g = torch.Generator().manual_seed(5)
        untied = 0.02 * torch.randn(sd["embed.word_embeddings.weight"].shape, generator=g, dtype=torch.float64)
        for broken in (dict(pre_ln=True), dict(untie=untied), dict(append_class=True), dict(exact_gelu=True)):
            assert (reference_forward(sd, tokens, y, **kw, **broken) - out).abs().max() > 1e-6, broken


def test_grid_input_is_flattened_row_major_and_t_is_ignored():
    net = tiny().eval()
    tokens, y = random_tokens(net), torch.tensor([1, 2, 3])
    with torch.no_grad():
        flat = net(tokens, None, y=y)
        grid = net(tokens.view(3, 3, 3), torch.tensor([0.5, 0.1, 0.9]), y=y)
        int32 = net(tokens.int(), torch.zeros(3), y=y.int())
    torch.testing.assert_close(flat, grid, rtol=0, atol=0)
    torch.testing.assert_close(flat, int32, rtol=0, atol=0)


def test_class_token_is_prepended_and_conditions_every_position():
    net = perturbed(tiny().double()).eval()
    tokens = random_tokens(net, n=2)
    with torch.no_grad():
        a = net(tokens, None, y=torch.tensor([0, 0]))
        b = net(tokens, None, y=torch.tensor([1, 0]))
    assert a.shape == (2, net.num_tokens, net.vocab_size)  # position 0 (the class) is not in the output
    assert (a[0] - b[0]).abs().amax(-1).min() > 0  # every image position sees the class
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-12)  # samples do not mix
    # the class sits at position 0: the same ids with the class moved to the end give other logits
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    kw = dict(codebook_size=net.codebook_size, depth=net.depth, num_heads=net.num_heads)
    y = torch.tensor([0, 0])
    assert (reference_forward(sd, tokens, y, **kw, append_class=True) - a).abs().max() > 1e-6


def test_dropout_only_in_training():
    net = tiny()
    tokens, y = random_tokens(net), torch.tensor([0, 1, 2])
    with torch.no_grad():
        net.eval()
        e1, e2 = net(tokens, None, y=y), net(tokens, None, y=y)
        net.train()
        t1 = net(tokens, None, y=y)
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    assert not torch.allclose(e1, t1)
    quiet = tiny(dropout=0.0, attention_dropout=0.0)
    with torch.no_grad():
        torch.testing.assert_close(quiet.train()(tokens, None, y=y), quiet.eval()(tokens, None, y=y))


# -- initialisation --------------------------------------------------------------------------------------------------
def test_init_is_the_official_truncated_normal_with_zero_biases_and_bert_layernorms():
    torch.manual_seed(0)
    net = MaskGIT(codebook_size=512, num_classes=10, token_size=8, hidden_size=256, depth=2, num_heads=8, mlp_dim=1024)
    truncated_std = 0.02 * 0.8796  # std of N(0, 0.02^2) truncated at +-2 sigma (Flax truncated_normal(-2, 2))
    for name, p in net.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "_ln." in name:
            assert torch.all(p == 1), name
        else:  # dense kernels and both embedding tables
            assert p.abs().max() <= 0.04, name
            assert abs(p.std().item() - truncated_std) < 0.1 * truncated_std, (name, p.std().item())
    lns = [m for m in net.modules() if isinstance(m, nn.LayerNorm)]
    assert len(lns) == 1 + 2 * 2 + 1 and all(m.eps == 1e-12 for m in lns)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 6 + 1


# -- classifier-free guidance label dropout --------------------------------------------------------------------------
def test_cfg_dropout_one_replaces_every_label_by_the_null_class_in_training():
    net = tiny(cfg_dropout=1.0, dropout=0.0, attention_dropout=0.0)
    tokens = random_tokens(net)
    with torch.no_grad():
        train = net.train()(tokens, None, y=torch.tensor([0, 2, 4]))
        null = net.eval()(tokens, None, y=torch.full((3,), net.null_class))
        cond = net.eval()(tokens, None, y=torch.tensor([0, 2, 4]))
    torch.testing.assert_close(train, null, rtol=0, atol=0)
    assert not torch.allclose(cond, null)


def test_cfg_dropout_draws_from_the_global_generator_like_label_embedder():
    net = tiny(cfg_dropout=0.5)
    y = torch.arange(5).repeat(40)
    torch.manual_seed(7)
    dropped = net.token_drop(y)
    torch.manual_seed(7)
    expected = torch.where(torch.rand(y.shape[0]) < 0.5, torch.full_like(y, 5), y)
    assert torch.equal(dropped, expected) and 0 < (dropped == 5).sum() < y.numel()


def test_no_cfg_dropout_means_no_null_row():
    net = tiny()
    assert net.null_class is None and net.vocab_size == 24 + 5 + 1
    with pytest.raises(ValueError, match="must be in \\[0, 5\\)"):
        net(random_tokens(net), None, y=torch.tensor([0, 1, 5]))


# -- one-sentence errors ---------------------------------------------------------------------------------------------
def _bad_inputs():
    ok = torch.zeros(2, 9, dtype=torch.long)
    y = torch.tensor([0, 1])
    return [
        ("too long", torch.zeros(2, 16, dtype=torch.long), y, "model.token_size=4"),
        ("grid too long", torch.zeros(2, 4, 4, dtype=torch.long), y, "first_stage.token_size"),
        ("not square", torch.zeros(2, 7, dtype=torch.long), y, "model.token_size"),
        ("code too big", torch.full((2, 9), 24), y, "model.codebook_size"),
        ("negative code", torch.full((2, 9), -1), y, "mask_token_id"),
        ("float tokens", torch.zeros(2, 9), y, "encode_to_indices"),
        ("y missing", ok, None, "y=labels"),
        ("label too big", ok, torch.tensor([0, 5]), "data.num_classes"),
        ("negative label", ok, torch.tensor([-1, 0]), "data.num_classes"),
        ("label shape", ok, torch.tensor([0, 1, 2]), "one label per image"),
    ]


@pytest.mark.parametrize(("case", "tokens", "y", "fix"), _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_inputs_give_one_sentence_naming_the_fix(case, tokens, y, fix):
    net = tiny()
    with pytest.raises((ValueError, TypeError)) as err:
        net(tokens, None, y=y)
    msg = str(err.value)
    assert msg.startswith("MaskGIT: ") and "\n" not in msg and fix in msg, msg


def test_a_16x16_tokenizer_into_an_8x8_net_names_both_sizes():
    net = MaskGIT(codebook_size=8, num_classes=2, token_size=8, hidden_size=8, depth=1, num_heads=2, mlp_dim=8)
    with pytest.raises(ValueError) as err:
        net(torch.zeros(1, 16, 16, dtype=torch.long), None, y=torch.tensor([0]))
    msg = str(err.value)
    assert "16x16" in msg and "8x8" in msg and "longer than" in msg and "model.token_size=16" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("kw", "fix"),
    [
        (dict(num_heads=5), "model.num_heads=4"),
        (dict(depth=0), "model.depth"),
        (dict(codebook_size=0), "first_stage.codebook_size"),
        (dict(token_size=2.5), "first_stage.token_size"),
        (dict(num_classes=-1), "data.num_classes"),
        (dict(dropout=1.0), "model.dropout"),
        (dict(attention_dropout=-0.1), "model.attention_dropout"),
        (dict(cfg_dropout=1.5), "model.cfg_dropout"),
        (dict(layer_norm_eps=0), "model.layer_norm_eps"),
        (dict(init_std=-1.0), "model.init_std"),
    ],
)
def test_bad_config_gives_one_sentence(kw, fix):
    with pytest.raises(ValueError) as err:
        MaskGIT(**{**TINY, **kw})
    msg = str(err.value)
    assert msg.startswith("MaskGIT: ") and "\n" not in msg and fix in msg, msg


# -- configs ---------------------------------------------------------------------------------------------------------
def test_tiny_config_composes_with_the_vq_tokenizer_and_fashion_mnist():
    cfg = compose(["model=maskgit_tiny", "first_stage=vq_small", "data=fashion_mnist"])
    net = instantiate(cfg.model)
    assert isinstance(net, MaskGIT)
    assert (net.codebook_size, net.token_size, net.num_classes) == (512, 8, 10)
    assert (net.depth, net.hidden_size, net.num_heads, net.mlp_dim, net.null_class) == (2, 32, 2, 64, None)
    out = net.eval()(torch.randint(0, 512, (2, 8, 8)), None, y=torch.tensor([0, 9]))
    assert out.shape == (2, 64, 512 + 10 + 1)


def test_a_maskgit_model_selects_a_vq_first_stage_unless_told_otherwise():
    assert compose(["model=maskgit_s"]).first_stage.name == "vq_small"
    cfg = compose(["model=maskgit_base", "first_stage=vqgan_f16_1024", "data.num_classes=1000"])
    with torch.device("meta"):
        net = instantiate(cfg.model)
    assert (net.codebook_size, net.token_size, net.depth, net.hidden_size) == (1024, 16, 24, 768)
    assert sum(p.numel() for p in net.parameters()) == 172_457_193


def test_small_config_size():
    cfg = compose(["model=maskgit_s", "model.cfg_dropout=0.1"])
    with torch.device("meta"):
        net = instantiate(cfg.model)
    assert (net.depth, net.hidden_size, net.num_heads, net.mlp_dim, net.dropout) == (4, 192, 6, 768, 0.1)
    assert sum(p.numel() for p in net.parameters()) == 1_930_699 + 192 + 1 and net.null_class == 10
