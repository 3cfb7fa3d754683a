"""Image and plot helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lightgen.utils.image_grids import make_grid_array, to_uint8
from lightgen.utils.plots import plot_curves, smooth


def test_to_uint8_rounds_like_dit_sample_ddp():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 6)
    expected = np.clip(127.5 * x.numpy() + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(to_uint8(x).numpy(), expected)


def test_grid_puts_nrow_images_per_row():
    imgs = torch.stack([torch.full((1, 4, 4), v) for v in torch.linspace(-1, 1, 6)])
    grid = make_grid_array(imgs, nrow=3, padding=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1)
    assert grid[1, 1] == to_uint8(imgs[:1])[0, 0, 0, 0] and grid[6, 11] == to_uint8(imgs[5:])[0, 0, 0, 0]


def test_plot_curves_draws_each_series(tmp_path):
    path = plot_curves({"a": ([0, 1, 2], [1.0, 0.5, 0.2]), "b": ([0, 2], [0.3, 0.9])}, tmp_path / "p.png")
    arr = np.asarray(Image.open(path))
    assert arr.shape == (420, 720, 3)
    assert ((arr == (31, 119, 180)).all(-1)).sum() > 50 and ((arr == (255, 127, 14)).all(-1)).sum() > 50
    with pytest.raises(ValueError):
        plot_curves({}, tmp_path / "q.png")
    assert smooth([1.0, 0.0], 0.5) == [1.0, 0.5]


def test_plot_curves_logx_spaces_decades_evenly(tmp_path):
    blue = (31, 119, 180)
    log = np.asarray(Image.open(plot_curves({"a": ([10, 100, 1000], [3.0, 1.0, 2.0])}, tmp_path / "l.png", logx=True)))
    lin = np.asarray(Image.open(plot_curves({"a": ([1, 2, 3], [3.0, 1.0, 2.0])}, tmp_path / "n.png")))
    assert ((log == blue).all(-1) == (lin == blue).all(-1)).all()  # the same curve; only tick labels differ
    with pytest.raises(ValueError, match="positive"):
        plot_curves({"a": ([0, 1], [1.0, 2.0])}, tmp_path / "z.png", logx=True)
