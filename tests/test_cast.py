"""Casts: characters trained and tested one after another on one loaded checkpoint; a failing character
does not stop the others; running the cast again skips the finished ones and resumes an interrupted one;
a shared LoRA with one trigger per character; bad cast files refused before anything is trained."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from checkpoint_files import write_checkpoint
from lib_charlora import cli
from lib_charlora.demo import demo_dataset
from lib_charlora.engine.evaluate import read_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEST = """
[test]
prompts = ["photo of {trigger}"]
seeds = [1]
strengths = [1.0]
steps = 2
width = 64
height = 64
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("cast")
    write_checkpoint(str(root), "sd1", name="model")
    for who, seed, n in (("pip", 0, 5), ("bob", 7, 5), ("few", 3, 3)):
        (root / who).mkdir()
        for i, im in enumerate(demo_dataset(n, 64, who + "chr", seed=seed)):
            im.image.save(root / who / f"{i}.png")
    return root


def _cast(base, folder, text):
    work = base / folder
    work.mkdir()
    for who in ("pip", "bob", "few"):
        os.symlink(base / who, work / who)
    path = work / "cast.toml"
    path.write_text(f'checkpoint = "{base / "model.safetensors"}"\n' + text, encoding="utf-8")
    return work, path


def _state(work):
    return json.loads((work / "loras" / "cast.cast.json").read_text(encoding="utf-8"))


CHARACTERS = """
[defaults]
preset = "fast"
steps = 3
resolution = 64
rank = 4

[[character]]
name = "pip"
trigger = "pipchr"
images = "pip"

[[character]]
name = "few"
trigger = "fewchr"
images = "few"

[[character]]
name = "bob"
trigger = "bobchr"
images = "bob"
steps = 4
rank = 8
"""


def test_cast_trains_each_character_goes_on_after_a_failure_and_skips_done_ones(base, capsys):
    work, path = _cast(base, "separate", CHARACTERS + TEST)
    assert cli.main(["cast", str(path)]) == 1  # one character failed
    out = capsys.readouterr().err
    state = _state(work)["characters"]
    assert state["pip"]["status"] == "done" and state["bob"]["status"] == "done"
    assert state["few"]["status"] == "failed" and "only 3 usable pictures" in state["few"]["error"]
    pip, bob = read_metadata(str(work / "loras" / "pip.safetensors")), read_metadata(str(work / "loras" / "bob.safetensors"))
    assert (pip["ss_steps"], pip["ss_network_dim"], pip["modelspec.trigger_phrase"]) == ("3", "4", "pipchr")
    assert (bob["ss_steps"], bob["ss_network_dim"], bob["modelspec.trigger_phrase"]) == ("4", "8", "bobchr")
    for who, grids in (("pip", 3), ("bob", 4)):  # each tested: a grid per checkpoint (every step here) + the final
        assert len(state[who]["grids"]) == grids and all(os.path.isfile(g) for g in state[who]["grids"])
        assert state[who]["best"]["checkpoint"] == f"{who}.safetensors"  # no scores offline: the final file
    assert "pip        pipchr   done    3" in out and "few: only 3 usable pictures" in out
    mtimes = {w: os.path.getmtime(work / "loras" / f"{w}.safetensors") for w in ("pip", "bob")}

    assert cli.main(["cast", str(path)]) == 1
    out = capsys.readouterr().err
    assert "pip: done earlier" in out and "bob: done earlier" in out and "few: failed" in out
    assert {w: os.path.getmtime(work / "loras" / f"{w}.safetensors") for w in ("pip", "bob")} == mtimes


def test_rerun_after_an_interruption_skips_the_first_and_resumes_the_second_to_the_same_weights(base, capsys):
    """Ctrl-C while the second character trains: stopped and saved; the rerun skips the first and resumes
    the second from its last checkpoint to exactly the weights of an uninterrupted run."""
    options = "steps = {steps}\nsave_every = 1\nresolution = 64\nrank = 4\npreset = \"fast\"\n"
    work, path = _cast(base, "resume", "[test]\nenabled = false\n\n"
                       "[[character]]\nname = \"bob\"\ntrigger = \"bobchr\"\nimages = \"bob\"\n" + options.format(steps=2) +
                       "\n[[character]]\nname = \"pip\"\ntrigger = \"pipchr\"\nimages = \"pip\"\n" + options.format(steps=60))
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "lib_charlora", "cast", str(path), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    on_pip = False
    for line in proc.stdout:
        event = json.loads(line)
        on_pip = on_pip or event.get("character") == "pip"
        if on_pip and event["event"] == "progress" and event["step"] >= 3:
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    state = _state(work)["characters"]
    assert state["bob"]["status"] == "done" and state["pip"]["status"] == "stopped" and 3 <= state["pip"]["steps"] < 60
    assert read_metadata(str(work / "loras" / "pip.safetensors"))["ss_steps"] == str(state["pip"]["steps"])
    bob_time = os.path.getmtime(work / "loras" / "bob.safetensors")

    assert cli.main(["cast", str(path)]) == 0
    out = capsys.readouterr().err
    assert "bob: done earlier" in out and f"pip: resuming from pip-step{state['pip']['steps']:06d}.state" in out
    assert _state(work)["characters"]["pip"]["status"] == "done"
    assert os.path.getmtime(work / "loras" / "bob.safetensors") == bob_time
    assert read_metadata(str(work / "loras" / "pip.safetensors"))["ss_steps"] == "60"

    assert cli.main(["train", "--checkpoint", str(base / "model.safetensors"), "--images", str(base / "pip"), "--name",
                     "pip", "--trigger", "pipchr", "--steps", "60", "--save-every", "1", "--resolution", "64", "--rank",
                     "4", "--preset", "fast", "--out", str(work / "straight")]) == 0
    from safetensors.torch import load_file
    resumed, straight = load_file(str(work / "loras" / "pip.safetensors")), load_file(str(work / "straight" / "pip.safetensors"))
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in resumed)


def test_shared_cast_is_one_lora_with_a_trigger_per_character(base, capsys):
    work, path = _cast(base, "shared", """
mode = "shared"
name = "duo"

[defaults]
steps = 3
resolution = 64
rank = 4
checkpoint_count = 1

[[character]]
name = "pip"
trigger = "pipchr"
images = "pip"

[[character]]
name = "bob"
trigger = "bobchr"
images = "bob"
""" + TEST)
    assert cli.main(["cast", str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().err
    assert sorted(f for f in os.listdir(work / "loras") if f.endswith(".safetensors")) == ["duo.safetensors"]
    md = read_metadata(str(work / "loras" / "duo.safetensors"))
    assert md["modelspec.trigger_phrase"] == "pipchr, bobchr"
    assert json.loads(md["charlora_cast_triggers"]) == {"pip": "pipchr", "bob": "bobchr"}
    tags = {t for folder in json.loads(md["ss_tag_frequency"]).values() for t in folder}
    assert tags == {"photo of pipchr", "photo of bobchr"}  # each caption led by its character's trigger
    assert json.loads(md["ss_dataset_dirs"]) == {"pip": {"n_repeats": 1, "img_count": 5},
                                                 "bob": {"n_repeats": 1, "img_count": 5}}
    assert md["ss_num_train_images"] == "10"
    state = _state(work)["characters"]
    assert state["duo"]["status"] == "done"
    for who in ("pip", "bob"):  # each character tested with its own trigger and pictures
        report = json.loads(open(state[f"duo:{who}"]["report"], encoding="utf-8").read())
        assert report["trigger"] == f"{who}chr" and len(state[f"duo:{who}"]["grids"]) == 2
    assert "no trigger word" not in out
    assert "pip        pipchr   done" in out and "bob        bobchr   done" in out


@pytest.mark.parametrize("text,message", [
    ("[[character]]\nname = \"a\"\nimages = \"pip\"\nstepz = 3\n", "character 1 (a): unknown option 'stepz'"),
    ("[[character]]\nname = \"a\"\nimages = \"pip\"\n[[character]]\nname = \"A\"\nimages = \"bob\"\n",
     "the name 'A' is used twice"),
    ("[[character]]\nname = \"a\"\nimages = \"nowhere\"\n", "character 1 (a): no such folder"),
    ("[[character]]\nname = \"../a\"\nimages = \"pip\"\n", "character 1 (../a): name:"),
    ("mode = \"shared\"\n[[character]]\nname = \"a\"\nimages = \"pip\"\n", "needs name ="),
    ("[defaults]\nsteps = -1\n[[character]]\nname = \"a\"\nimages = \"pip\"\n", "a: steps: must be >= 1"),
    ("[[character]]\nname = \"a\"\nimages = \"pip\"\nsteps = \"many\"\n", "a: steps: must be an integer"),
    ("this is not toml", "is not valid TOML"),
    ("", "no characters"),
])
def test_bad_cast_files_are_refused_before_training(base, capsys, text, message, tmp_path):
    work, path = _cast(base, f"bad{abs(hash(text))}", text)
    assert cli.main(["cast", str(path)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert message in last and last.startswith(f"error: {path}: "), err
    assert not os.path.exists(work / "loras" / "a.safetensors")
