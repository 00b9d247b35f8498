"""The command line over a checkpoint file: train (with checkpoints, previews, resume, Ctrl-C), evaluate,
and bad input named by its flag with exit code 2."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

from checkpoint_files import write_checkpoint
from lib_charlora import cli
from lib_charlora.demo import demo_dataset
from lib_charlora.engine.evaluate import read_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    path, _ = write_checkpoint(str(root), "sd1", name="tiny-sd15")
    pics = root / "pics" / "2_pip"
    pics.mkdir(parents=True)
    for i, im in enumerate(demo_dataset(5, 64, "pipchr")):
        im.image.save(pics / f"{i}.png")
        (pics / f"{i}.txt").write_text(im.caption, encoding="utf-8")
    return root, path


def _train_args(work, *extra, name="pip"):
    root, ckpt = work
    return ["train", "--checkpoint", ckpt, "--images", str(root / "pics"), "--name", name, "--trigger", "pipchr",
            "--resolution", "64", "--out", str(root / "loras"), *extra]


def test_train_then_evaluate(work, capsys):
    root, ckpt = work
    rc = cli.main(_train_args(work, "--steps", "4", "--save-every", "2", "--sample-every", "2", "--rank", "4",
                              "--train-text-encoder", "--preset", "fast"))
    err = capsys.readouterr().err
    assert rc == 0, err
    lora = root / "loras" / "pip.safetensors"
    assert lora.is_file() and (root / "loras" / "pip.preview.png").is_file() and (root / "loras" / "pip.json").is_file()
    md = read_metadata(str(lora))
    assert md["ss_steps"] == "4" and md["ss_network_dim"] == "4" and md["ss_sd_model_name"] == "tiny-sd15"
    import hashlib
    assert md["ss_new_sd_model_hash"] == hashlib.sha256(open(ckpt, "rb").read()).hexdigest()
    assert sorted(os.listdir(root / "loras" / "pip_checkpoints")) == ["pip-step000002.safetensors",
                                                                     "pip-step000002.state"]
    assert os.listdir(root / "loras" / "pip_samples") == ["pip-step000002.png"]  # the last one is the card's preview
    assert "<lora:pip:1> pipchr" in err

    out = root / "tests"
    rc = cli.main(["evaluate", "--checkpoint", ckpt, "--lora", "pip", "--loras", str(root / "loras"), "--out", str(out),
                   "--prompts", "photo of {trigger}", "{trigger} at the beach", "--seeds", "3", "--strengths", "0.5",
                   "1", "--steps", "2", "--width", "64", "--height", "64", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0
    end = lines[-1]
    assert end["event"] == "end" and end["status"] == "done"
    grids = end["result"]["grid_paths"]
    assert [os.path.basename(g) for g in grids] == ["pip-step000002-grid.png", "pip-grid.png"]
    for g in grids:  # rows: baseline + 2 strengths; columns: 2 prompts x 1 seed
        report = json.load(open(end["result"]["report_path"]))
        assert len(report["grid_rows"]) == 3 and len(report["grid_columns"]) == 2
        with Image.open(g) as im:
            assert im.width > 2 * 64 and im.height > 3 * 64
    assert {(s["checkpoint"], s["strength"]) for s in end["result"]["scores"]} == {
        (c, s) for c in ("pip-step000002.safetensors", "pip.safetensors") for s in (0.5, 1.0)}
    assert any(e["event"] == "progress" for e in lines)


def test_resume_continues_a_stopped_run(work, capsys):
    root, _ = work
    assert cli.main(_train_args(work, "--steps", "4", "--save-every", "2", "--rank", "4", name="res")) == 0
    full = read_metadata(str(root / "loras" / "res.safetensors"))
    from safetensors.torch import load_file
    full_tensors = load_file(str(root / "loras" / "res.safetensors"))
    state = root / "loras" / "res_checkpoints" / "res-step000002.state"
    os.remove(root / "loras" / "res.safetensors")
    rc = cli.main(_train_args(work, "--steps", "4", "--save-every", "2", "--rank", "4", "--resume", str(state),
                              name="res"))
    assert rc == 0, capsys.readouterr().err
    resumed = read_metadata(str(root / "loras" / "res.safetensors"))
    assert resumed["ss_steps"] == full["ss_steps"] == "4"
    resumed_tensors = load_file(str(root / "loras" / "res.safetensors"))
    assert all(torch.equal(full_tensors[k], resumed_tensors[k]) for k in full_tensors)  # the same run
    # settings that differ from the checkpoint's are refused, naming --resume
    os.remove(root / "loras" / "res.safetensors")
    rc = cli.main(_train_args(work, "--steps", "6", "--rank", "4", "--resume", str(state), name="res"))
    err = capsys.readouterr().err
    assert rc == 2 and "error: --resume: the checkpoint was made with different settings: steps 4 -> 6" in err


@pytest.mark.parametrize("change,flag", [
    (["--steps", "0"], "--steps"),
    (["--learning-rate", "-1"], "--learning-rate"),
    (["--resolution", "100"], "--resolution"),
    (["--images", "/no/such/folder"], "--images"),
    (["--name", "../evil"], "--name"),
    (["--checkpoint", "/no/such/model.safetensors"], "--checkpoint"),
    (["--resume", "/no/such.state"], "--resume"),
    (["--out", os.path.join(os.path.abspath(__file__), "loras")], "--out"),   # a folder under a file
])
def test_bad_input_names_the_flag(work, capsys, change, flag):
    args = _train_args(work, "--steps", "2", name="bad")
    i = args.index(change[0]) if change[0] in args else None
    if i is None:
        args += change
    else:
        args[i + 1] = change[1]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}:") or f"{flag}:" in err, err
    assert not (work[0] / "loras" / "bad.safetensors").exists()


def test_existing_lora_needs_overwrite_and_evaluate_unknown_lora(work, capsys):
    root, ckpt = work
    (root / "loras").mkdir(exist_ok=True)
    (root / "loras" / "taken.safetensors").write_bytes(b"x")
    assert cli.main(_train_args(work, "--steps", "2", name="taken")) == 2
    assert "--name:" in capsys.readouterr().err and (root / "loras" / "taken.safetensors").read_bytes() == b"x"
    assert cli.main(["evaluate", "--checkpoint", ckpt, "--lora", "nobody", "--loras", str(root / "loras")]) == 2
    assert "--lora:" in capsys.readouterr().err


def test_ctrl_c_stops_and_saves(work):
    """One Ctrl-C during training: the run stops at the next step, saves, and exits 0."""
    root, _ = work
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "lib_charlora", *_train_args(work, "--steps", "2000", "--rank", "4",
                                                                                   name="ctrlc"), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1]["event"] == "progress" and events[-1]["step"] >= 1:
            proc.send_signal(signal.SIGINT)
            break
    rest, err = proc.communicate(timeout=300)
    events += [json.loads(line) for line in rest.splitlines()]
    assert proc.returncode == 0, err
    end = events[-1]
    assert end["event"] == "end" and end["status"] == "done" and 1 <= end["step"] < 2000
    md = read_metadata(str(root / "loras" / "ctrlc.safetensors"))
    assert md["ss_steps"] == str(end["step"])


def test_train_from_an_sdxl_file_loads_into_diffusers_with_every_key(tmp_path, capsys):
    """SDXL layout (both text encoders, sgm's label_emb) with its .yaml: trained with the text encoders, and
    diffusers' own loader places every tensor of the file (it is refused otherwise)."""
    path, _ = write_checkpoint(str(tmp_path), "sdxl", name="tiny-xl")
    pics = tmp_path / "pics"
    pics.mkdir()
    for i, im in enumerate(demo_dataset(5, 64, "xlchr")):
        im.image.save(pics / f"{i}.png")
    rc = cli.main(["train", "--checkpoint", path, "--images", str(pics), "--name", "xl", "--trigger", "xlchr",
                   "--steps", "2", "--resolution", "64", "--rank", "4", "--train-text-encoder", "--out", str(tmp_path / "l")])
    assert rc == 0, capsys.readouterr().err
    lora = str(tmp_path / "l" / "xl.safetensors")
    md = read_metadata(lora)
    assert md["ss_base_model_version"].startswith("sdxl") and md["ss_sd_model_name"] == "tiny-xl"
    from safetensors.torch import load_file
    keys = load_file(lora).keys()
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # SDXL UNet: kohya's compvis-style names
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    from lib_charlora.hosts.checkpoint_file import load_host
    host = load_host(path)
    before = {k: v.clone() for k, v in host.unet.module.state_dict().items()}
    base = host.generate("xlchr", 1, 64, 64, 2)
    with_lora = host.generate("xlchr", 1, 64, 64, 2, lora=(lora, 1.0))  # raises if a tensor is not placed
    host.release()
    import numpy as np
    assert np.abs(np.asarray(base, dtype=int) - np.asarray(with_lora, dtype=int)).max() > 0
    assert all(torch.equal(before[k], v) for k, v in host.unet.module.state_dict().items())
