"""The DiT LightningModule's pieces: EMA, learning (overfit), sampling, schedules, atomic checkpoints."""

from __future__ import annotations

import csv
import os
import time

import pytest
import torch

from lightgen.diffusion import GaussianDiffusionProcess, create_diffusion
from lightgen.first_stage import IdentityFirstStage
from lightgen.methods import DiffusionModule
from lightgen.methods.ema import make_ema, update_ema
from lightgen.methods.lr_schedules import warmup_cosine
from lightgen.nets.dit import DiT
from lightgen.utils.checkpoints import AtomicCheckpointIO, find_resume_checkpoint
from lightgen.utils.errors import LightgenConfigError
from lightgen.utils.grads import grad_norm


def tiny_net(**kw):
    args = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=4)
    return DiT(**{**args, **kw})


def test_ema_starts_as_exact_frozen_copy_and_follows_the_dit_formula():
    net = tiny_net()
    for p in net.parameters():
        p.data.normal_()
    ema = make_ema(net)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), net.parameters()))
    assert not any(p.requires_grad for p in ema.parameters()) and not ema.training
    before = {k: v.clone() for k, v in ema.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    update_ema(ema, net, 0.9)
    for k, p in net.named_parameters():
        torch.testing.assert_close(dict(ema.named_parameters())[k], 0.9 * before[k] + 0.1 * p, rtol=0, atol=1e-6)
    # the frozen pos_embed is averaged too (DiT averages every parameter)
    assert "pos_embed" in dict(ema.named_parameters())


def test_tiny_dit_overfits_a_handful_of_images():
    torch.manual_seed(0)
    net = tiny_net(class_dropout_prob=0.0)
    diffusion = create_diffusion("")
    x0 = torch.rand(8, 1, 16, 16) * 2 - 1
    y = torch.arange(8) % 4
    probe_t = torch.linspace(0, 999, 8).long()
    probe_noise = torch.randn_like(x0)

    def probe():
        with torch.no_grad():
            return diffusion.training_losses(net, x0, probe_t, {"y": y}, noise=probe_noise)["mse"].mean().item()

    start = probe()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for _ in range(200):
        t = torch.randint(0, 1000, (8,))
        loss = diffusion.training_losses(net, x0, t, {"y": y})["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = probe()
    assert start > 0.9  # zero-initialised output: eps-MSE starts at E[eps^2] = 1
    assert end < 0.5 * start, (start, end)


def _module(channels: int = 1, **kw):
    net = tiny_net(in_channels=channels)
    return DiffusionModule(
        net=net,
        process=GaussianDiffusionProcess(),
        first_stage=IdentityFirstStage(channels=channels, image_size=16),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4),
        **kw,
    )


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_generate_is_deterministic_per_seed_and_shaped_like_the_data(sampler):
    m = _module()
    for p in m.ema.parameters():  # a non-trivial net so samples depend on the labels
        p.data.normal_(0, 0.02)
    y = torch.tensor([0, 1, 2, 3])
    a = m.generate(y, cfg_scale=4.0, steps=5, sampler=sampler, generator=torch.Generator().manual_seed(1))
    b = m.generate(y, cfg_scale=4.0, steps=5, sampler=sampler, generator=torch.Generator().manual_seed(1))
    c = m.generate(y, cfg_scale=4.0, steps=5, sampler=sampler, generator=torch.Generator().manual_seed(2))
    assert a.shape == (4, 1, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    u = m.generate(y, cfg_scale=1.0, steps=5, sampler=sampler, generator=torch.Generator().manual_seed(1))
    assert u.shape == a.shape and not torch.equal(u, a)


def test_generate_rejects_unknown_sampler():
    choices = "use one of ddpm, ddim, dpmpp_2m, unipc, euler"
    with pytest.raises(ValueError, match=choices):
        _module().generate(torch.tensor([0]), sampler="heun", steps=2)
    with pytest.raises(ValueError, match=choices):
        _module(sampling={"sampler": "heun"})  # bad defaults fail when the module is built
    with pytest.raises(ValueError, match="unknown sampling setting"):
        _module().generate(torch.tensor([0]), sampling_steps=2)


def _official_forward_with_cfg(net, x, t, y, cfg_scale):
    """facebookresearch/DiT models.py ``forward_with_cfg``, written out as the official code does it."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = net.forward(combined, t, y)
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guided_sampling_is_the_official_dit_loop_bit_for_bit(sampler):
    """The process + guider reproduce DiT's sample.py: z doubled, y_null = 1000, forward_with_cfg.

    On 4 latent channels, as the official code (on a 1-channel pixel model its slice ``[:, :3]`` would also
    take the variance channel; lightgen guides the one ε channel there).
    """
    m = _module(channels=4)
    for p in m.ema.parameters():
        p.data.normal_(0, 0.02)
    y = torch.tensor([0, 3, 1])
    ours = m.generate(y, cfg_scale=4.0, steps=6, sampler=sampler, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 4, 16, 16, generator=g)
    z = torch.cat([z, z])
    y_null = torch.full_like(y, m.ema.num_classes)
    kwargs = dict(y=torch.cat([y, y_null]), cfg_scale=4.0)
    diffusion = create_diffusion(f"ddim{6}" if sampler == "ddim" else "6")
    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    ref = loop(
        lambda x, t, **kw: _official_forward_with_cfg(m.ema, x, t, **kw),
        z.shape,
        noise=z,
        clip_denoised=False,
        model_kwargs=kwargs,
        generator=g,
    )[:3]
    assert torch.equal(ours, ref)


def test_process_owns_the_training_draws():
    """training_losses draws t itself from the global RNG, then the hybrid loss: equal to doing it by hand."""
    m = _module()
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    y = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(3)
    loss, terms = m.process.training_losses(m.net, x0, {"y": y})
    torch.manual_seed(3)
    t = torch.randint(0, 1000, (4,))
    ref = m.process.diffusion.training_losses(m.net, x0, t, model_kwargs={"y": y})
    assert torch.equal(loss, ref["loss"].mean()) and set(terms) == {"loss", "mse", "vb"}
    assert torch.equal(terms["mse"], ref["mse"].mean())


def test_grad_norm_is_the_global_l2_norm_in_one_fused_pass():
    net = tiny_net()
    net(torch.randn(3, 1, 16, 16), torch.rand(3) * 999, torch.tensor([0, 1, 2])).square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    expected = torch.sqrt(sum(g.double().square().sum() for g in grads)).float()
    torch.testing.assert_close(grad_norm(net.parameters()), expected, rtol=1e-5, atol=0)
    half = [torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))]
    half[0].grad = torch.full((4,), 3.0, dtype=torch.bfloat16)
    assert grad_norm(half).dtype == torch.float32 and grad_norm(half).item() == 6.0
    assert grad_norm([torch.nn.Parameter(torch.ones(2))]) is None


def test_bad_ema_decay_is_refused():
    with pytest.raises(ValueError, match="ema_decay"):
        _module(ema_decay=1.0)


def test_warmup_cosine_closed_form():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = []
    for _ in range(111):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lrs[110] == pytest.approx(0.1)


def test_atomic_checkpoint_write_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    good = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2}, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "no partial file is left behind"


def _fake_ckpt(path, step):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.full((2,), float(step))}, "global_step": step}, path)
    return path


def test_find_resume_checkpoint_prefers_the_newest(tmp_path):
    assert find_resume_checkpoint(tmp_path) is None
    last = _fake_ckpt(tmp_path / "checkpoints" / "last.ckpt", 3)
    _fake_ckpt(tmp_path / "checkpoints" / "step_0000002.ckpt", 2)
    assert find_resume_checkpoint(tmp_path) == last
    hpc = _fake_ckpt(tmp_path / "hpc_ckpt_1.ckpt", 4)
    os.utime(hpc, (time.time() + 10, time.time() + 10))
    assert find_resume_checkpoint(tmp_path) == hpc


@pytest.mark.parametrize(
    "damage, phrase",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "probably truncated"),
        (lambda p: p.write_bytes(b""), "it is empty"),
        (lambda p: p.write_text("not a checkpoint at all\n"), "probably truncated"),
        (lambda p: torch.save({"model": {}}, p), "not a lightgen training checkpoint"),
    ],
    ids=["truncated", "zero-bytes", "text", "foreign-dict"],
)
def test_a_damaged_last_ckpt_falls_back_to_the_newest_readable_periodic_one(tmp_path, damage, phrase):
    ckpts = tmp_path / "checkpoints"
    _fake_ckpt(ckpts / "step_0000002.ckpt", 2)
    newest = _fake_ckpt(ckpts / "step_0000004.ckpt", 4)
    last = _fake_ckpt(ckpts / "last.ckpt", 5)
    damage(last)
    warnings_seen = []
    assert find_resume_checkpoint(tmp_path, warn=warnings_seen.append) == newest
    assert len(warnings_seen) == 1 and str(last) in warnings_seen[0] and str(newest) in warnings_seen[0]
    assert phrase in warnings_seen[0]
    newest.write_bytes(b"")  # the newest periodic one is damaged too: the next one
    assert find_resume_checkpoint(tmp_path, warn=warnings_seen.append).name == "step_0000002.ckpt"


def test_no_readable_checkpoint_stops_with_one_sentence_instead_of_a_fresh_start(tmp_path):
    ckpts = tmp_path / "checkpoints"
    _fake_ckpt(ckpts / "last.ckpt", 5).write_bytes(b"")
    _fake_ckpt(ckpts / "step_0000004.ckpt", 4).write_bytes(b"\x00" * 10)
    with pytest.raises(LightgenConfigError, match=r"no checkpoint in .* can be read \(last.ckpt: it is empty; "):
        find_resume_checkpoint(tmp_path)


def _compiler_available() -> bool:
    import shutil

    return hasattr(torch, "compile") and shutil.which("g++") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _compiler_available(), reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_training_matches_eager_losses_and_keeps_the_checkpoint_layout(tmp_path):
    from conftest import SMOKE, run_cli

    common = [
        *SMOKE,
        "callbacks.sample_grid=null",
        "trainer.max_steps=20",
        "callbacks.checkpoint.every_n_train_steps=20",
    ]
    run_cli("train", *common, f"hydra.run.dir={tmp_path / 'eager'}")
    run_cli("train", *common, "method.compile=true", f"hydra.run.dir={tmp_path / 'compiled'}")

    def losses(run):
        rows = list(csv.DictReader(open(run / "metrics.csv")))
        return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}

    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == list(range(20))
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4), step
    a, b = (
        torch.load(r / "checkpoints" / "last.ckpt", weights_only=False)
        for r in (tmp_path / "eager", tmp_path / "compiled")
    )
    assert list(a["state_dict"]) == list(b["state_dict"]), "compiling in place keeps the state-dict keys"


def test_adam_takes_the_fused_kernel_only_for_cuda_parameters_when_the_config_leaves_it_open():
    from functools import partial
    from types import SimpleNamespace

    from lightgen.methods.base import fused_on_cuda

    cuda = [SimpleNamespace(device=torch.device("cuda", 0))] * 2  # only the device is read
    cpu = [torch.nn.Parameter(torch.zeros(1))]
    assert fused_on_cuda(partial(torch.optim.AdamW, lr=1e-4), cuda) == {"fused": True}
    assert fused_on_cuda(partial(torch.optim.Adam, lr=1e-4), cuda) == {"fused": True}
    assert fused_on_cuda(partial(torch.optim.AdamW, lr=1e-4), cpu) == {}
    assert fused_on_cuda(partial(torch.optim.AdamW, lr=1e-4), cuda + cpu) == {}
    assert fused_on_cuda(partial(torch.optim.AdamW, fused=False), cuda) == {}  # the config decides
    assert fused_on_cuda(partial(torch.optim.AdamW, foreach=True), cuda) == {}
    assert fused_on_cuda(partial(torch.optim.SGD, lr=0.1), cuda) == {}
    module = DiffusionModule(
        net=tiny_net(),
        process=GaussianDiffusionProcess(),
        first_stage=IdentityFirstStage(channels=1, image_size=16),
        optimizer=partial(torch.optim.AdamW, lr=1e-4),
    )
    assert not module.configure_optimizers().defaults["fused"]  # the CPU keeps torch's default path


@pytest.mark.parametrize("experiment", ["quickstart_maskgit", "quickstart_vqdiffusion"])
def test_token_nets_trace_to_one_graph_without_host_syncs(experiment):
    """Input checks that read values on the host (ids, labels, timesteps) run in eager mode only: under
    ``torch.compile`` each would split the graph and sync with the device in every forward."""
    from conftest import compose
    from hydra.utils import instantiate

    net = instantiate(compose([f"experiment={experiment}"]).model).eval()
    tokens = torch.randint(0, net.codebook_size, (2, net.num_tokens))
    t = torch.zeros(2, dtype=torch.long) if experiment == "quickstart_vqdiffusion" else None
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net)(tokens, t, y=torch.tensor([1, 2]))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    with pytest.raises(ValueError, match="token id"):  # eager mode still names a bad id in one sentence
        net(torch.full_like(tokens, -1), t, y=torch.tensor([1, 2]))
