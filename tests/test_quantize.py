"""The VQ tokenizer's quantizer: nearest code, straight-through, β placements, EMA, k-means, dead codes, entropy,
usage / perplexity, state dicts, parity with diffusers' ``VectorQuantizer``."""

from __future__ import annotations

import math
import socket
import threading

import pytest
import torch
import torch.nn.functional as F

from lightgen.first_stage.quantize import VectorQuantizer, _ieee_matmul, entropy_regulariser, perplexity_from_counts


def DiffusersVQ(*args, **kwargs):  # noqa: N802 (imported lazily: spawned test processes import this module)
    from diffusers.models.autoencoders.vae import VectorQuantizer

    return VectorQuantizer(*args, **kwargs)


def quantizer(codebook: torch.Tensor, **kwargs) -> VectorQuantizer:
    q = VectorQuantizer(codebook.shape[0], codebook.shape[1], **kwargs)
    with torch.no_grad():
        q.embedding.weight.copy_(codebook)
        if q.ema:
            q.ema_embed_sum.copy_(codebook)
    return q


def as_map(vectors: torch.Tensor, n: int = 1) -> torch.Tensor:
    """(M, D) vectors -> (n, D, 1, M // n), row order preserved by the quantizer's flattening."""
    m, d = vectors.shape
    return vectors.reshape(n, 1, m // n, d).permute(0, 3, 1, 2).contiguous()


def flat(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


# -- nearest code ----------------------------------------------------------------------------------------------------
def test_nearest_code_hand_case():
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[0.1, -0.2], [0.9, 0.3], [0.2, 1.4], [0.6, 0.0], [-5.0, 5.0]])
    q = quantizer(codes).eval()
    z_q, _, info = q(as_map(z))
    assert info["indices"].flatten().tolist() == [0, 1, 2, 1, 2]
    assert torch.equal(flat(z_q), codes[[0, 1, 2, 1, 2]])


def test_nearest_code_matches_brute_force_and_encode_decode_round_trip():
    torch.manual_seed(0)
    q = quantizer(torch.randn(32, 8)).eval()
    z = torch.randn(3, 8, 5, 4)
    z_q, _, info = q(z)
    brute = ((flat(z)[:, None] - q.embedding.weight[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(info["indices"].flatten(), brute)
    assert torch.equal(q.encode_indices(z), info["indices"])
    # z_q = z + sg[e − z] equals e up to float rounding, as in taming / diffusers
    torch.testing.assert_close(q.decode_indices(info["indices"]), z_q, rtol=0, atol=1e-6)
    assert info["indices"].dtype == torch.long and info["indices"].shape == (3, 5, 4)


def test_low_precision_input_gives_float32_lookup_and_keeps_its_dtype():
    torch.manual_seed(1)
    q = quantizer(torch.randn(16, 4)).eval()
    z = torch.randn(2, 4, 3, 3).bfloat16()
    z_q, loss, info = q(z)
    assert z_q.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.equal(info["indices"], q.encode_indices(z.float()))


# -- diffusers / taming parity ------------------------------------------------------------------------------------
@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_with_diffusers_vector_quantizer(legacy, dtype):
    torch.manual_seed(2)
    ours = VectorQuantizer(512, 16, beta=0.25, legacy=legacy).to(dtype)
    theirs = DiffusersVQ(512, 16, beta=0.25, legacy=legacy, sane_index_shape=True).to(dtype)
    with torch.no_grad():
        ours.embedding.weight.normal_()
    theirs.load_state_dict({"embedding.weight": ours.embedding.weight.detach().clone()})
    z = torch.randn(8, 16, 16, 16, dtype=dtype)  # 2048 vectors: cdist takes its matmul path (> 25 rows)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    zq_ours, loss_ours, info = ours(z1)
    zq_theirs, loss_theirs, (_, _, idx_theirs) = theirs(z2)
    assert torch.equal(info["indices"], idx_theirs)
    assert torch.equal(
        ours.decode_indices(info["indices"]), theirs.get_codebook_entry(idx_theirs.flatten(), (8, 16, 16, 16))
    )
    tol = dict(rtol=1e-6, atol=0) if dtype == torch.float32 else dict(rtol=1e-12, atol=0)
    torch.testing.assert_close(zq_ours.to(dtype), zq_theirs, **tol)
    torch.testing.assert_close(loss_ours.to(dtype), loss_theirs, **tol)
    (loss_ours + zq_ours.sum()).backward()
    (loss_theirs + zq_theirs.sum()).backward()
    torch.testing.assert_close(z1.grad.to(dtype), z2.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ours.embedding.weight.grad, theirs.embedding.weight.grad, rtol=1e-5, atol=1e-9)


def test_lookup_keeps_float32_precision_with_tamings_initial_codebook():
    # taming's init (uniform ±1/K) makes all codes nearly equidistant: |z|² ≈ D dwarfs their differences, and
    # float32 |z|² + |e|² − 2 z·e (taming) or cdist (diffusers) then misses the true nearest code now and then
    torch.manual_seed(12)
    q = VectorQuantizer(1024, 256).eval()
    z = torch.randn(16, 256, 16, 16)
    assert torch.equal(q.encode_indices(z), q.double().encode_indices(z.double()))


def test_lookup_turns_tf32_off_and_restores_it():
    mm = torch.backends.cuda.matmul
    if not hasattr(mm, "fp32_precision"):
        pytest.skip("torch < 2.9 has allow_tf32 only")
    old = mm.fp32_precision
    try:
        mm.fp32_precision = "tf32"  # what train.py's set_float32_matmul_precision("high") does
        with _ieee_matmul(torch.device("cuda")):  # only flips flags: runs without a GPU
            assert mm.fp32_precision == "ieee"
        assert mm.fp32_precision == "tf32"
        with _ieee_matmul(torch.device("cpu")):
            assert mm.fp32_precision == "tf32"
    finally:
        mm.fp32_precision = old


def test_exact_ties_go_to_the_lowest_index_as_in_diffusers():
    codes = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.0, 3.0]])  # codes 0 and 2 equal; z=0 ties 0, 1, 2
    z = as_map(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.9, 0.1]] * 10))  # 30 rows: cdist's matmul path
    theirs = DiffusersVQ(4, 2, beta=0.25, sane_index_shape=True)
    theirs.load_state_dict({"embedding.weight": codes})
    ours = quantizer(codes).eval()
    assert ours.encode_indices(z).flatten().tolist()[:3] == [0, 0, 0]
    assert torch.equal(ours.encode_indices(z), theirs(z)[2][2])


# -- straight-through and the two β placements -------------------------------------------------------------------------
def test_straight_through_gradient_is_the_identity():
    torch.manual_seed(3)
    q = quantizer(torch.randn(8, 4))
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, _, _ = q(z)
    g = torch.randn_like(z_q)
    z_q.backward(g)
    assert torch.equal(z.grad, g)
    assert q.embedding.weight.grad is None or not q.embedding.weight.grad.any()


@pytest.mark.parametrize("legacy", [True, False])
def test_beta_placement_gives_the_documented_losses(legacy):
    torch.manual_seed(4)
    beta = 0.3
    codes = torch.randn(6, 3)
    q = quantizer(codes, beta=beta, legacy=legacy)
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    _, loss, info = q(z)
    idx = info["indices"].flatten()
    x, e = flat(z.detach()), codes[idx]
    mse = ((x - e) ** 2).mean()
    w_codebook, w_commit = (beta, 1.0) if legacy else (1.0, beta)
    torch.testing.assert_close(loss, (1 + beta) * mse)
    torch.testing.assert_close(info["codebook"], w_codebook * mse)
    torch.testing.assert_close(info["commitment"], w_commit * mse)
    assert info["entropy"] == 0
    loss.backward()
    numel = x.numel()
    # d/dz: commitment only, w_commit · 2 (z − e) / numel
    # d/de_k: codebook only, w_codebook · 2 Σ_{i→k} (e_k − z_i) / numel
    torch.testing.assert_close(flat(z.grad), w_commit * 2 * (x - e) / numel)
    expected = torch.zeros_like(codes).index_add_(0, idx, w_codebook * 2 * (e - x) / numel)
    torch.testing.assert_close(q.embedding.weight.grad, expected)


def test_codebook_gets_gradient_only_from_its_term():
    torch.manual_seed(5)
    q = quantizer(torch.randn(6, 3), legacy=False)
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    z_q, _, _ = q(z)
    x, e = flat(z), q.embedding.weight[q.encode_indices(z).flatten()]
    commitment = F.mse_loss(x, e.detach())  # the commitment term, rebuilt with its graph
    (z_q.sum() + commitment).backward()  # straight-through output and commitment term: nothing reaches the codebook
    assert q.embedding.weight.grad is None or not q.embedding.weight.grad.any()
    # (the closed-form gradients of test_beta_placement_gives_the_documented_losses show the converse: the codebook
    # term sends nothing to z)


# -- EMA codebook ----------------------------------------------------------------------------------------------------
def test_ema_update_against_a_hand_computation():
    codes = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    z = torch.tensor([[0.2, 0.0], [0.0, 0.4], [1.2, 0.8]])  # -> codes 0, 0, 1; code 2 unused
    g, eps, beta = 0.9, 1e-5, 0.25
    q = quantizer(codes, ema=True, ema_decay=g, ema_eps=eps, beta=beta)
    zz = as_map(z).requires_grad_()
    _, loss, info = q(zz)
    assert info["indices"].flatten().tolist() == [0, 0, 1]
    # N = γ·1 + (1−γ)·n;  m = γ·e0 + (1−γ)·Σz
    n_ = [0.9 + 0.1 * 2, 0.9 + 0.1 * 1, 0.9]
    m_ = [[0.1 * 0.2, 0.1 * 0.4], [0.9 + 0.1 * 1.2, 0.9 + 0.1 * 0.8], [4.5, 4.5]]
    total = sum(n_)
    smooth = [(v + eps) / (total + 3 * eps) * total for v in n_]
    expected = torch.tensor([[m_[k][j] / smooth[k] for j in range(2)] for k in range(3)])
    torch.testing.assert_close(q.ema_cluster_size, torch.tensor(n_))
    torch.testing.assert_close(q.ema_embed_sum, torch.tensor(m_))
    torch.testing.assert_close(q.embedding.weight, expected)
    # the loss used the codebook before the update: β·mse(z, e_old), no codebook term
    torch.testing.assert_close(loss, beta * ((z - codes[[0, 0, 1]]) ** 2).mean())
    assert info["codebook"] == 0
    loss.backward()
    assert not q.embedding.weight.requires_grad and q.embedding.weight.grad is None
    assert zz.grad.any()
    # β sits on the commitment term whatever ``legacy`` says
    _, loss_fixed, _ = quantizer(codes, ema=True, legacy=False, beta=beta)(as_map(z))
    torch.testing.assert_close(loss_fixed, loss.detach())
    # no update in eval mode
    before = q.embedding.weight.clone()
    q.eval()(as_map(z))
    assert torch.equal(q.embedding.weight, before)


# -- dead codes --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_are_restarted_from_current_encoder_outputs(ema):
    codes = torch.tensor([[0.0, 0.0], [1.0, 1.0], [50.0, 50.0], [-50.0, 50.0]])
    torch.manual_seed(6)
    z = torch.cat([torch.randn(6, 2) * 0.1, 1 + torch.randn(6, 2) * 0.1])  # only codes 0 and 1 are used

    def step(seed):
        q = quantizer(codes, ema=ema, restart_dead_codes=True, dead_code_threshold=1.0)
        torch.manual_seed(seed)
        _, _, info = q(as_map(z, 2))
        return q, info

    q, info = step(0)
    assert set(info["indices"].flatten().tolist()) == {0, 1}
    w = q.embedding.weight.detach()
    if not ema:
        assert torch.equal(w[:2], codes[:2])  # live codes untouched (no optimiser step here)
    for k in (2, 3):  # each restarted code is one of the batch's vectors, and they differ
        assert ((z - w[k]).abs().amax(1) == 0).any()
    assert not torch.equal(w[2], w[3])
    usage = q.ema_cluster_size if ema else q.dead_code_usage
    assert usage[2:].tolist() == [1.0, 1.0]
    if ema:
        torch.testing.assert_close(q.ema_embed_sum[2:], w[2:])
    # deterministic given torch's RNG
    assert torch.equal(step(0)[0].embedding.weight, q.embedding.weight)
    assert not torch.equal(step(1)[0].embedding.weight, q.embedding.weight)
    # no restart in eval mode
    q2 = quantizer(codes, ema=ema, restart_dead_codes=True).eval()
    q2(as_map(z, 2))
    assert torch.equal(q2.embedding.weight, codes)


# -- k-means initialisation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ema", [False, True])
def test_kmeans_initialisation_from_the_first_training_batch(ema):
    torch.manual_seed(7)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    z = (centres.repeat_interleave(20, 0) + 0.5 * torch.randn(60, 2))[torch.randperm(60)]
    labels = ((z[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    means = torch.stack([z[labels == k].mean(0) for k in range(3)])
    q = VectorQuantizer(3, 2, kmeans_init=True, kmeans_iters=10, ema=ema)
    assert "initialized" in q.state_dict() and not q.initialized
    q.eval()(as_map(z, 4))
    assert not q.initialized  # eval forwards do not initialise
    q.train()
    q.embedding.weight.requires_grad_(False)
    torch.manual_seed(0)
    q(as_map(z, 4))
    assert q.initialized
    w = q.embedding.weight.detach()
    if ema:  # the EMA step after k-means moves nothing: each code is the mean of its cluster already
        torch.testing.assert_close(q.ema_cluster_size.sum(), torch.tensor(3.0 * 0.99 + 60 * 0.01))
    order = ((w[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(w, means[order], rtol=1e-4, atol=1e-4)
    before = w.clone()
    q(as_map(z + 100, 4))  # not re-initialised
    if not ema:
        assert torch.equal(q.embedding.weight, before)
    assert "initialized" not in VectorQuantizer(3, 2).state_dict()


# -- L2-normalised codes -----------------------------------------------------------------------------------------------
def test_l2_normalised_lookup_is_cosine_similarity():
    torch.manual_seed(8)
    q = VectorQuantizer(16, 4, l2_normalize=True).eval()
    with torch.no_grad():
        q.embedding.weight.normal_()
    z = torch.randn(2, 4, 3, 3)
    z_q, loss, info = q(z)
    cos = F.normalize(flat(z), dim=-1) @ F.normalize(q.embedding.weight, dim=-1).t()
    assert torch.equal(info["indices"].flatten(), cos.argmax(1))
    torch.testing.assert_close(flat(z_q).norm(dim=1), torch.ones(18))
    assert torch.equal(q.encode_indices(3.7 * z), info["indices"])  # scale-invariant
    torch.testing.assert_close(loss, 1.25 * ((F.normalize(flat(z), dim=-1) - flat(z_q)) ** 2).mean())


# -- MaskGIT entropy regulariser -------------------------------------------------------------------------------------
def test_entropy_term_is_per_sample_minus_batch_entropy():
    # confident, spread assignments: per-sample entropy 0, batch entropy log 2 -> −log 2
    d = torch.tensor([[0.0, 100.0], [100.0, 0.0]])
    torch.testing.assert_close(entropy_regulariser(d, 0.01), torch.tensor(-math.log(2)))
    # every sample uniform over K codes: log K − log K = 0
    torch.testing.assert_close(entropy_regulariser(torch.full((5, 7), 3.0), 0.01), torch.tensor(0.0))
    # collapsed onto one code, confidently: 0 − 0
    torch.testing.assert_close(entropy_regulariser(torch.tensor([[0.0, 9.0], [0.0, 9.0]]), 0.01), torch.tensor(0.0))
    # general case against a float64 hand computation, through the module
    torch.testing.assert_close(entropy_regulariser(torch.tensor([[0.0, 9.0], [0.0, 9.0]]), 0.01), torch.tensor(0.0))
    torch.manual_seed(9)
    codes, z = torch.randn(5, 3), torch.randn(4, 3)
    ratio, tau = 0.1, 0.5
    q = quantizer(codes, entropy_loss_ratio=ratio, entropy_temperature=tau).eval()
    zz = as_map(z).requires_grad_()
    _, loss, info = q(zz)
    p = torch.softmax(-((z[:, None].double() - codes[None].double()) ** 2).sum(-1) / tau, dim=1)
    sample_h = -(p * p.log()).sum(1).mean()
    pbar = p.mean(0)
    expected = ratio * (sample_h - (-(pbar * pbar.log()).sum()))
    torch.testing.assert_close(info["entropy"].double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, info["codebook"] + info["commitment"] + info["entropy"])
    loss.backward()  # flows into both z and the codebook
    assert zz.grad.any() and q.embedding.weight.grad.any()
    with torch.no_grad():  # validation: same value, no graph
        assert q(as_map(z))[2]["entropy"] == info["entropy"]


def test_entropy_gradient_is_finite_when_softmax_underflows():
    q = quantizer(torch.tensor([[0.0, 0.0], [100.0, 100.0]]), entropy_loss_ratio=0.1, entropy_temperature=0.01)
    z = as_map(torch.zeros(4, 2)).requires_grad_()
    _, loss, _ = q(z)
    loss.backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(q.embedding.weight.grad).all()


# -- usage and perplexity ----------------------------------------------------------------------------------------------
def test_usage_and_perplexity_on_a_constructed_case():
    codes = torch.eye(4)
    q = quantizer(codes, usage_window=2)
    batch = lambda ids: as_map(codes[ids])  # noqa: E731
    _, _, info = q(batch([0, 0, 1, 1]))
    torch.testing.assert_close(info["perplexity"], torch.tensor(2.0))
    assert info["batch_usage"] == 0.5 and info["usage"] == 0.5
    _, _, info = q(batch([2, 2, 2, 2]))
    torch.testing.assert_close(info["perplexity"], torch.tensor(1.0))
    assert info["batch_usage"] == 0.25 and info["usage"] == 0.75  # {0, 1} ∪ {2}
    _, _, info = q(batch([2, 2, 2, 3]))
    torch.testing.assert_close(
        info["perplexity"], torch.tensor(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    )
    assert info["usage"] == 0.5  # last two batches: {2} ∪ {2, 3}
    # survives a state-dict round trip; eval forwards do not count
    q2 = VectorQuantizer(4, 4, usage_window=2)
    q2.load_state_dict(q.state_dict())
    assert q2.usage() == 0.5 and int(q2.batches_seen) == 3
    _, _, info = q2.eval()(batch([0, 1, 2, 3]))
    assert info["usage"] == 0.5 and info["batch_usage"] == 1.0 and info["perplexity"] == pytest.approx(4.0)
    torch.testing.assert_close(perplexity_from_counts(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])), torch.tensor(4.0))


# -- state dicts -------------------------------------------------------------------------------------------------------
def test_state_dict_keys_and_loading_taming_and_diffusers_codebooks():
    theirs = DiffusersVQ(16, 4, beta=0.25).state_dict()
    assert set(theirs) == {"embedding.weight"}  # taming's VectorQuantizer2 without remap has the same single key
    default = VectorQuantizer(16, 4)
    assert [name for name, _ in default.named_parameters()] == ["embedding.weight"]
    assert set(default.state_dict()) == {"embedding.weight", "code_last_used", "batches_seen"}
    assert set(VectorQuantizer(16, 4, stats_in_state_dict=False).state_dict()) == set(theirs)
    DiffusersVQ(16, 4, beta=0.25).load_state_dict(VectorQuantizer(16, 4, stats_in_state_dict=False).state_dict())
    assert set(VectorQuantizer(16, 4, ema=True).state_dict()) == {
        "embedding.weight",
        "code_last_used",
        "batches_seen",
        "ema_cluster_size",
        "ema_embed_sum",
    }
    # taming / diffusers codebooks load strictly into every variant; statistics start from the loaded codes
    prefixed = {"quantize.embedding.weight": theirs["embedding.weight"]}
    for kwargs in [{}, dict(ema=True, restart_dead_codes=True), dict(kmeans_init=True), dict(restart_dead_codes=True)]:
        q = VectorQuantizer(16, 4, **kwargs)
        q.code_last_used.fill_(5)
        wrapper = torch.nn.Module()
        wrapper.quantize = q
        wrapper.load_state_dict(prefixed)
        assert torch.equal(q.embedding.weight, theirs["embedding.weight"]) and not q.code_last_used.any()
        if q.ema:
            assert torch.equal(q.ema_embed_sum, theirs["embedding.weight"]) and (q.ema_cluster_size == 1).all()
        if q.kmeans_init:
            assert q.initialized  # a loaded codebook is not overwritten by k-means
    with pytest.raises(RuntimeError, match="Missing key"):
        VectorQuantizer(16, 4).load_state_dict({})


def test_bad_indices_raise_one_clear_sentence():
    q = VectorQuantizer(8, 2)
    for bad in (torch.tensor([[[0, 8]]]), torch.tensor([[[-1, 0]]])):
        with pytest.raises(ValueError, match=r"token indices must lie in \[0, 8\) for a codebook of 8 codes"):
            q.decode_indices(bad)
    with pytest.raises(ValueError, match="integer indices"):
        q.decode_indices(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"shape \(N, h, w\)"):
        q.decode_indices(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(N, 2, h, w\)"):
        q(torch.zeros(1, 3, 2, 2))


# -- distributed: every rank keeps the same codebook ------------------------------------------------------------------
class ThreadedDist:
    """Just enough of ``torch.distributed`` for the quantizer, for ranks that are threads of this process."""

    class ReduceOp:
        SUM = "sum"

    def __init__(self, world: int):
        self.world, self.local = world, threading.local()
        self.barrier, self.slots = threading.Barrier(world), [None] * world

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return self.world

    def all_reduce(self, t, op=None):
        assert op == self.ReduceOp.SUM
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        total = sum(self.slots)
        self.barrier.wait()
        t.copy_(total)

    def broadcast(self, t, src):
        if self.local.rank == src:
            self.slots[src] = t.clone()
        self.barrier.wait()
        value = self.slots[src]
        self.barrier.wait()
        t.copy_(value)


def run_ranks(monkeypatch, make, data):
    """Run ``make()`` on each rank's list of batches in threads that share a fake process group."""
    import lightgen.first_stage.quantize as quantize

    fake = ThreadedDist(len(data))
    monkeypatch.setattr(quantize, "dist", fake)
    results, errors = [None] * len(data), []

    def rank(r):
        try:
            fake.local.rank = r
            q = make()
            for x in data[r]:
                q(x)
            results[r] = q.state_dict()
        except BaseException as exc:  # reported below
            errors.append(exc)
            fake.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(data))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    monkeypatch.undo()
    assert not errors, errors
    return results


def test_distributed_ema_equals_one_process_on_the_global_batch(monkeypatch):
    gen = torch.Generator().manual_seed(10)
    codebook = torch.randn(8, 3, generator=gen)
    data = [[torch.randn(2, 3, 4, 4, generator=gen) + r for _ in range(3)] for r in range(2)]
    a, b = run_ranks(monkeypatch, lambda: quantizer(codebook, ema=True), data)
    single = quantizer(codebook, ema=True)
    for x0, x1 in zip(*data):
        single(torch.cat([x0, x1]))
    for key, value in single.state_dict().items():
        assert torch.equal(a[key], b[key]), key
        torch.testing.assert_close(a[key], value, rtol=1e-5, atol=1e-6)


def test_distributed_ranks_keep_the_same_codebook(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    data = [[torch.randn(2, 3, 4, 4, generator=gen) + 2 * r for _ in range(3)] for r in range(2)]
    torch.manual_seed(0)  # the threads share torch's RNG; only rank 0's draws are used
    options = dict(kmeans_init=True, restart_dead_codes=True, dead_code_threshold=2.0)
    for kwargs in (dict(ema=True, **options), dict(l2_normalize=True, **options)):
        a, b = run_ranks(monkeypatch, lambda kwargs=kwargs: VectorQuantizer(8, 3, **kwargs), data)
        for key in a:
            assert torch.equal(a[key], b[key]), key
        assert int(a["batches_seen"]) == 3 and a["initialized"]


def _gloo_worker(rank: int, world: int, port: int, path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different local RNG and data per rank
        q = VectorQuantizer(8, 3, ema=True, kmeans_init=True, restart_dead_codes=True, dead_code_threshold=2.0)
        for _ in range(3):
            q(torch.randn(2, 3, 4, 4) + rank)
        torch.save(q.state_dict(), f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gloo_ranks_keep_the_same_codebook(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "sd")
    mp.spawn(_gloo_worker, args=(2, port, path), nprocs=2, join=True)
    a, b = (torch.load(f"{path}.{r}") for r in range(2))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert int(a["batches_seen"]) == 3
