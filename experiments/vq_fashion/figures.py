"""Figures of a vq_fashion run: reconstructions of Fashion-MNIST test images and the codebook-usage curve.

    python experiments/vq_fashion/figures.py <run dir> [out dir]

Reads <run dir>/config.yaml, checkpoints/last.ckpt and metrics.csv; writes recon_grid.png (two test images
of each class, originals above, reconstructions below), usage.png, rec_l1.png and summary.json into the out dir.
"""

from __future__ import annotations

import csv
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from lightgen.utils.plots import plot_curves


def test_images(root: Path, per_class: int = 2) -> torch.Tensor:
    def idx(name):
        with gzip.open(root / name) as f:
            data = f.read()
        ndim = data[3]
        return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)

    images = idx("t10k-images-idx3-ubyte.gz").reshape(-1, 28, 28)
    labels = idx("t10k-labels-idx1-ubyte.gz")
    pick = [i for c in range(10) for i in np.flatnonzero(labels == c)[:per_class]]
    x = torch.from_numpy(images[pick].astype(np.float32) / 127.5 - 1.0)[:, None]
    return torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)  # 28 -> 32, as the data module


def to_rows(x: torch.Tensor, per_row: int) -> np.ndarray:
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().byte()[:, 0].numpy()
    rows = [np.concatenate(list(x[i : i + per_row]), axis=1) for i in range(0, len(x), per_row)]
    return np.concatenate(rows, axis=0)


def main(run: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.load(run / "config.yaml")
    fs_cfg = OmegaConf.to_container(cfg.first_stage, resolve=True)
    fs_cfg["checkpoint"] = str(run / "checkpoints" / "last.ckpt")
    fs = instantiate(fs_cfg).eval()
    x = test_images(Path(sys.argv[3]) if len(sys.argv) > 3 else Path("/usr/share/datasets/fashion-mnist"))
    with torch.no_grad():
        idx = fs.encode_to_indices(x)
        rec = fs.decode_indices(idx)
    grid = np.concatenate([to_rows(x, 20), np.full((4, 32 * 20), 255, np.uint8), to_rows(rec, 20)], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out / "recon_grid.png")

    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train/loss")]
    step = [int(r["step"]) for r in rows]
    usage = [float(r["train/codebook_usage"]) for r in rows]
    ppl = [float(r["train/perplexity"]) / fs.codebook_size for r in rows]
    rec_l1 = [float(r["train/rec"]) for r in rows]
    plot_curves(
        {
            "usage (last 100 batches)": (step, usage),
            f"perplexity / {fs.codebook_size}": (step, ppl),
            "0.9": (step, [0.9] * len(step)),
        },
        out / "usage.png",
        title="vq_fashion: codebook usage",
        xlabel="autoencoder step",
    )
    plot_curves({"train L1 per pixel": (step, rec_l1)}, out / "rec_l1.png", title="vq_fashion: reconstruction L1",
                xlabel="autoencoder step")  # fmt: skip

    test_usage = len(torch.unique(idx)) / fs.codebook_size
    summary = {
        "logged_steps": len(rows),
        "last_step": step[-1],
        "final_codebook_usage": usage[-1],
        "final_batch_perplexity": ppl[-1] * fs.codebook_size,
        "final_train_l1": rec_l1[-1],
        "grid_test_l1": float((rec - x).abs().mean()),
        "grid_test_mse": float((rec - x).square().mean()),
        "codes_used_by_the_20_grid_images": test_usage,
        "gan_steps_logged": sum(1 for r in rows if r.get("train/g_loss")),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent)
