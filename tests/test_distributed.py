"""Several processes through accelerate: ``accelerate launch --multi_gpu --num_processes 2`` on a machine
without GPUs starts two CPU processes (gloo). Each trains on its share of every batch and the gradients
are summed, so the LoRA equals one process's with the same global batch — also when a bucket's last batch
is smaller than the number of processes. One process writes the files."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_files import write_checkpoint
from lib_charlora import cli
from lib_charlora.demo import demo_dataset
from lib_charlora.engine.evaluate import read_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    path, _ = write_checkpoint(str(root), "sd1", name="model")
    (root / "pics").mkdir()
    for i, im in enumerate(demo_dataset(5, 64, "pipchr")):  # 5 pictures, batch 2: a last batch of 1
        im.image.save(root / "pics" / f"{i}.png")
    return root, path


def _args(work, out, *extra):
    root, ckpt = work
    return ["train", "--checkpoint", ckpt, "--images", str(root / "pics"), "--name", "pip", "--trigger", "pipchr",
            "--resolution", "64", "--rank", "4", "--steps", "5", "--batch-size", "2", "--train-text-encoder",
            "--preset", "fast", "--out", str(root / out), *extra]


def _launch(work, out, *extra, processes=2):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines",
                           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lib_charlora",
                           *_args(work, out, *extra)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


def test_two_processes_train_the_same_lora_as_one(work, capsys):
    root, _ = work
    assert cli.main(_args(work, "single", "--save-every", "2")) == 0, capsys.readouterr().err
    run = _launch(work, "ddp", "--save-every", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("Saved ") == 1 and "2 processes" in run.stderr  # one process prints
    one, two = load_file(str(root / "single" / "pip.safetensors")), load_file(str(root / "ddp" / "pip.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k].float(), two[k].float(), atol=2e-3, rtol=1e-2), k  # fp16 files
    changed = sum(not torch.equal(v, torch.zeros_like(v)) for k, v in two.items() if "lora_up" in k)
    assert changed > 0
    assert read_metadata(str(root / "ddp" / "pip.safetensors"))["ss_steps"] == "5"
    files = sorted(f for f in os.listdir(root / "ddp") if not f.startswith("."))
    assert files == ["pip.json", "pip.preview.png", "pip.safetensors", "pip_checkpoints"]
    assert sorted(os.listdir(root / "ddp" / "pip_checkpoints")) == [
        "pip-step000002.safetensors", "pip-step000002.state", "pip-step000004.safetensors", "pip-step000004.state"]


def test_global_batch_smaller_than_the_processes_is_refused(work):
    run = _launch(work, "small", "--batch-size", "1")
    assert run.returncode != 0
    assert run.stderr.count("error: --batch-size: is the global batch, shared by the 2 processes") == 1
    assert not os.path.exists(work[0] / "small" / "pip.safetensors")
