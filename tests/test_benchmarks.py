"""The benchmark scripts run to the end and write every figure (the figures themselves are not asserted:
speed is compared side by side inside one benchmark run, never by a timed test)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_speed_smoke(tmp_path):
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_speed.py"), "--size", "tiny",
                        "--steps", "20", "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"ours", "reference", "a1111"}
    for name, v in report["variants"].items():
        assert "error" not in v, (name, v)
        ms = v["ms_per_step"]
        assert 0 < ms["min"] <= ms["median"] <= ms["max"], (name, ms)
        assert v["timed_steps"] == 2 * 19 and v["steps_per_s"] > 0  # 2 rounds, the first step of each not timed
        assert v["peak_memory_mb"] is not None and v["peak_memory_mb"] >= 0
    assert report["ratio_vs_reference"] == round(report["variants"]["ours"]["ms_per_step"]["median"]
                                                 / report["variants"]["reference"]["ms_per_step"]["median"], 3)
    assert report["ratio_a1111_vs_reference"] > 0
    assert report["peak_memory_mb"] == report["variants"]["ours"]["peak_memory_mb"]
    assert report["device"] == "cpu" and "No CUDA device here" in r.stdout
    assert "ours / reference (ms per step)" in r.stdout


def test_train_speed_refuses_what_it_cannot_measure():
    script = os.path.join(ROOT, "benchmarks", "train_speed.py")
    for args, words in [(["--steps", "1"], "--steps must be 2 or more"),
                        (["--variants", "ours,kohya"], "--variants: unknown kohya"),
                        (["--device", "cpu", "--precision", "fp16"], "--precision fp16 needs CUDA"),
                        (["--device", "cuda"], "sees no CUDA device")]:
        r = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr[-500:])


def test_vs_kohya_names_what_is_missing(tmp_path, capsys):
    """Without kohya the comparison refuses before building anything: each refusal names what is missing
    and exits 2 (a one-line message, no traceback; nothing fetched or installed)."""
    script = os.path.join(ROOT, "benchmarks", "vs_kohya.py")
    scratch, empty = tmp_path / "scratch", tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([sys.executable, script, "--kohya-dir", str(empty), "--scratch", str(scratch)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and f"--kohya-dir {empty} has no train_network.py" in r.stderr, r.stderr[-1000:]
    assert "Traceback" not in r.stderr and list(scratch.iterdir()) == []

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import vs_kohya
    fake = tmp_path / "sd-scripts"  # the files the script checks for, no kohya code
    for name in ("train_network.py", "networks/lora.py", "library/train_util.py"):
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text("")
    for args, words in [(["--kohya-dir", str(tmp_path / "nowhere")], "no such folder"),
                        (["--kohya-dir", str(fake), "--kohya-python", str(tmp_path / "py")], "no such file")]:
        assert vs_kohya.main([*args, "--scratch", str(scratch)]) == 2
        assert words in capsys.readouterr().err
    for args, words in [(["--steps", "1"], "--steps must be 2 or more"),
                        (["--sides", "ours,a1111"], "--sides"),
                        (["--scratch", os.path.join(ROOT, "scratch")], "inside this repository")]:
        with pytest.raises(SystemExit) as e:
            vs_kohya.main(args)
        assert e.value.code == 2 and words in capsys.readouterr().err
    assert list(scratch.iterdir()) == []


def test_full_size_checkpoint_is_sd15():
    """The random full-size checkpoint vs_kohya.py trains on has SD1.5's keys and shapes (built on the meta
    device: no weights): the published parameter counts of v1-5's UNet, VAE and CLIP ViT-L (kohya builds
    those from hard-coded configs and loads strictly), and diffusers models built from the configs our
    loader derives take exactly the converted keys."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel

    from checkpoint_files import checkpoint_state
    from lib_charlora.hosts import checkpoint_file as cf
    with torch.device("meta"):
        sd, _ = checkpoint_state("sd1", "full")
    parts = (cf.UNET, cf.VAE, "cond_stage_model.")
    assert sum(k.startswith(parts) for k in sd) == len(sd)
    assert {p: sum(v.numel() for k, v in sd.items() if k.startswith(p)) for p in parts} == {
        cf.UNET: 859_520_964, cf.VAE: 83_653_863, "cond_stage_model.": 123_060_480}
    layout = cf.layout_of(sd)
    assert (layout.arch, layout.unet["attention_head_dim"], layout.text[0][0]["num_hidden_layers"]) == ("sd1", 8, 12)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**layout.unet), AutoencoderKL(**layout.vae)
        te = CLIPTextModel(CLIPTextConfig(**layout.text[0][0]))

    def shapes(state):  # CLIP's keys with or without "text_model." (it differs across transformers versions)
        return {k.removeprefix("text_model."): tuple(v.shape) for k, v in state.items()
                if not k.endswith("position_ids")}
    assert shapes(convert_ldm_unet_checkpoint(sd, unet.config)) == shapes(unet.state_dict())
    assert shapes(convert_ldm_vae_checkpoint(sd, vae.config)) == shapes(vae.state_dict())
    assert shapes(convert_ldm_clip_checkpoint(sd)) == shapes(te.state_dict())
