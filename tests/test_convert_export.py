"""Export of lightgen runs: ``python -m lightgen.convert export ckpt=... to=official|diffusers out=...``.

(1) the official layout round-trips exactly (DiT, MDTv2, latent DiffiT: every tensor of the run's EMA, buffers
included, into a net built from the recorded kwargs with ``strict=True``); (2) the diffusers folder reloads with
``DiTTransformer2DModel.from_pretrained`` and gives lightgen's ε (after the timestep-frequency patch), and
``DiTPipeline`` runs with it; (3) bad input exits 2 with one sentence and writes nothing.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMOKE, run_cli
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from lightgen.compose import method_from_checkpoint
from lightgen.convert import load_official_dit, match_official_timestep_embedding
from lightgen.convert.__main__ import main
from lightgen.convert.export import export_diffusers, export_official
from lightgen.convert.released import load_released
from lightgen.utils.errors import LightgenConfigError

# Two steps at lr 1e-2 with EMA decay 0.5: the EMA has left the zero-initialised output layers and differs
# from the trained net, so "the EMA was exported, not the net" is testable.
TINY_RUN = ["trainer.max_steps=2", "optim.optimizer.lr=1e-2", "method.ema_decay=0.5",
            "callbacks.checkpoint.every_n_train_steps=2", "callbacks.sample_grid.samples_per_class=1"]  # fmt: skip
NETS = {
    "dit": [],  # smoke's dit_tiny: depth 2, width 64, 4 heads, patch 4
    "mdt": [
        "model=mdt_s",
        "model.hidden_size=32",
        "model.depth=4",
        "model.num_heads=2",
        "model.decode_layer=2",
        "model.patch_size=8",
    ],  # fmt: skip
    "diffit": ["model=diffit_s", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8"],
}
FILES = {"dit": "DiT-d2h64-4-32x32.pt", "mdt": "ema_0.5_000002.pt", "diffit": "diffit_32.safetensors"}
BUFFERS = {"dit": "pos_embed", "mdt": "en_inblocks.0.attn.rel_pos_bias.relative_position_index",
           "diffit": "blocks.0.attn.relative_position_index"}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny training run per family, through the real entry point: name -> run directory."""
    root = tmp_path_factory.mktemp("export_runs")
    for name, overrides in NETS.items():
        run_cli("train", *SMOKE, *TINY_RUN, *overrides, f"hydra.run.dir={root / name}")
    return {name: root / name for name in NETS}


def _inputs(net, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, net.in_channels, net.input_size, net.input_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, net.num_classes, (n,), generator=g)
    y[-1] = net.num_classes  # the null class
    return x, t, y


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*"))


# ---------------------------------------------------------------------------------------------
# (1) to=official: export -> import is exact
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", list(NETS))
@torch.no_grad()
def test_official_export_round_trips_the_ema_exactly(runs, tmp_path, name):
    module, cfg, _ = method_from_checkpoint(runs[name] / "checkpoints" / "last.ckpt")
    path = export_official(runs[name], tmp_path / "export")  # a path without suffix: a directory
    assert path == tmp_path / "export" / FILES[name]
    info = json.loads((path.parent / f"{path.stem}.lightgen_export.json").read_text())
    expected_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.method.net).items() if k != "_target_"}
    assert info["format"] == "official" and info["file"] == path.name and info["weights"] == "ema"
    assert info["global_step"] == 2 and info["ema_decay"] == 0.5 and info["net"]["kwargs"] == expected_kwargs

    if name == "diffit":  # the released diffit_256.safetensors layout
        from safetensors.torch import load_file

        sd = load_file(path)
    else:  # a raw state dict, as DiT-XL-2-256x256.pt / MDT's ema_0.9999_*.pt
        sd = torch.load(path, map_location="cpu", weights_only=True)
    ema, net = module.ema.state_dict(), module.net.state_dict()
    if name == "diffit":  # safetensors stores its own order
        assert sorted(sd) == sorted(ema), "every tensor, buffers included"
    else:
        assert list(sd) == list(ema), "the official key order, buffers included"
    assert BUFFERS[name] in sd
    for k, v in ema.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k
    assert any(not torch.equal(sd[k], net[k]) for k in net), "the EMA is written, not the trained net"

    build = lambda: get_class(info["net"]["target"])(**info["net"]["kwargs"]).eval()  # from the recorded kwargs
    fresh = build()
    fresh.load_state_dict(sd, strict=True)  # as the official code loads it
    x, t, y = _inputs(fresh)
    ours = module.ema(x, t, y)
    assert ours.abs().max() > 1e-3
    assert torch.equal(fresh(x, t, y), ours)

    # lightgen's importer of released files: MDT and DiffiT come back from the shapes alone; a DiT file does not
    # hold its head count (the importer assumes the official count for the width), so the recorded kwargs build it
    imported, rel = load_released(path, build() if name == "dit" else None)
    assert rel.family == info["family"]
    assert torch.equal(imported.eval()(x, t, y), ours)
    if name == "dit":  # and the importer of official DiT files
        imported = load_official_dit(instantiate(cfg.method.net), path).eval()
        assert torch.equal(imported(x, t, y), ours)


@pytest.mark.slow
def test_official_export_of_the_trained_net_to_a_named_file(runs, tmp_path):
    module, _, _ = method_from_checkpoint(runs["dit"] / "checkpoints" / "last.ckpt")
    path = export_official(runs["dit"] / "checkpoints" / "last.ckpt", tmp_path / "raw.pt", use_ema=False)
    assert path == tmp_path / "raw.pt" and (tmp_path / "raw.lightgen_export.json").is_file()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    net = module.net.state_dict()
    assert list(sd) == list(net) and all(torch.equal(sd[k], v) for k, v in net.items())
    assert json.loads((tmp_path / "raw.lightgen_export.json").read_text())["weights"] == "net"


# ---------------------------------------------------------------------------------------------
# (2) to=diffusers: the same ε as lightgen's net
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@torch.no_grad()
def test_diffusers_export_gives_lightgen_eps_and_runs_in_dit_pipeline(runs, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    module, _, _ = method_from_checkpoint(runs["dit"] / "checkpoints" / "last.ckpt")
    out = tmp_path / "dit_diffusers"
    out.mkdir()  # an existing empty directory is taken
    assert export_diffusers(runs["dit"], out) == out
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "diffusion_pytorch_model.safetensors", "lightgen_export.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["norm_eps"] == 1e-6 and config["num_attention_heads"] == 4 and config["num_embeds_ada_norm"] == 10
    assert config["in_channels"] == 1 and config["out_channels"] == 2 and config["sample_size"] == 32

    x, t, y = _inputs(module.ema, n=6)
    ours = module.ema(x, t, y)
    theirs = DiTTransformer2DModel.from_pretrained(out, low_cpu_mem_usage=False).eval()
    unpatched = (theirs(x, t, y).sample - ours).abs().max().item()
    match_official_timestep_embedding(theirs)
    torch.testing.assert_close(theirs(x, t, y).sample, ours, atol=1e-5, rtol=1e-5)
    assert ours.abs().max() > 0.1
    # diffusers' timestep frequencies (downscale_freq_shift=1) are not a config field: without the patch the
    # reloaded model is close but not equal; the export measured and recorded both differences
    assert 1e-6 < unpatched < 1e-2
    record = json.loads((out / "lightgen_export.json").read_text())
    assert record["weights"] == "ema" and record["global_step"] == 2
    assert all(config[k] == v for k, v in record["diffusers_config"].items())
    diffs = record["timestep_embedding"]
    assert diffs["max_abs_eps_diff_after_match_official_timestep_embedding"] <= 1e-5
    assert diffs["max_abs_eps_diff_from_pretrained"] > 1e-6

    vae = AutoencoderKL(  # a tiny f1 VAE with the run's 1 latent channel (DiTPipeline decodes latents / 0.18215)
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        norm_num_groups=4,
        latent_channels=1,
    )
    pipe = DiTPipeline(transformer=theirs, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[0, 3], guidance_scale=1.0, num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.slow
def test_diffusers_export_is_dit_only(runs, tmp_path):
    with pytest.raises(LightgenConfigError, match=r"to=diffusers exports DiT only .* holds MDT; use to=official"):
        export_diffusers(runs["mdt"], tmp_path / "mdt_diffusers")
    assert not (tmp_path / "mdt_diffusers").exists()


# ---------------------------------------------------------------------------------------------
# (3) bad input: exit 2, one sentence, nothing written
# ---------------------------------------------------------------------------------------------
BAD = [
    (["export", "to=official", "out={tmp}/x"], "ckpt= is missing; usage: python -m lightgen.convert export"),
    (["export", "ckpt={tmp}/nope.ckpt", "to=official", "out={tmp}/x"], "does not exist"),
    (["export", "ckpt={dit}", "to=onnx", "out={tmp}/x"], "to=onnx is not an export format; pass to=official"),
    (["export", "ckpt={dit}", "to=official", "out={tmp}/x", "ema=true"], "unknown argument 'ema=true'"),
    (["export", "ckpt={dit}", "to=official", "out={tmp}/x", "use_ema=maybe"], "use_ema=maybe is not a boolean"),
    (["frobnicate", "ckpt={dit}"], "unknown command 'frobnicate'"),
    (["export", "ckpt={tmp}/raw_state_dict.pt", "to=official", "out={tmp}/x"], "not a lightgen training checkpoint"),
    (["export", "ckpt={tmp}/notes.txt", "to=official", "out={tmp}/x"], "cannot be read as a torch checkpoint"),
    (["export", "ckpt={tmp}/maskgit.ckpt", "to=official", "out={tmp}/x"], "holds MaskGIT, but export supports DiT"),
    (["export", "ckpt={dit}", "to=official", "out={tmp}/taken.pt"], "already exists; pass another out="),
    (["export", "ckpt={dit}", "to=official", "out={tmp}/x.safetensors"], "official DiT layout is a torch.save"),
    (["export", "ckpt={dit}", "to=diffusers", "out={tmp}/full"], "is not empty; pass a new or empty directory"),
    (["export", "ckpt={mdt}", "to=diffusers", "out={tmp}/x"], "exports DiT only"),
]


@pytest.fixture
def bad_inputs(runs, tmp_path):
    from lightgen.nets import DiT

    torch.save(DiT(input_size=8, hidden_size=32, depth=1, num_heads=2).state_dict(), tmp_path / "raw_state_dict.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    ckpt = torch.load(runs["dit"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ckpt["lightgen"]["config"]["method"]["net"]["_target_"] = "lightgen.nets.maskgit.MaskGIT"
    torch.save(ckpt, tmp_path / "maskgit.ckpt")
    (tmp_path / "taken.pt").write_bytes(b"keep me")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep me")
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize(("argv", "phrase"), BAD, ids=[row[1].split(";")[0][:40] for row in BAD])
def test_bad_input_exits_2_with_one_sentence_and_writes_nothing(runs, bad_inputs, capsys, argv, phrase):
    snapshot = lambda: {p: p.read_bytes() if p.is_file() else None for p in bad_inputs.rglob("*")}
    before = snapshot()
    argv = [a.format(tmp=bad_inputs, dit=runs["dit"], mdt=runs["mdt"]) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightgen.convert: ") and phrase in lines[0], captured.err
    assert "Traceback" not in captured.err
    assert snapshot() == before, "nothing written, nothing changed"


@pytest.mark.slow
def test_the_module_entry_point_exports_and_refuses_to_overwrite(runs, tmp_path):
    out = tmp_path / "exported.pt"
    proc = run_cli("convert", "export", f"ckpt={runs['mdt']}", "to=official", f"out={out}")
    assert f"wrote {out}" in proc.stdout and out.is_file()
    first = out.read_bytes()
    again = run_cli("convert", "export", f"ckpt={runs['mdt']}", "to=official", f"out={out}", check=False)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines() == [f"lightgen.convert: out: {out} already exists; pass another out= "
                                                 "(an export never overwrites)."]  # fmt: skip
    assert out.read_bytes() == first
    assert _files(tmp_path) == sorted(
        p.relative_to(tmp_path) for p in (out, tmp_path / "exported.lightgen_export.json")
    )
