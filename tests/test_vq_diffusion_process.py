"""VQ-Diffusion's process (lightgen.diffusion.vq_diffusion): specifications against the official maths.

Small and fast: a fake net (no transformer), K = 5 codes, a few tokens.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from lightgen.diffusion.guidance import Guider
from lightgen.diffusion.vq_diffusion import (
    DiscreteSchedule,
    VQDiffusionProcess,
    index_to_log_onehot,
    truncate,
)

K, L, T = 5, 6, 100


class FakeNet(nn.Module):
    """The VQ-Diffusion net protocol; logits from a fixed random table per (label, position), or a perfect
    predictor of ``targets[y]`` (logits 30 on the target code). Records the t's it is called with."""

    def __init__(self, targets: torch.Tensor | None = None, num_classes: int = 3, seed: int = 0):
        super().__init__()
        self.codebook_size, self.num_tokens, self.mask_token_id = K, L, K
        self.num_classes, self.null_class, self.num_timesteps = num_classes, num_classes, T
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(num_classes + 1, K, L, generator=g))
        self.targets = targets
        self.seen_t: list[int] = []

    def forward(self, tokens, t, y=None):
        assert tokens.dtype == torch.long and tokens.shape[1] == L and int(tokens.max()) <= K
        self.seen_t.append(int(t[0]))
        if self.targets is not None:
            return 30.0 * nn.functional.one_hot(self.targets[y], K).permute(0, 2, 1).float()
        # depends on the tokens a little so that guidance and the posterior see different inputs
        return self.table[y] + 0.1 * (tokens[:, None, :] == torch.arange(K)[None, :, None]).float()


def process(**kw) -> VQDiffusionProcess:
    return VQDiffusionProcess(DiscreteSchedule(), **kw)


def random_log_x0(n: int, generator=None) -> torch.Tensor:
    logits = torch.randn(n, K, L, generator=generator)
    return VQDiffusionProcess.with_mask_row(torch.log_softmax(logits, dim=1))


def one_sentence(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.endswith(".") and not re.search(r"\. [A-Z]", msg), msg
    return msg


# -- the forward process ----------------------------------------------------------------------------
def test_q_pred_rows_sum_to_one_and_mask_probability_is_gamma_bar():
    p = process()
    tab = DiscreteSchedule().tables(K)
    t = torch.arange(T)
    x0 = torch.randint(0, K, (T, L), generator=torch.Generator().manual_seed(0))
    q = p.q_pred(index_to_log_onehot(x0, K + 1), t).exp()
    assert torch.allclose(q.sum(1), torch.ones(T, L), atol=2e-5)
    gamma_bar = torch.tensor(tab["ctt"][:T], dtype=torch.float32)
    assert torch.allclose(q[:, K], gamma_bar[:, None].expand(T, L), atol=1e-6)
    # t = -1 (the sentinel) is the identity
    ident = p.q_pred(index_to_log_onehot(x0, K + 1), torch.full((T,), -1)).exp()
    assert torch.allclose(ident, nn.functional.one_hot(x0, K + 1).permute(0, 2, 1).float(), atol=1e-6)


def test_one_step_and_cumulative_transitions_compose():
    p = process()
    tab = DiscreteSchedule().tables(K)
    t = torch.arange(1, T)
    n = t.shape[0]
    x0 = torch.randint(0, K, (n, 1), generator=torch.Generator().manual_seed(1))
    prev = p.q_pred(index_to_log_onehot(x0, K + 1), t - 1).exp()[..., 0]  # (n, K+1) over x_{t-1}
    want = p.q_pred(index_to_log_onehot(x0, K + 1), t).exp()[..., 0]  # (n, K+1) over x_t
    got = torch.zeros_like(want)
    for j in range(K):  # q(x_t = j | x_{t-1}) as a function of x_{t-1}, from q_pred_one_timestep
        col = p.q_pred_one_timestep(index_to_log_onehot(torch.full((n, 1), j), K + 1), t).exp()[..., 0]
        col[:, K] = 0.0  # a MASK never becomes a code (q_posterior overwrites this row with log 0)
        got[:, j] = (prev * col).sum(1)
    gamma = torch.tensor(tab["ct"], dtype=torch.float32)[t]
    got[:, K] = prev[:, :K].sum(1) * gamma + prev[:, K]  # q(mask | code) = gamma_t, q(mask | mask) = 1
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


# -- the posterior ----------------------------------------------------------------------------------
@pytest.mark.parametrize("tv", [1, 37, 99])
def test_q_posterior_matches_diffusers_and_sums_to_one(tv):
    from diffusers.schedulers.scheduling_vq_diffusion import VQDiffusionScheduler

    p = process()
    g = torch.Generator().manual_seed(tv)
    n = 4
    log_x0 = random_log_x0(n, g)
    x_t = torch.randint(0, K + 1, (n, L), generator=g)
    x_t[0, :3] = K
    x_t[1, 3:] = 0
    ours = p.q_posterior(log_x0, index_to_log_onehot(x_t, K + 1), torch.full((n,), tv))
    assert torch.allclose(torch.logsumexp(ours, dim=1), torch.zeros(n, L), atol=1e-5)
    ref = VQDiffusionScheduler(num_vec_classes=K + 1, num_train_timesteps=T).q_posterior(log_x0[:, :K], x_t, tv)
    assert torch.allclose(ours.exp(), ref.clamp(-70, 0).exp(), atol=2e-6)


def test_q_posterior_batched_mixed_t_equals_per_t_calls():
    p = process()
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 1, 50, 99, 7, 98])
    log_x0 = random_log_x0(len(t), g)
    x_t = torch.randint(0, K + 1, (len(t), L), generator=g)
    log_xt = index_to_log_onehot(x_t, K + 1)
    both = p.q_posterior(log_x0, log_xt, t)
    for i, tv in enumerate(t.tolist()):
        one = p.q_posterior(log_x0[i : i + 1], log_xt[i : i + 1], torch.tensor([tv]))
        assert torch.equal(both[i : i + 1], one)


def test_q_posterior_at_t0_is_the_x0_prediction_on_masked_positions():
    p = process()
    log_x0 = random_log_x0(2, torch.Generator().manual_seed(4))
    x_t = torch.full((2, L), K)
    out = p.q_posterior(log_x0, index_to_log_onehot(x_t, K + 1), torch.zeros(2, dtype=torch.long))
    assert torch.allclose(out.exp(), log_x0.exp(), atol=1e-6)


def test_exact_and_official_posteriors_agree_at_stride_one():
    p = process()
    g = torch.Generator().manual_seed(5)
    t = torch.tensor([0, 1, 37, 99])
    log_x0 = random_log_x0(len(t), g)
    log_xt = index_to_log_onehot(torch.randint(0, K + 1, (len(t), L), generator=g), K + 1)
    assert torch.allclose(p.q_posterior(log_x0, log_xt, t, t - 1), p.q_posterior(log_x0, log_xt, t), atol=1e-6)
    # a longer jump is a different (exact) distribution, still normalised
    out = p.q_posterior(log_x0, log_xt, t.clamp(min=4), t.clamp(min=4) - 4)
    assert torch.allclose(torch.logsumexp(out, dim=1), torch.zeros(len(t), L), atol=1e-5)


# -- training ---------------------------------------------------------------------------------------
def test_importance_sampler_uniform_until_every_t_seen_then_follows_history():
    p = process()
    torch.manual_seed(0)
    for _ in range(3):  # a few updates: still uniform
        t, pt = p.sample_time(16, "cpu")
        assert torch.all(pt == 1.0 / T)
        p.update_history(t, torch.rand(16))
    p.Lt_count.fill_(11)
    p.Lt_count[42] = 10  # one t seen only 10 times: still uniform
    assert torch.all(p.sample_time(8, "cpu")[1] == 1.0 / T)
    p.Lt_count[42] = 11
    p.Lt_history.zero_()
    p.Lt_history[42] = 1.0e4
    t, pt = p.sample_time(2000, "cpu")
    lt = torch.sqrt(p.Lt_history + 1e-10) + 1e-4
    lt[0] = lt[1]
    expected = lt / lt.sum()
    assert torch.allclose(pt, expected[t])
    assert abs((t == 42).float().mean().item() - expected[42].item()) < 0.02
    # the EMA of the squared loss; a t drawn twice takes the last value; counts add up
    p.update_history(torch.tensor([3, 3, 7]), torch.tensor([1.0, 2.0, 5.0]))
    assert p.Lt_history[3].item() == pytest.approx(0.1 * 2.0)
    assert p.Lt_history[7].item() == pytest.approx(0.5)
    assert p.Lt_count[3].item() == 13 and p.Lt_count[7].item() == 12
    # the history is in the state dict and round-trips
    q = process()
    q.load_state_dict(p.state_dict())
    assert torch.equal(q.Lt_history, p.Lt_history) and torch.equal(q.Lt_count, p.Lt_count)
    assert set(p.state_dict()) == {"Lt_history", "Lt_count"}


def test_training_losses_terms_and_history_update():
    p = process()
    net = FakeNet()
    p.prepare_net(net)
    torch.manual_seed(0)
    x0 = torch.randint(0, K, (4, 2, 3))
    loss, terms = p.training_losses(net, x0, {"y": torch.tensor([0, 1, 2, 0])})
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert set(terms) >= {"loss", "vb", "aux"}
    assert torch.allclose(terms["loss"], terms["vb"] + terms["aux"])
    assert int(p.Lt_count.sum()) == 4


def test_loss_at_t0_is_the_decoder_nll_and_aux_weights():
    p = process(aux_weight=1e-3)
    net = FakeNet()
    codes = torch.randint(0, K, (3, L), generator=torch.Generator().manual_seed(6))
    y = torch.tensor([0, 1, 2])
    t = torch.zeros(3, dtype=torch.long)
    pt = torch.full((3,), 0.5)
    torch.manual_seed(1)
    out = p.losses_at(net, codes, t, pt, {"y": y})
    torch.manual_seed(1)
    log_x_start = index_to_log_onehot(codes, K + 1)
    xt = p.q_sample(log_x_start, t)
    log_model = p.q_posterior(p.predict_start(net, xt, t, {"y": y}), index_to_log_onehot(xt, K + 1), t)
    nll = -log_model.gather(1, codes[:, None])[:, 0].sum(1)
    assert torch.allclose(out["kl_loss"], nll, rtol=1e-5)
    assert torch.allclose(out["vb"], nll / 0.5, rtol=1e-5)
    assert torch.allclose(out["aux"], 2.0 * 1e-3 * nll / 0.5, rtol=1e-5)  # adaptive factor 2 at t = 0
    w = p.aux_factor(torch.tensor([0, 99]))
    assert w[0].item() == pytest.approx(2.0) and w[1].item() == pytest.approx(1.01)


# -- sampling ---------------------------------------------------------------------------------------
def test_truncation_keeps_top1_and_the_class_crossing_r():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    lp = probs.log()[None, :, None]
    kept = lambda r: (truncate(lp, r)[0, :, 0] > -70).tolist()  # noqa: E731
    assert kept(0.6) == [False, True, False, True]  # 0.5 < 0.6 before 0.3: 0.3 crosses and is kept
    assert kept(0.3) == [False, True, False, False]  # the top-1 alone crosses
    assert kept(0.85) == [True, True, False, True]
    out = truncate(lp, 0.6)[0, :, 0]
    assert out[1] == lp[0, 1, 0] and out[3] == lp[0, 3, 0] and out[0] == -70  # not renormalised


def test_strided_sampling_visits_the_official_timesteps():
    p = process()
    assert p.visits(100) == list(range(99, -1, -1))
    assert p.visits(50) == list(range(99, -1, -2)) + [0]  # sample_fast, skip_step 1
    assert p.visits(25) == list(range(99, -1, -4)) + [0]
    net = FakeNet()
    p.sample(net, (2, 2, 3), {"y": torch.tensor([0, 1])}, Guider(), torch.Generator().manual_seed(0), steps=20)
    assert net.seen_t == p.visits(20)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"steps": 20, "truncation": 0.86},
        {"steps": 20, "posterior": "exact"},
        {"sampler": "purity", "truncation": 0.9, "purity_weight": 1.0},
    ],
)
def test_samples_are_codes_never_the_mask_and_seeded(settings):
    p = process()
    net = FakeNet()
    y = torch.tensor([0, 1, 2, 0])

    def draw():
        return p.sample(net, (4, 2, 3), {"y": y}, Guider(), torch.Generator().manual_seed(7), **settings)

    x = draw()
    assert x.shape == (4, 2, 3) and x.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < K
    assert torch.equal(x, draw())


@pytest.mark.parametrize(
    "settings",
    [{}, {"steps": 10}, {"steps": 10, "posterior": "exact"}, {"sampler": "purity"}, {"truncation": 0.5}],
)
def test_perfect_predictor_recovers_x0(settings):
    targets = torch.randint(0, K, (3, L), generator=torch.Generator().manual_seed(8))
    net = FakeNet(targets=targets)
    y = torch.tensor([2, 0, 1])
    x = process().sample(net, (3, L), {"y": y}, Guider(), torch.Generator().manual_seed(0), **settings)
    assert torch.equal(x, targets[y])


def test_guidance_on_log_probs_then_truncation():
    p = process()
    net = FakeNet()
    x = torch.full((2, L), K)
    t = torch.tensor([99, 99])
    y = torch.tensor([0, 1])
    guider = Guider(scale=3.0, on="log_probs", num_timesteps=T)
    got = p.predict_for_sampling(net, x, t, {"y": y}, guider, 0.7)
    c = p.log_probs_k(net, x, t, {"y": y})
    u = p.log_probs_k(net, x, t, {"y": torch.full_like(y, net.null_class)})
    g = torch.log_softmax(u + 3.0 * (c - u), dim=1).clamp(-70, 0)
    assert torch.allclose(got, truncate(p.with_mask_row(g), 0.7), atol=1e-6)
    assert torch.all(got[:, K] == -70)


# -- bad input: one sentence each -------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        {"sampler": "ddpm"},
        {"steps": 0},
        {"steps": 30},
        {"steps": 200},
        {"steps": True},
        {"sampler": "purity", "steps": 50},
        {"truncation": 0.0},
        {"truncation": 1.5},
        {"posterior": "approx"},
        {"purity_weight": -1.0},
    ],
)
def test_bad_sampling_settings_give_one_sentence(bad):
    settings = {"sampler": "ancestral", "steps": 100, **bad}
    with pytest.raises(ValueError) as err:
        process().check_sampling(**settings)
    one_sentence(err)


def test_bad_parts_give_one_sentence():
    for make in (
        lambda: DiscreteSchedule(num_timesteps=1),
        lambda: DiscreteSchedule(alpha_bar_start=0.5, gamma_bar_start=0.6),
        lambda: DiscreteSchedule(kind="mask"),
        lambda: VQDiffusionProcess(object()),
        lambda: process(aux_weight=-1),
        lambda: process(mask_weight=[1.0]),
    ):
        with pytest.raises(ValueError) as err:
            make()
        one_sentence(err)
    p, net = process(), FakeNet()
    for x0 in (torch.rand(2, L), torch.randint(0, K, (2, L + 1)), torch.full((2, L), K)):
        with pytest.raises(ValueError) as err:
            p.training_losses(net, x0, {"y": torch.tensor([0, 1])})
        one_sentence(err)
    net.num_timesteps = 50
    with pytest.raises(ValueError) as err:
        p.prepare_net(net)
    one_sentence(err)
    net.num_timesteps, net.mask_token_id = T, 0
    with pytest.raises(ValueError) as err:
        p.prepare_net(net)
    one_sentence(err)


def test_mask_replace_schedule_ends_at_the_papers_values():
    tab = DiscreteSchedule(gamma_bar_end=0.899991).tables(K)
    assert tab["ctt"][T - 1] == pytest.approx(0.9, abs=1e-5)
    assert K * tab["btt"][T - 1] == pytest.approx(0.1, abs=1e-9)
    assert tab["att"][T - 1] == pytest.approx(0.0, abs=1e-5)
    assert math.isclose(tab["att"][T], 1.0) and tab["ctt"][T] == 0.0  # the t = -1 sentinel
