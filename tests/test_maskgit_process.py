"""MaskGIT's token process (lightgen.diffusion.maskgit) and mask schedules (lightgen.diffusion.mask_schedules).

Specifications from the official code (google-research/maskgit: libml/mask_schedule.py, libml/losses.py,
libml/parallel_decode.py) and exact parity with diffusers' AmusedScheduler for the same generator. The nets
here are small fakes with the MaskGIT net protocol (codebook_size, mask_token_id, num_tokens, null_class;
net(tokens, t, y=...) -> logits (N, L, V), V >= K + 1).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose
from torch import nn

from lightgen.diffusion import MASK_SCHEDULES, Guider, MaskGITProcess, MaskSchedule

K = 16  # codebook size of the fake nets


class FakeNet(nn.Module):
    """Deterministic logits from a fixed table (position × code), the label and the masked count.

    The columns >= K (the mask id K and a class id K + 1) get huge logits: they would win every draw if the
    process did not cut the logits to the K codes. Every call's inputs and outputs are recorded.
    """

    def __init__(self, num_tokens: int, codebook_size: int = K, null_class: int | None = 10, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.codebook_size = codebook_size
        self.mask_token_id = codebook_size
        self.num_tokens = num_tokens
        self.null_class = null_class
        self.table = 2.0 * torch.randn(num_tokens, codebook_size, generator=g)
        self.label_table = torch.randn(16, codebook_size, generator=g)
        self.calls: list[dict] = []

    def forward(self, tokens, t, y=None):
        n = tokens.shape[0]
        masked = (tokens == self.mask_token_id).float().mean(dim=1)
        codes = self.table[None] + self.label_table[y][:, None] + 0.3 * masked[:, None, None]
        extra = torch.full((n, self.num_tokens, 2), 50.0)
        out = torch.cat([codes, extra], dim=-1)
        self.calls.append({"tokens": tokens.clone(), "t": t.clone(), "y": y.clone(), "out": out.clone()})
        return out


def make_process(name: str = "cosine", **kwargs) -> MaskGITProcess:
    return MaskGITProcess(MaskSchedule(name), **kwargs)


def run_sampler(net, n=2, steps=8, scale=1.0, seed=0, temp=4.5, process=None, labels=None):
    process = process or make_process()
    guider = Guider(scale=scale, schedule="linear", on="logits", num_timesteps=process.num_timesteps)
    y = labels if labels is not None else torch.arange(n) % 10
    gen = torch.Generator().manual_seed(seed)
    out = process.sample(
        net, (n, net.num_tokens), {"y": y}, guider, generator=gen, steps=steps, choice_temperature=temp
    )
    return out


def one_sentence(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.endswith("."), msg
    return msg


# -- mask schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 0.999])
def test_schedules_match_their_closed_forms(r):
    n = 256
    closed = {
        "cosine": math.cos(math.pi * r / 2),
        "linear": 1 - r,
        "square": 1 - r**2,
        "cubic": 1 - r**3,
        "sqrt": 1 - r**0.5,
        "log": (-math.log2(r) / math.log2(n)) if r > 0 else math.inf,
        "exp": 1 - 2 ** (-math.log2(n) * (1 - r)),
    }
    assert set(closed) == set(MASK_SCHEDULES)
    for name, value in closed.items():
        for arg in (r, torch.tensor([r]), torch.tensor([r], dtype=torch.float32)):
            got = MaskSchedule(name)(arg, n)
            assert got.dtype == torch.float32
            assert float(got.reshape(-1)[0]) == pytest.approx(min(max(value, 1e-6), 1.0), rel=1e-6, abs=1e-7), name


def test_schedules_are_clipped_to_official_range():
    n = 1024
    one = torch.tensor([1.0])
    for name in MASK_SCHEDULES:
        assert float(MaskSchedule(name)(one, n)[0]) == pytest.approx(1e-6, rel=1e-6), name  # all reach 0 at r=1
    assert float(MaskSchedule("log")(torch.tensor([0.0]), n)[0]) == 1.0  # -log2(0) = inf, clipped
    assert float(MaskSchedule("exp")(0.0, n)) == pytest.approx(1 - 1 / n)
    r = torch.rand(1000)
    for name in MASK_SCHEDULES:
        g = MaskSchedule(name)(r, n)
        assert g.min() >= torch.tensor(1e-6, dtype=torch.float32) and g.max() <= 1.0


def test_schedules_compute_in_float32_as_the_official_jax_code():
    # decoding's Python-float ratio 8/12: pi/3 rounded to float32 before the cosine, as jax.lax.cos does
    g = MaskSchedule("cosine")(8 / 12)
    assert g.dtype == torch.float32 and float(g) == pytest.approx(0.49999997, abs=1e-8) and float(g) < 0.5
    assert int(torch.floor(torch.tensor(1024) * g)) == 511
    assert math.floor(1024 * math.cos(math.pi / 2 * 8 / 12)) == 512  # float64 maths (the list) gives 512
    # a float32 ratio (training) stays float32 throughout
    r32 = torch.tensor([8 / 12], dtype=torch.float32)
    assert MaskSchedule("cosine")(r32).dtype == torch.float32
    assert float(MaskSchedule("linear")(r32)[0]) == float(torch.tensor(1.0) - r32[0])


def test_mask_schedule_config_marker_and_repr():
    s = MaskSchedule("square", kind="mask")
    assert s.kind == "mask" and s.name == "square" and repr(s) == "MaskSchedule('square')"


# -- decoding: masked counts, parity with diffusers -----------------------------------------------


def masked_counts(net) -> list[int]:
    """The masked count in the state after each step (= the input of the next call), per sample 0."""
    mask_id = net.mask_token_id
    return [int((c["tokens"][0] == mask_id).sum()) for c in net.calls[1:]]


@pytest.mark.parametrize(
    "steps,length,expected",
    [
        (8, 256, [251, 236, 212, 181, 142, 97, 49]),
        # official float32: 511 after step 8 (float64 maths, as in the issue text, would say 512)
        (12, 1024, [1015, 989, 946, 886, 812, 724, 623, 511, 391, 265, 133]),
    ],
)
def test_masked_counts_after_each_step(steps, length, expected):
    net = FakeNet(length)
    out = run_sampler(net, n=2, steps=steps)
    assert len(net.calls) == steps
    assert masked_counts(net) == expected
    for c in net.calls[1:]:  # every sample follows the same count
        counts = (c["tokens"] == net.mask_token_id).sum(dim=1)
        assert counts[0] == counts[1]
    assert int((out == net.mask_token_id).sum()) == 0  # 0 masked in the output


@pytest.mark.parametrize("steps,length,seed", [(8, 256, 0), (12, 1024, 3), (3, 64, 7), (1, 16, 1)])
def test_parity_with_diffusers_amused_scheduler(steps, length, seed):
    from diffusers import AmusedScheduler

    net = FakeNet(length, seed=seed)
    y = torch.tensor([1, 4, 7])
    out = run_sampler(net, n=3, steps=steps, seed=seed, labels=y)
    ours = [c["tokens"] for c in net.calls[1:]] + [out]

    ref_net = FakeNet(length, seed=seed)
    scheduler = AmusedScheduler(mask_token_id=ref_net.mask_token_id, masking_schedule="cosine")
    scheduler.set_timesteps(steps, temperature=(4.5 * (steps - 1) / steps, 0))
    gen = torch.Generator().manual_seed(seed)
    x = torch.full((3, length), ref_net.mask_token_id, dtype=torch.long)
    theirs = []
    for ts in scheduler.timesteps:
        logits = ref_net(x, ts.float().expand(3), y=y)[..., :K]
        x = scheduler.step(logits, ts, x, generator=gen).prev_sample
        theirs.append(x)
    assert len(ours) == len(theirs) == steps
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(a, b), f"step {i}"


def test_only_codes_are_sampled_and_known_tokens_never_change():
    net = FakeNet(64)
    out = run_sampler(net, n=4, steps=6)
    mask_id = net.mask_token_id
    assert out.dtype == torch.long and out.min() >= 0 and out.max() < K  # never the mask or class ids
    states = [c["tokens"] for c in net.calls] + [out]
    for prev, nxt in zip(states[:-1], states[1:], strict=True):
        known = prev != mask_id
        assert torch.equal(nxt[known], prev[known])
        assert ((nxt == mask_id) <= (prev == mask_id)).all()
        revealed = nxt[nxt != mask_id]
        assert revealed.min() >= 0 and revealed.max() < K


def test_sample_returns_the_requested_grid():
    net = FakeNet(16)
    process = make_process()
    guider = Guider(on="logits", num_timesteps=process.num_timesteps)
    out = process.sample(net, (3, 4, 4), {"y": torch.tensor([0, 1, 2])}, guider, generator=torch.Generator(), steps=4)
    assert out.shape == (3, 4, 4)
    gen = torch.Generator().manual_seed(0)
    shown = process.sample(net, (3, 4, 4), {"y": torch.tensor([0, 1, 2])}, guider, gen, steps=4, progress=True)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(shown, process.sample(net, (3, 4, 4), {"y": torch.tensor([0, 1, 2])}, guider, gen, steps=4))
    with pytest.raises(ValueError) as err:
        process.sample(net, (3, 5, 4), {"y": torch.tensor([0, 1, 2])}, guider, steps=4)
    one_sentence(err)


def test_same_seed_same_samples_different_seed_different():
    a = run_sampler(FakeNet(64), n=3, steps=5, seed=11)
    b = run_sampler(FakeNet(64), n=3, steps=5, seed=11)
    c = run_sampler(FakeNet(64), n=3, steps=5, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# -- guidance ---------------------------------------------------------------------------------------


class RecordingGuider(Guider):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.combined: list[torch.Tensor] = []

    def guided_forward(self, forward, net, x, t, cond):
        out = super().guided_forward(forward, net, x, t, cond)
        self.combined.append(out.clone())
        return out


def test_scale_one_is_one_conditional_forward_per_step():
    net = FakeNet(32)
    run_sampler(net, n=3, steps=5, scale=1.0)
    assert len(net.calls) == 5
    for i, c in enumerate(net.calls):
        assert c["tokens"].shape == (3, 32)
        assert torch.equal(c["y"], torch.arange(3) % 10)
        assert torch.allclose(c["t"], torch.full((3,), (5 - 1 - i) / 4, dtype=torch.float64))


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_guided_logits_follow_the_linear_ramp(steps):
    w = 2.5  # valeoai's cfg weight; lightgen's cfg_scale = 1 + w
    net = FakeNet(32)
    process = make_process()
    guider = RecordingGuider(scale=1.0 + w, schedule="linear", on="logits", num_timesteps=process.num_timesteps)
    y = torch.tensor([1, 2, 3])
    process.sample(net, (3, 32), {"y": y}, guider, generator=torch.Generator().manual_seed(0), steps=steps)
    assert len(net.calls) == len(guider.combined) == steps
    for i, (call, combined) in enumerate(zip(net.calls, guider.combined, strict=True)):
        assert call["tokens"].shape == (6, 32)
        assert torch.equal(call["y"], torch.cat([y, torch.full_like(y, net.null_class)]))
        c, u = call["out"][:3], call["out"][3:]
        ramp = 1.0 + w * (i / (steps - 1) if steps > 1 else 1.0)
        expected = u + ramp * (c - u)  # logits = u + (1 + w i/(T-1)) (c - u)
        torch.testing.assert_close(combined, expected, rtol=1e-6, atol=1e-6)
        assert float(guider.scale_at(call["t"][:1])[0]) == pytest.approx(ramp, rel=1e-12)


def test_guidance_needs_a_null_class():
    net = FakeNet(16, null_class=None)
    with pytest.raises(ValueError) as err:
        run_sampler(net, n=2, steps=2, scale=2.0)
    one_sentence(err)


# -- training ---------------------------------------------------------------------------------------


class LogitNet(nn.Module):
    """Returns a learnable logit tensor (N, L, K + 2) regardless of the input; records the input."""

    def __init__(self, n: int, length: int, codebook_size: int = K, logits: torch.Tensor | None = None):
        super().__init__()
        self.codebook_size, self.mask_token_id, self.num_tokens, self.null_class = (
            codebook_size,
            codebook_size,
            length,
            None,
        )
        init = logits if logits is not None else torch.randn(n, length, codebook_size + 2)
        self.logits = nn.Parameter(init.clone())
        self.inputs: list[torch.Tensor] = []

    def forward(self, tokens, t, y=None):
        self.inputs.append(tokens.clone())
        return self.logits


@pytest.mark.parametrize("name", MASK_SCHEDULES)
def test_exactly_ceil_gamma_l_positions_are_masked(name):
    process = make_process(name)
    length = 64
    r = torch.rand(500)
    n_mask = process.num_masked(r, length)
    gamma = MaskSchedule(name)(r, length)
    assert torch.equal(n_mask, torch.ceil(gamma * length).long().clamp(1, length))
    mask = process.draw_mask(r, length, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask.sum(dim=1), n_mask)
    # training_losses draws r first from the global RNG, then the positions
    net = LogitNet(8, length)
    codes = torch.randint(0, K, (8, 8, 8))
    torch.manual_seed(5)
    r = torch.rand(8)
    torch.manual_seed(5)
    _, terms = process.training_losses(net, codes, {"y": torch.zeros(8, dtype=torch.long)})
    masked = net.inputs[0] == net.mask_token_id
    assert torch.equal(masked.sum(dim=1), process.num_masked(r, length))
    assert torch.equal(net.inputs[0][~masked], codes.reshape(8, -1)[~masked])  # the rest are the codes
    assert float(terms["mask_ratio"]) == pytest.approx(float(masked.float().mean()))


def test_positions_are_uniform():
    process = make_process("linear")
    r = torch.full((4000,), 0.75)  # 16 of 64 masked
    mask = process.draw_mask(r, 64, generator=torch.Generator().manual_seed(0))
    freq = mask.float().mean(dim=0)
    assert torch.allclose(freq, torch.full_like(freq, 0.25), atol=0.04)


@pytest.mark.parametrize("loss_on", ["masked", "all"])
def test_gradient_reaches_only_the_positions_of_the_loss(loss_on):
    net = LogitNet(6, 32)
    process = make_process(loss_on=loss_on)
    torch.manual_seed(0)
    loss, _ = process.training_losses(net, torch.randint(0, K, (6, 32)), {})
    loss.backward()
    grad = net.logits.grad
    masked = net.inputs[0] == net.mask_token_id
    assert (~masked).any() and masked.any()
    assert (grad[..., K:] == 0).all()  # the mask and class columns are never trained
    per_position = grad[..., :K].abs().sum(dim=-1)
    assert (per_position[masked] > 0).all()
    if loss_on == "masked":
        assert (per_position[~masked] == 0).all()
    else:
        assert (per_position[~masked] > 0).all()


@pytest.mark.parametrize("loss_on", ["masked", "all"])
def test_label_smoothed_loss_by_hand(loss_on):
    k, eps = 3, 0.1
    logits = torch.tensor([[[2.0, 0.5, -1.0, 9.0, 9.0], [0.0, 1.0, 0.3, 9.0, 9.0], [-0.5, 0.2, 1.5, 9.0, 9.0]]])
    codes = torch.tensor([[0, 2, 2]])
    net = LogitNet(1, 3, codebook_size=k, logits=logits)
    process = make_process("linear", label_smoothing=eps, loss_on=loss_on)
    torch.manual_seed(1)
    loss, terms = process.training_losses(net, codes, {})
    masked = (net.inputs[0] == k)[0].tolist()

    def ce(z, target):  # -sum_j q_j log softmax(z)_j, q = 1 - eps + eps/K on the target, eps/K elsewhere
        lse = math.log(sum(math.exp(v) for v in z))
        return -sum(((1 - eps + eps / k) if j == target else eps / k) * (z[j] - lse) for j in range(k))

    per = [ce(logits[0, i, :k].tolist(), int(codes[0, i])) for i in range(3)]
    used = [p for p, m in zip(per, masked, strict=True) if m or loss_on == "all"]
    assert loss.item() == pytest.approx(sum(used) / len(used), rel=1e-6)
    hits = [int(torch.argmax(logits[0, i, :k])) == int(codes[0, i]) for i in range(3)]
    n_masked = sum(masked)
    assert float(terms["acc"]) == pytest.approx(sum(h for h, m in zip(hits, masked, strict=True) if m) / n_masked)
    assert float(terms["mask_ratio"]) == pytest.approx(n_masked / 3)
    assert float(terms["loss"]) == pytest.approx(loss.item())


def test_loss_is_a_mean_per_sequence_then_over_the_batch():
    # official weighted_sequence_cross_entropy_loss: sum(loss * w, -1) / sum(w, -1), then the batch mean
    net = LogitNet(5, 16)
    process = make_process(label_smoothing=0.1)
    codes = torch.randint(0, K, (5, 16))
    torch.manual_seed(2)
    loss, _ = process.training_losses(net, codes, {})
    masked = (net.inputs[0] == net.mask_token_id).float()
    per = process.smoothed_cross_entropy(net.logits[..., :K].detach(), codes)
    expected = ((per * masked).sum(1) / masked.sum(1)).mean()
    assert loss.item() == pytest.approx(float(expected), rel=1e-6)
    assert masked.sum(1).unique().numel() > 1  # the sequences differ in their masked counts


def test_accuracy_counts_masked_tokens_only():
    length = 16
    codes = torch.randint(0, K, (4, length))
    logits = torch.randn(4, length, K + 2)
    logits[..., :K] += 20 * nn.functional.one_hot(codes, K)  # argmax right everywhere ...
    logits[:, ::2, :K] -= 40 * nn.functional.one_hot(codes[:, ::2], K)  # ... but on the even positions
    net = LogitNet(4, length, logits=logits)
    torch.manual_seed(3)
    _, terms = make_process().training_losses(net, codes, {})
    masked = net.inputs[0] == net.mask_token_id
    right = torch.zeros_like(masked)
    right[:, 1::2] = True
    assert float(terms["acc"]) == pytest.approx(float((right & masked).sum() / masked.sum()))


# -- bad input --------------------------------------------------------------------------------------


def test_bad_inputs_are_one_sentence():
    with pytest.raises(ValueError) as err:
        MaskSchedule("arccos")
    assert "cosine" in one_sentence(err) and "exp" in str(err.value)
    with pytest.raises(ValueError) as err:
        MaskSchedule("log")(0.5)
    one_sentence(err)
    process = make_process()
    for kwargs in ({"sampler": "ddpm", "steps": 8}, {"sampler": "maskgit", "steps": 0}):
        with pytest.raises(ValueError) as err:
            process.check_sampling(**kwargs)
        one_sentence(err)
    with pytest.raises(ValueError) as err:
        process.check_sampling("maskgit", 8, choice_temperature=-1.0)
    one_sentence(err)
    process.check_sampling("maskgit", 1, choice_temperature=0.0)
    net = LogitNet(2, 4)
    for bad in (torch.rand(2, 4), torch.full((2, 4), K), torch.full((2, 4), -1), torch.zeros(2, 5, dtype=torch.long)):
        with pytest.raises(ValueError) as err:
            process.training_losses(net, bad, {})
        one_sentence(err)
    with pytest.raises(ValueError) as err:
        process.prepare_net(nn.Linear(2, 2))
    one_sentence(err)
    process.prepare_net(net)
    with pytest.raises(ValueError) as err:
        MaskGITProcess(MaskSchedule("cosine"), loss_on="unmasked")
    one_sentence(err)
    with pytest.raises(ValueError) as err:
        MaskGITProcess({"name": "linear", "num_timesteps": 1000})
    one_sentence(err)


def test_process_attributes():
    p = make_process()
    assert p.samplers == ("maskgit",) and p.guidance_on == "logits" and p.schedule_kind == "mask"
    assert p.sampling_keys == ("sampler", "steps", "choice_temperature") and p.num_timesteps == 1
    assert [MaskGITProcess.guidance_time(i, 5) for i in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert MaskGITProcess.guidance_time(0, 1) == 0.0


# -- configs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MASK_SCHEDULES)
def test_configs_build_the_process(name):
    from hydra.utils import instantiate

    cfg = compose(["diffusion=maskgit", f"schedule=mask_{name}"])
    assert cfg.schedule.kind == "mask"
    process = instantiate(cfg.diffusion)
    assert isinstance(process, MaskGITProcess) and process.schedule.name == name
    assert process.label_smoothing == 0.1 and process.loss_on == "masked"
    gaussian = compose([])
    assert gaussian.schedule.kind == "gaussian"
    assert instantiate(gaussian.diffusion).num_timesteps == gaussian.schedule.num_timesteps
