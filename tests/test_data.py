"""Data: IDX reading, Fashion-MNIST lookup and errors, the resumable world-size independent sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_idx

from lightgen.data import FashionMNISTDataModule, InfiniteBatchSampler, SyntheticDataModule
from lightgen.data.fashion_mnist import DEBIAN_DIR, read_idx
from lightgen.utils.errors import LightgenConfigError


def test_read_idx_roundtrip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        write_idx(tmp_path / name, a)
        np.testing.assert_array_equal(read_idx(tmp_path / name), a)


def test_read_idx_rejects_truncated_files(tmp_path):
    write_idx(tmp_path / "x-idx3-ubyte", np.zeros((4, 28, 28), np.uint8))
    raw = (tmp_path / "x-idx3-ubyte").read_bytes()
    (tmp_path / "x-idx3-ubyte").write_bytes(raw[:-10])
    with pytest.raises(LightgenConfigError, match="truncated"):
        read_idx(tmp_path / "x-idx3-ubyte")


def test_fashion_mnist_is_padded_to_32_scaled_and_labelled(fake_fashion_mnist):
    dm = FashionMNISTDataModule(root=str(fake_fashion_mnist), batch_size=16, random_flip=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    x, y = batch["image"], batch["label"]
    assert x.shape == (16, 1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.long and 0 <= y.min() and y.max() < 10
    # 2-pixel black border (value 0 -> -1), content of the fake images is never 0
    assert torch.all(x[:, :, :2] == -1) and torch.all(x[:, :, -2:] == -1) and torch.all(x[:, :, :, :2] == -1)
    assert torch.all(x[:, :, 2:30, 2:30] > -1) and x.max() <= 1
    raw = read_idx(fake_fashion_mnist / "train-images-idx3-ubyte.gz")
    assert len(dm.dataset) == len(raw) == 200


def test_missing_fashion_mnist_says_where_it_looked_and_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("LIGHTGEN_DATA", raising=False)
    dm = FashionMNISTDataModule(root=None, batch_size=8, system_dirs=[str(tmp_path / "sys"), str(tmp_path / "deb")])
    with pytest.raises(LightgenConfigError) as err:
        dm.check()
    msg = str(err.value)
    assert str(tmp_path / "sys") in msg and str(tmp_path / "deb") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "\n" not in msg


def test_an_explicit_root_that_does_not_hold_the_data_is_not_replaced_by_another_copy(
    tmp_path, fake_fashion_mnist, monkeypatch
):
    monkeypatch.setenv("LIGHTGEN_DATA", str(fake_fashion_mnist))  # a copy exists elsewhere: not used
    dm = FashionMNISTDataModule(root=str(tmp_path / "missing"), batch_size=8, system_dirs=[str(fake_fashion_mnist)])
    with pytest.raises(LightgenConfigError, match=r"data.root=\S+missing does not hold Fashion-MNIST \(train\)"):
        dm.check()


def test_lightgen_data_env_is_searched(fake_fashion_mnist, monkeypatch):
    monkeypatch.setenv("LIGHTGEN_DATA", str(fake_fashion_mnist))
    dm = FashionMNISTDataModule(root=None, batch_size=8)
    dm.check()
    dm.setup()
    assert len(dm.dataset) == 200


@pytest.mark.skipif(
    not Path(DEBIAN_DIR, "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist_has_60k_balanced_images():
    dm = FashionMNISTDataModule(root=None, batch_size=64)
    images, labels = dm.load()
    assert images.shape == (60000, 1, 32, 32)
    assert np.bincount(labels).tolist() == [6000] * 10


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_is_world_size_independent():
    one = _take(InfiniteBatchSampler(50, 8, seed=3, random_flip=True), 20)
    r0 = _take(InfiniteBatchSampler(50, 8, rank=0, world_size=2, seed=3, random_flip=True), 20)
    r1 = _take(InfiniteBatchSampler(50, 8, rank=1, world_size=2, seed=3, random_flip=True), 20)
    for b, a0, a1 in zip(one, r0, r1):
        assert b == a0 + a1 and not set(a0) & set(a1)


def test_sampler_covers_each_epoch_once_and_resumes_by_step():
    s = InfiniteBatchSampler(48, 8, seed=1)
    first_epoch = sum(_take(s, 6), [])
    assert sorted(first_epoch) == list(range(48))
    full = _take(InfiniteBatchSampler(48, 8, seed=1), 15)
    resumed = _take(InfiniteBatchSampler(48, 8, seed=1, start_batch=9), 6)
    assert resumed == full[9:]


def test_sampler_flip_bit_is_reproducible_and_decoded_by_the_dataset():
    dm = SyntheticDataModule(num_samples=16, batch_size=16, random_flip=True, image_size=8, channels=1)
    dm.setup()
    s = InfiniteBatchSampler(16, 16, seed=0, random_flip=True)
    idx = _take(s, 1)[0]
    assert any(i >= 16 for i in idx) and any(i < 16 for i in idx)
    batch = dm.dataset.__getitems__(idx)
    plain = dm.dataset.__getitems__([i % 16 for i in idx])
    for k, i in enumerate(idx):
        expected = plain["image"][k].flip(-1) if i >= 16 else plain["image"][k]
        assert torch.equal(batch["image"][k], expected)


def test_sampler_rejects_bad_batches():
    with pytest.raises(ValueError, match="divisible by the 2 processes"):
        InfiniteBatchSampler(100, 7, world_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        InfiniteBatchSampler(4, 8)


def test_synthetic_data_is_deterministic_and_class_structured():
    a = SyntheticDataModule(num_samples=40, batch_size=8, seed=5)
    b = SyntheticDataModule(num_samples=40, batch_size=8, seed=5)
    a.setup(), b.setup()
    assert torch.equal(a.dataset.images, b.dataset.images)
    imgs, labels = a.dataset.images.float(), a.dataset.labels
    # two images of the same class share their bright square; different classes do not
    same = [i for i in range(40) if labels[i] == labels[0]]
    assert ((imgs[same[0]] > 200) == (imgs[same[1]] > 200)).all()
    other = next(i for i in range(40) if labels[i] != labels[0])
    assert not ((imgs[0] > 200) == (imgs[other] > 200)).all()


def test_center_crop_arr_matches_adm_recipe():
    from PIL import Image

    from lightgen.data.imagenet import center_crop_arr

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 700, 3), dtype=np.uint8))
    out = center_crop_arr(img, 64)  # 300 >= 128 -> BOX halve to 150x350 -> 150 >= 128 -> 75x175 -> bicubic
    assert out.shape == (64, 64, 3)
    small = img.resize((350, 150), Image.BOX).resize((175, 75), Image.BOX)
    expected = np.array(small.resize((round(175 * 64 / 75), 64), Image.BICUBIC))
    left = (expected.shape[1] - 64) // 2
    np.testing.assert_array_equal(out, expected[:, left : left + 64])


def test_image_folder_datamodule_reads_a_class_tree(tmp_path):
    from PIL import Image

    from lightgen.data.imagenet import ImageFolderDataModule

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    dm = ImageFolderDataModule(root=str(tmp_path), batch_size=4, image_size=16, num_classes=2, num_workers=0)
    dm.check()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].abs().max() <= 1
    assert dm.class_names == ["cat", "dog"] and set(batch["label"].tolist()) <= {0, 1}
    with pytest.raises(LightgenConfigError, match="data.num_classes=2"):
        ImageFolderDataModule(root=str(tmp_path), batch_size=4, image_size=16, num_classes=5).check()
    with pytest.raises(LightgenConfigError, match="does not exist"):
        ImageFolderDataModule(root=str(tmp_path / "nope"), batch_size=4).check()
