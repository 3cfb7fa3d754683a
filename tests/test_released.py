"""Released weights: official-layout state dicts of DiT, MDT v1 / v2 and DiffiT (made here with the documented names
and shapes, random values) are recognised by their keys, load strictly, give the outputs of the net they came from,
and sample through ``lightgen.sample`` with their family's official defaults; anything else fails in one sentence."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from omegaconf import OmegaConf

from lightgen.compose import build_method, method_from_checkpoint
from lightgen.convert.released import identify, load_released, read_weights, released_run_config
from lightgen.nets.diffit import DiffiT
from lightgen.nets.dit import DiT
from lightgen.nets.mdt import MDT
from lightgen.utils.errors import LightgenConfigError

SMALL = dict(input_size=8, patch_size=2, in_channels=3, num_classes=10)
# DiT's head count is not in its shapes: a released DiT width has the official count (DiT-S: 384, 6 heads)
FAMILIES = {
    "dit": (lambda: DiT(hidden_size=384, depth=1, num_heads=6, **SMALL), "DiT", 1.5, "constant"),
    "mdt_v1": (
        lambda: MDT(hidden_size=64, depth=4, num_heads=4, version="v1", decode_layer=2, **SMALL),
        "MDT",
        3.8,
        "power_cosine",
    ),
    "mdt_v2": (
        lambda: MDT(hidden_size=64, depth=6, num_heads=2, version="v2", decode_layer=2, **SMALL),
        "MDT",
        3.8,
        "power_cosine",
    ),
    "diffit": (lambda: DiffiT(hidden_size=64, depth=2, num_heads=4, **SMALL), "DiffiT", 4.4, "power_cosine"),
}


def _perturbed(make):
    """A net with every parameter random (zero-initialised heads would hide a wrong mapping)."""
    torch.manual_seed(0)
    net = make()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net.eval()


def _outputs(net):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 8, 8, generator=g)
    t, y = torch.tensor([0, 500, 999]), torch.tensor([1, 5, 9])
    with torch.no_grad():
        return net(x, t, y)


@pytest.fixture(scope="module")
def released_files(tmp_path_factory):
    """Each family's official file layout: DiT a raw state dict (.pt), MDT {"ema", "model"} with a DDP prefix
    on the EMA, DiffiT safetensors."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("released")
    files, nets = {}, {}
    for key, (make, *_rest) in FAMILIES.items():
        net = _perturbed(make)
        nets[key] = net
        sd = net.state_dict()
        if key == "dit":
            path = root / "DiT-S-2-8.pt"
            torch.save(sd, path)
        elif key.startswith("mdt"):
            path = root / f"mdt_{key}_ckpt.pt"
            decoy = {k: torch.zeros_like(v) for k, v in sd.items()}  # "model": not the EMA
            torch.save({"ema": {f"module.{k}": v for k, v in sd.items()}, "model": decoy}, path)
        else:
            path = root / "diffit_8.safetensors"
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        files[key] = path
    return files, nets


@pytest.mark.parametrize("key", list(FAMILIES))
def test_released_files_are_recognised_load_strictly_and_match_their_net(released_files, key):
    files, nets = released_files
    _, family, cfg_scale, schedule = FAMILIES[key]
    net, rel = load_released(files[key])
    assert rel.family == family
    assert rel.kwargs["num_classes"] == 10 and rel.kwargs["input_size"] == 8 and rel.kwargs["learn_sigma"]
    assert rel.sampling["cfg_scale"] == cfg_scale and rel.sampling["cfg_schedule"] == schedule
    assert rel.sampling["steps"] == 250 and rel.sampling["sampler"] == "ddpm"
    if key.startswith("mdt"):
        assert rel.kwargs["version"] == key[-2:] and rel.kwargs["num_heads"] == nets[key].num_heads
    torch.testing.assert_close(_outputs(net.eval()), _outputs(nets[key]), rtol=0, atol=0)
    # the net of the family's experiment config (what lightgen.sample builds) gives the same outputs
    config = released_run_config(rel, "identity")
    module = build_method(OmegaConf.create(config["method"]))
    load_released(files[key], module.net)
    torch.testing.assert_close(_outputs(module.net.eval()), _outputs(nets[key]), rtol=0, atol=0)


def test_official_train_checkpoint_prefers_ema_and_derives_the_official_head_count(tmp_path):
    ema = _perturbed(FAMILIES["dit"][0])
    path = tmp_path / "0400000.pt"
    sd = ema.state_dict()
    torch.save({"model": {k: v + 1 for k, v in sd.items()}, "ema": sd, "opt": {}, "args": argparse.Namespace()}, path)
    net, rel = load_released(path)
    assert rel.kwargs["num_heads"] == 6 and rel.name == "DiT"
    torch.testing.assert_close(_outputs(net.eval()), _outputs(ema), rtol=0, atol=0)


def test_diffit_512_uses_the_constant_scale():
    net = DiffiT(hidden_size=64, depth=1, num_heads=4, input_size=64, patch_size=8, in_channels=4, num_classes=10)
    rel = identify(net.state_dict())
    assert rel.sampling["cfg_scale"] == 1.49 and rel.sampling["cfg_schedule"] == "constant"
    xl = {"x_embedder.proj.weight": torch.empty(1152, 4, 2, 2)}
    assert identify({**net.state_dict(), **xl}).name.startswith("DiffiT")  # shapes, not names, decide the rest


def test_unknown_and_mismatching_files_fail_in_one_sentence(released_files, tmp_path):
    files, _ = released_files
    foreign = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}, foreign)
    with pytest.raises(
        LightgenConfigError, match=r"2 tensors under conv1, fc, not the weights of a DiT, MDT or DiffiT"
    ):
        load_released(foreign)
    wrong = DiT(hidden_size=384, depth=2, num_heads=6, **SMALL)
    with pytest.raises(LightgenConfigError, match=r"holds DiT \(depth=1.*does not fit the network"):
        load_released(files["dit"], wrong)
    garbage = tmp_path / "half.pt"
    garbage.write_bytes(files["dit"].read_bytes()[:1000])
    with pytest.raises(LightgenConfigError, match="cannot be read"):
        read_weights(garbage)


def test_method_from_a_released_file_puts_the_weights_in_net_and_ema(released_files):
    files, nets = released_files
    module, cfg, ckpt = method_from_checkpoint(files["mdt_v2"], first_stage="identity")
    assert ckpt["global_step"] == -1 and ckpt["released"]["family"] == "MDT"
    assert ckpt["released"]["network"].startswith("MDTv2 (depth=6")
    for a, b in zip(module.ema.state_dict().values(), nets["mdt_v2"].state_dict().values()):
        assert torch.equal(a, b)
    assert module.sampling["cfg_schedule"] == "power_cosine" and cfg.method.sampling.scale_pow == 4.0


@pytest.mark.parametrize("key", ["dit", "mdt_v2", "diffit"])
def test_released_weights_sample_through_the_cli_with_their_family_defaults(released_files, tmp_path, key):
    files, _ = released_files
    out = tmp_path / "out"
    run_cli("sample", f"ckpt={files[key]}", "num_samples=4", "batch_size=4", "steps=3", f"out={out}")
    info = json.loads((out / "sample_info.json").read_text())
    _, family, cfg_scale, schedule = FAMILIES[key]
    assert info["released"]["family"] == family and info["released"]["file"] == str(files[key].resolve())
    assert info["released"]["first_stage"] == "identity"  # 3-channel inputs: pixels
    assert info["cfg_scale"] == cfg_scale and info["cfg_schedule"] == schedule and info["steps"] == 3
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (4, 8, 8, 3) and arr.std() > 0


def test_bad_released_input_on_the_cli_is_one_sentence(released_files, tmp_path):
    files, _ = released_files
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    for args, phrase in [
        ((f"ckpt={foreign}",), "not the weights of a DiT, MDT or DiffiT"),
        ((f"ckpt={files['dit']}", "first_stage=sd_vae_ft_ema"), "models 3-channel inputs"),
    ]:
        proc = run_cli("sample", *args, "num_samples=4", f"out={tmp_path / 'o'}", check=False)
        assert proc.returncode == 2 and phrase in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


# -- fine-tuning: init_from -------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from conftest import SMOKE

    run = tmp_path_factory.mktemp("init_src")
    run_cli("train", *SMOKE, "optim.optimizer.lr=1e-2", "method.ema_decay=0.5", f"hydra.run.dir={run}")
    return run / "checkpoints" / "last.ckpt"


def test_init_from_takes_net_and_ema_and_nothing_else(smoke_run):
    from lightgen.compose import init_from

    src, _, ckpt = method_from_checkpoint(smoke_run)
    fresh, _, _ = method_from_checkpoint(smoke_run)
    with torch.no_grad():
        for p in [*fresh.net.parameters(), *fresh.ema.parameters()]:
            p.zero_()
    what = init_from(fresh, smoke_run)
    assert what == f"a lightgen DiT checkpoint at step {ckpt['global_step']}"
    for a, b in [(fresh.net, src.net), (fresh.ema, src.ema)]:
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), k
    assert not all(torch.equal(x, y) for x, y in zip(src.net.parameters(), src.ema.parameters()))


def test_init_from_starts_a_new_run_at_step_zero_with_a_fresh_optimiser(smoke_run, tmp_path):
    from conftest import SMOKE

    src = torch.load(smoke_run, map_location="cpu", weights_only=False)
    run = tmp_path / "finetune"
    # lr 0 (AdamW without weight decay): the one step leaves the net exactly as loaded
    args = (*SMOKE, f"init_from={smoke_run}", "trainer.max_steps=1", "optim.optimizer.lr=0", f"hydra.run.dir={run}")
    proc = run_cli("train", *args)
    assert "starting at step 0 from a lightgen DiT checkpoint at step 4" in proc.stdout + proc.stderr
    new = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert new["global_step"] == 1
    (state,) = [s for s in new["optimizer_states"][0]["state"].values()][:1]
    assert float(state["step"]) == 1.0, "a fresh optimiser: one step taken, not the source's four"
    for k, v in src["state_dict"].items():
        if k.startswith("net."):
            assert torch.equal(new["state_dict"][k], v), k


def test_init_from_refuses_another_architecture_and_a_second_source(smoke_run, tmp_path):
    from conftest import SMOKE

    for extra, phrase in [
        (("model.depth=3",), "does not fit this run's model"),
        ((f"ckpt_path={smoke_run}",), "pass only one of them"),
    ]:
        run = tmp_path / "bad"
        proc = run_cli("train", *SMOKE, f"init_from={smoke_run}", *extra, f"hydra.run.dir={run}", check=False)
        assert proc.returncode == 2 and phrase in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not (run / "checkpoints").exists()


def test_init_from_a_released_file(released_files, tmp_path):
    files, nets = released_files
    module, _, _ = method_from_checkpoint(files["diffit"], first_stage="identity")
    with torch.no_grad():
        for p in [*module.net.parameters(), *module.ema.parameters()]:
            p.zero_()
    from lightgen.compose import init_from

    assert init_from(module, files["diffit"]).startswith("released DiffiT (depth=2")
    for a, b in zip(module.ema.state_dict().values(), nets["diffit"].state_dict().values()):
        assert torch.equal(a, b)
