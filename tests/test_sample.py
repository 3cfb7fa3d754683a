"""lightgen.sample at scale: sharding over processes, determinism, resume, the ADM npz, guidance schedules."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from conftest import SMOKE, run_cli

from lightgen.diffusion.guidance import guidance_scale, power_cosine_scale
from lightgen.sampling import batch_seed, grid_indices, make_labels
from lightgen.utils.npz import NpzMember, write_npz_streaming


# -- pure functions --------------------------------------------------------------------------
def test_power_cosine_is_one_at_the_start_and_cfg_scale_at_the_end():
    t = torch.tensor([999, 750, 500, 250, 0])
    s = power_cosine_scale(t, cfg_scale=3.8, scale_pow=4.0, num_timesteps=1000)
    assert s[0].item() == pytest.approx(1.0, abs=1e-9)
    assert s[-1].item() == pytest.approx(3.8, abs=1e-12)
    assert torch.all(s[1:] >= s[:-1]), "guidance grows as t goes to 0"
    # closed form at t=500: (1 - cos(pi * 0.5**4)) / 2 = 0.0096074...
    assert s[2].item() == pytest.approx(1 + 2.8 * (1 - np.cos(np.pi * 0.5**4)) / 2, rel=1e-12)
    assert guidance_scale(t, 3.8, "constant") == 3.8
    with pytest.raises(ValueError, match="not a guidance schedule"):
        guidance_scale(t, 3.8, "cosine")


def test_balanced_labels_cover_every_class_in_a_seeded_order():
    a = make_labels("balanced", 100, 10, seed=0)
    assert torch.bincount(a, minlength=10).tolist() == [10] * 10
    assert torch.equal(a, make_labels("balanced", 100, 10, seed=0))
    assert not torch.equal(a, make_labels("balanced", 100, 10, seed=1))
    assert a[:10].unique().numel() > 3, "not class-major: any prefix mixes classes"
    u = make_labels("uniform", 1000, 10, seed=0)
    assert u.min() >= 0 and u.max() <= 9 and torch.bincount(u).min() > 60
    assert make_labels([3, 5], 5, 10, seed=0).tolist() == [3, 3, 3, 5, 5]


def test_batch_seeds_differ_per_batch_and_seed():
    seeds = {batch_seed(s, b) for s in range(3) for b in range(100)}
    assert len(seeds) == 300 and all(0 <= x < 2**63 for x in seeds)


def test_grid_indices_one_row_per_class():
    labels = np.array([2, 0, 1, 0, 2, 1, 1, 0])
    idx, nrow = grid_indices(labels, per_class=2, max_classes=2)
    assert idx == [1, 3, 2, 5] and nrow == 2


def test_streaming_npz_equals_np_savez(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(7, dtype=np.int64)
    write_npz_streaming(
        tmp_path / "s.npz", {"arr_0": NpzMember(arr.shape, np.uint8, [arr[:3], arr[3:]]), "arr_1": labels}
    )
    np.savez(tmp_path / "ref.npz", arr_0=arr, arr_1=labels)
    got, ref = np.load(tmp_path / "s.npz"), np.load(tmp_path / "ref.npz")
    assert sorted(got.files) == sorted(ref.files) == ["arr_0", "arr_1"]
    np.testing.assert_array_equal(got["arr_0"], ref["arr_0"])
    np.testing.assert_array_equal(got["arr_1"], ref["arr_1"])
    # ADM's evaluator reads arr_0 straight from the zip member as a .npy stream
    with zipfile.ZipFile(tmp_path / "s.npz") as zf, zf.open("arr_0.npy") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        assert shape == (7, 4, 4, 3) and not fortran and dtype == np.uint8
    with pytest.raises(ValueError, match="expected 7"):
        write_npz_streaming(tmp_path / "bad.npz", {"arr_0": NpzMember(arr.shape, np.uint8, [arr[:3]])})
    assert not (tmp_path / "bad.npz").exists(), "a failed write leaves nothing under the final name"


# -- the CLI ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_ckpt(tmp_path_factory):
    """4 steps at lr 1e-2 with EMA decay 0.5: unlike DiT's defaults after 4 steps (an EMA still at the
    zero-initialised output layers), net and EMA both give label-dependent outputs and differ from each
    other, so samples depend on the labels, the weights and the guidance."""
    run = tmp_path_factory.mktemp("smoke_sample_run")
    run_cli("train", *SMOKE, "optim.optimizer.lr=1e-2", "method.ema_decay=0.5", f"hydra.run.dir={run}")
    return run / "checkpoints" / "last.ckpt"


def _sample(ckpt, out, *extra, check=True):
    return run_cli(
        "sample",
        f"ckpt={ckpt}",
        "num_samples=10",
        "batch_size=4",
        "steps=3",
        f"out={out}",
        *extra,
        check=check,
    )


@pytest.mark.slow
def test_two_processes_give_the_same_samples_as_one(smoke_ckpt, tmp_path):
    """Guided (cfg 4) samples of a trained EMA: 2 processes write the same npz as 1, labels included.

    The checkpoint's EMA is far from the zero init and from the net, and one sample per label is checked
    to change with the label, so one rank using other labels, the raw net or no guidance would show.
    """
    sd = torch.load(smoke_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    k = "final_layer.linear.weight"
    assert sd[f"ema.{k}"].abs().max() > 1e-3 and (sd[f"ema.{k}"] - sd[f"net.{k}"]).abs().max() > 1e-3
    _sample(smoke_ckpt, tmp_path / "one", "cfg_scale=4.0")
    _sample(smoke_ckpt, tmp_path / "two", "cfg_scale=4.0", "trainer=ddp_cpu")
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert a["arr_0"].shape == (10, 32, 32, 1) and a["arr_0"].dtype == np.uint8 and a["arr_1"].dtype == np.int64
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    np.testing.assert_array_equal(a["arr_1"], make_labels("balanced", 10, 10, seed=0).numpy())
    assert len({x.tobytes() for x in a["arr_0"]}) == 10, "every sample is different"
    # batch 0 again with every label set to sample 0's: the same noise, so only the relabelled samples change
    c = int(a["arr_1"][0])
    _sample(smoke_ckpt, tmp_path / "relabelled", "cfg_scale=4.0", "num_samples=4", f"labels=[{c}]")
    r = np.load(tmp_path / "relabelled" / "samples.npz")["arr_0"]
    same = [bool(np.array_equal(r[i], a["arr_0"][i])) for i in range(4)]
    assert same == [bool(a["arr_1"][i] == c) for i in range(4)], (same, a["arr_1"][:4])
    info = json.loads((tmp_path / "two" / "sample_info.json").read_text())
    assert info["world_size"] == 2 and info["num_samples"] == 10 and info["batch_size"] == 4
    assert not (tmp_path / "two" / ".parts").exists(), "parts are removed once merged"


@pytest.mark.slow
def test_resume_samples_only_missing_batches_and_other_settings_are_refused(smoke_ckpt, tmp_path):
    ref = tmp_path / "ref"
    _sample(smoke_ckpt, ref)
    out = tmp_path / "out"
    parts = out / ".parts"
    parts.mkdir(parents=True)
    # a previous job of the same settings died after batch 1: its part must be kept, not redone
    full = np.load(ref / "samples.npz")["arr_0"]
    marker = np.full_like(full[4:8], 7)
    np.save(parts / "batch_0000001.npy", marker)
    settings = json.loads((ref / "sample_info.json").read_text())
    settings = {k: v for k, v in settings.items() if k not in ("world_size", "shape")}
    (parts / "settings.json").write_text(json.dumps(settings))
    proc = _sample(smoke_ckpt, out)
    assert "1 batches already done" in proc.stderr
    got = np.load(out / "samples.npz")["arr_0"]
    np.testing.assert_array_equal(got[4:8], marker)
    np.testing.assert_array_equal(got[:4], full[:4])
    np.testing.assert_array_equal(got[8:], full[8:])
    # a finished directory of other settings is never overwritten
    before = (out / "samples.npz").read_bytes()
    proc = _sample(smoke_ckpt, out, "cfg_scale=2.0", check=False)
    assert proc.returncode == 2 and "already holds samples made with other settings" in proc.stderr
    assert "cfg_scale: 4.0 -> 2.0" in proc.stderr
    assert (out / "samples.npz").read_bytes() == before


def test_power_cosine_changes_sampling_and_bad_schedules_fail(smoke_ckpt, tmp_path):
    from lightgen.compose import method_from_checkpoint

    module, _, _ = method_from_checkpoint(smoke_ckpt)
    y = torch.tensor([1, 2])

    def gen(**kw):
        g = torch.Generator().manual_seed(0)
        return module.generate(y, cfg_scale=4.0, steps=3, generator=g, decode=False, use_ema=False, **kw)

    const, pc = gen(), gen(cfg_schedule="power_cosine", scale_pow=4.0)
    assert torch.equal(const, gen(cfg_schedule="constant")) and not torch.equal(const, pc)
    # a vanishing power guides with the full scale at every step: the constant schedule
    assert torch.allclose(gen(cfg_schedule="power_cosine", scale_pow=1e-9), const, atol=1e-5)
    proc = _sample(smoke_ckpt, tmp_path / "bad", "cfg_schedule=cosine", check=False)
    assert proc.returncode == 2 and "not a guidance schedule" in proc.stderr
    assert not (tmp_path / "bad").exists(), "nothing is written before the settings are validated"


def test_fast_samplers_through_the_cli_and_bad_steps_fail_first(smoke_ckpt, tmp_path):
    out = tmp_path / "dpm"
    _sample(smoke_ckpt, out, "sampler=dpmpp_2m", "cfg_scale=4.0")
    info = json.loads((out / "sample_info.json").read_text())
    assert info["sampler"] == "dpmpp_2m" and info["steps"] == 3
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape[0] == 10 and arr.std() > 0
    proc = _sample(smoke_ckpt, tmp_path / "bad", "sampler=euler", "steps=1001", check=False)
    assert proc.returncode == 2 and "steps=1001 does not fit sampler=euler" in proc.stderr
    assert not (tmp_path / "bad").exists(), "nothing is written before the settings are validated"
