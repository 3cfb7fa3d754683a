"""The benchmark scripts that no CPU run measures still run: the GPU benchmark, shrunk, on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_builds_every_method_and_counts_flops_linear_in_the_batch(tmp_path):
    cmd = [sys.executable, "experiments/benchmarks/gpu.py", "--tiny", "--device", "cpu", "--batches", "1,2"]
    cmd += ["--steps", "1", "--warmup", "0", "--sample-steps", "1", "--sample-reps", "1", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    rows = json.loads((tmp_path / "gpu_tiny_cpu.json").read_text())["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [
        (m, b) for m in ("DiT-XL/2", "MDTv2-XL/2", "DiffiT-XL/2", "MaskGIT-base", "VQ-Diffusion") for b in (1, 2)
    ]
    for one, two in zip(rows[::2], rows[1::2]):
        ratio = two["train_flops_per_step"] / one["train_flops_per_step"]
        if one["model"] == "MDTv2-XL/2":  # its masked pass keeps a random share of the tokens each step
            assert 1 < ratio < 3
        else:
            assert ratio == 2
        assert one["train_img_s"] > 0 and one["sample_img_s"] > 0 and "mfu" not in one  # no peak known for a CPU
    samplers = {r["model"]: (r["sampler"], r["sample_steps"]) for r in rows}
    assert samplers["DiT-XL/2"] == ("ddpm", 250) and samplers["MaskGIT-base"] == ("maskgit", 8)
    assert (tmp_path / "gpu_tiny_cpu.md").read_text().count("\n| ") == 11  # header + 10 rows
