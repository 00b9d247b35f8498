"""Fault matrix: a training through the real TrainService / JobRunner over the A1111 adapter and double, with
a LoRA of the same name already in the Lora folder, and a fault (exception, OOM, full disk, refresh failure),
a cancel or a stop-and-save in each phase. After each one:

a) the Lora folder holds exactly the expected files, no ``*.tmp`` anywhere, nothing half-written;
b) the old LoRA (and its card / preview) is byte-identical, or, for a job that completes, the new file is whole
   (loads, its ``sshs_model_hash`` matches its bytes) and is the new training's;
c) the base model is exactly as before (weights bit-identical, no hooks or instance attributes left, flags);
d) the job ends with the concrete status and message;
e) the next, normal job runs and ends ``done``.

Plus a process killed (SIGKILL) in the middle of the final save, and the restart that cleans its leftovers.
"""
import base64
import errno
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types

import pytest
import safetensors.torch
import torch

from lib_charlora.demo import draw_character
from lib_charlora.engine import export, statefile
from lib_charlora.engine.dataset import DatasetError
from lib_charlora.hosts.a1111 import A1111Host
from lib_charlora.service import TrainService
from tests.a1111_double import FakeNetworks, make_sd_model
from tests.conftest import assert_unchanged, snapshot

NS = types.SimpleNamespace
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_FILES = ("pip.json", "pip.preview.png", "pip.safetensors")


def _b64_png(seed):
    buf = io.BytesIO()
    draw_character(seed, 64).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


PICS = [_b64_png(i) for i in range(5)]


def _body(**kw):
    base = {"name": "pip", "trigger": "pipchr", "images": PICS, "preset": "fast", "steps": 2, "rank": 2,
            "resolution": 64, "overwrite": True}
    base.update(kw)
    return base


FAST = {"targets": "attention"}  # over every preset: fewer LoRA modules, a quicker run (hooks all the same)


def _make_host(sd_model):
    return A1111Host(sd_model, NS(lowvram=False, medvram=False), NS(CLIP_stop_at_last_layers=1),
                     NS(device="cpu", fp8=False), FakeNetworks())


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """One tiny model for the whole file, and the bytes of an 'old' LoRA made by a normal training."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model's ops: one thread is quicker and steadier on a busy 2-core machine
    try:
        sd_model = make_sd_model("sd1")
        host = _make_host(sd_model)
        before = snapshot(sd_model)  # the base model as it must stay through every test of this file
        lora_dir = tmp_path_factory.mktemp("first") / "Lora"
        service = TrainService(lambda: host, str(lora_dir), defaults=FAST)
        job = service.submit(_body(steps=3, seed=1))
        assert service.runner.wait(job.id, 120) and job.status == "done", job.error
        old = {f: (lora_dir / f).read_bytes() for f in OLD_FILES}
        assert sorted(os.listdir(lora_dir)) == list(OLD_FILES)
        yield NS(sd_model=sd_model, host=host, old=old, before=before)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def env(rig, tmp_path):
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    for f, data in rig.old.items():
        (lora_dir / f).write_bytes(data)
    lock = threading.Lock()  # A1111's queue_lock
    state = NS(interrupted=False, job=None, job_count=0, job_no=0, textinfo="")
    service = TrainService(lambda: rig.host, str(lora_dir), lock=lock, state=state, defaults=FAST)
    e = NS(rig=rig, service=service, lock=lock, state=state, lora_dir=lora_dir, root=tmp_path, before=rig.before)
    yield e
    assert service.runner.idle(60)


# -- checks ----------------------------------------------------------------------------------------

def _wait(env, job):
    assert env.service.runner.wait(job.id, 120), f"job stuck: {job.to_dict()}"
    return job


def _running(env):
    return next(j for j in env.service.runner.list() if j.status == "running")


def _temporaries(root):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".tmp"))


def _assert_old_intact(env, extra=()):
    assert sorted(os.listdir(env.lora_dir)) == sorted([*OLD_FILES, *extra])
    for f, data in env.rig.old.items():
        assert (env.lora_dir / f).read_bytes() == data, f"{f} changed"


def _assert_new_whole(env, steps):
    assert sorted(os.listdir(env.lora_dir)) == list(OLD_FILES)
    path = str(env.lora_dir / "pip.safetensors")
    data = open(path, "rb").read()
    assert data != env.rig.old["pip.safetensors"]
    tensors = safetensors.torch.load_file(path)  # whole: it loads, every tensor is there
    assert tensors and all(torch.isfinite(t.float()).all() for t in tensors.values())
    with safetensors.safe_open(path, "pt") as f:
        md = f.metadata()
    assert md["ss_steps"] == str(steps) and md["ss_seed"] == "0" and md["ss_output_name"] == "pip"
    assert md["sshs_model_hash"] == export.addnet_hash(path)  # the header's hash is of these very bytes
    assert set(tensors) == set(safetensors.torch.load(env.rig.old["pip.safetensors"]))


def _assert_next_job_runs(env):
    job = _wait(env, env.service.submit(_body(steps=1, seed=0)))
    assert job.status == "done" and job.error is None, job.to_dict()
    assert job.lora_path == str(env.lora_dir / "pip.safetensors")
    _assert_new_whole(env, 1)
    assert _temporaries(env.root) == []


# -- faults ----------------------------------------------------------------------------------------

class Inject:
    """At the ``nth`` call of one call site (of those ``match`` accepts) runs ``action``: ``("raise", exc)``
    or ``("stop", save)``."""

    def __init__(self, env, action, nth=1, match=None):
        self.env, self.action, self.nth, self.match = env, action, nth, match
        self.calls = 0
        self.fired = 0

    def hit(self, key=""):
        if self.match is not None and not self.match(key):
            return False
        self.calls += 1
        if self.calls == self.nth:
            self.fired += 1
            return True
        return False

    def fire(self, path=None, chunks=None):
        kind, value = self.action
        if kind == "stop":  # the API's stop: save=True keeps what is trained, save=False discards it
            job = _running(self.env)
            assert self.env.service.runner.stop(job.id, save=value) is job
            return
        if path is not None:  # a write that fails half-way: half the bytes are on disk
            data = b"".join(bytes(c) for c in chunks) if chunks is not None else b"partial"
            with open(path, "wb") as f:
                f.write(data[:len(data) // 2])
        raise value


def _patch(mp, env, where, inject):
    host = env.rig.host
    if where in ("encode_images", "predict", "sample", "refresh_lora_list"):
        real = getattr(host, where)

        def wrapper(*a, **k):
            if inject.hit():
                inject.fire()
            return real(*a, **k)
        mp.setattr(host, where, wrapper)
    elif where == "write":  # export's file write (the .safetensors / .json temporaries)
        real = export._write_file

        def write(path, chunks):
            chunks = list(chunks)
            if inject.hit(path):
                inject.fire(path, chunks)
            return real(path, chunks)
        mp.setattr(export, "_write_file", write)
    elif where == "state":  # the checkpoint's training-state file
        real = statefile.save

        def save(path, *a, **k):
            if inject.hit(path):
                inject.fire(path)
            return real(path, *a, **k)
        mp.setattr(statefile, "save", save)
    else:
        raise AssertionError(where)


def _final(name):
    return lambda path: os.path.basename(path) == name


def _ckpt(step):
    return lambda path: f"pip-step{step:06d}.safetensors" in path


RAISE = "raise"
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 8.00 GiB total capacity)"
CKPT_1 = ["pip-step000001.safetensors", "pip-step000001.state"]

# id: (call site, nth call, match, exception, body, status, step, error fragments, warning fragments,
#      outcome "old" (+ checkpoint folder listing) or "new" (steps in the file))
FAULTS = {
    "latent-caching": ("encode_images", 1, None, RuntimeError("injected: the VAE failed"), {}, "failed", 0,
                       ["RuntimeError: injected: the VAE failed"], [], "old"),
    "first-step": ("predict", 1, None, RuntimeError("injected: the UNet failed"), {}, "failed", 0,
                   ["RuntimeError: injected: the UNet failed"], [], "old"),
    "step-n": ("predict", 2, None, RuntimeError("injected: the UNet failed"), {}, "failed", 1,
               ["RuntimeError: injected: the UNet failed"], [], "old"),
    "oom-torch": ("predict", 2, None, torch.OutOfMemoryError(OOM), {}, "failed", 1,
                  ["OutOfMemoryError: CUDA out of memory", "try the Fast preset, a lower resolution"], [], "old"),
    "oom-runtime": ("predict", 2, None, RuntimeError(OOM), {}, "failed", 1,
                    ["RuntimeError: CUDA out of memory", "try the Fast preset, a lower resolution"], [], "old"),
    # a failed preview is only a warning: the training goes on and its file is written
    "preview": ("sample", 1, None, RuntimeError("injected: the sampler failed"), {"sample_every": 1}, "done", 2,
                [], ["a preview picture could not be made (RuntimeError: injected: the sampler failed)"], "new"),
    # the second checkpoint's LoRA file fails half-written: the first checkpoint stays whole (resumable); the
    # second one's state file was written (atomically) before its LoRA file
    "checkpoint-save": ("write", 1, _ckpt(2), RuntimeError("injected: checkpoint write failed"),
                        {"save_every": 1, "steps": 3}, "failed", 2,
                        ["RuntimeError: injected: checkpoint write failed"], [],
                        ("old", CKPT_1 + ["pip-step000002.state"])),
    "checkpoint-state-disk-full": ("state", 2, None, OSError(errno.ENOSPC, "No space left on device"),
                                   {"save_every": 1, "steps": 3}, "failed", 2,
                                   ["the disk is full", "No space left on device", "free some space"], [],
                                   ("old", CKPT_1)),
    "final-save": ("write", 1, _final("pip.safetensors.tmp"), RuntimeError("injected: write failed"), {},
                   "failed", 2, ["RuntimeError: injected: write failed"], [], "old"),
    "final-save-card": ("write", 1, _final("pip.json.tmp"), RuntimeError("injected: card write failed"), {},
                        "failed", 2, ["RuntimeError: injected: card write failed"], [], "old"),
    "final-save-disk-full": ("write", 1, _final("pip.safetensors.tmp"),
                             OSError(errno.ENOSPC, "No space left on device"), {}, "failed", 2,
                             ["the disk is full: pip.safetensors could not be written", "No space left on device",
                              "free some space", "previous file of that name, if any, is unchanged"], [], "old"),
    # the file is written when the WebUI's Lora list fails to refresh: the job keeps it, done with a warning
    "lora-list-refresh": ("refresh_lora_list", 1, None, RuntimeError("injected: Lora list failed"), {}, "done", 2,
                          [], ["the Lora list was not refreshed (RuntimeError: injected: Lora list failed); "
                               "press Refresh on the Lora cards"], "new"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault(env, fault):
    where, nth, match, exc, extra, status, step, errors, warnings, outcome = FAULTS[fault]
    inject = Inject(env, (RAISE, exc), nth, match)
    with pytest.MonkeyPatch.context() as mp:
        _patch(mp, env, where, inject)
        job = _wait(env, env.service.submit(_body(**extra)))
        assert inject.fired == 1, "the fault was not reached"
    assert job.status == status, job.to_dict()
    assert job.step == step
    if status == "failed":
        assert job.lora_path is None and job.error, job.to_dict()
        for text in errors:
            assert text in job.error, job.error
    else:
        assert job.error is None and job.lora_path == str(env.lora_dir / "pip.safetensors")
    for text in warnings:
        assert any(text in w for w in job.warnings), job.warnings
    assert _temporaries(env.root) == []
    if outcome == "new":
        _assert_new_whole(env, step)
    else:
        ckpts = outcome[1] if isinstance(outcome, tuple) else None
        _assert_old_intact(env, ["pip_checkpoints"] if ckpts else [])
        if ckpts:
            assert sorted(os.listdir(env.lora_dir / "pip_checkpoints")) == sorted(ckpts)
            safetensors.torch.load_file(str(env.lora_dir / "pip_checkpoints" / "pip-step000001.safetensors"))
    assert_unchanged(env.before, env.rig.sd_model)
    _assert_next_job_runs(env)


def test_intake_fault_is_refused_at_once(env):
    """Pictures that cannot be read when the request is checked: a clear refusal, nothing queued or touched."""
    from PIL import Image
    real_open = Image.open

    def unreadable(fp, *a, **k):
        if isinstance(fp, io.BytesIO):
            raise OSError("injected: cannot read the picture")
        return real_open(fp, *a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "open", unreadable)
        with pytest.raises(DatasetError) as e:
            env.service.submit(_body())
    assert "only 0 usable pictures" in str(e.value)
    files = e.value.report.to_dict()["files"]
    assert len(files) == 5 and all(not f["accepted"] and "injected: cannot read the picture" in f["reason"]
                                   for f in files)
    assert env.service.runner.list() == [] and env.service.runner.idle(0)  # nothing queued, no worker started
    assert _temporaries(env.root) == []
    _assert_old_intact(env)
    assert_unchanged(env.before, env.rig.sd_model)
    _assert_next_job_runs(env)


# -- cancel (save=False) and stop-and-save (save=True) in each phase ----------------------------------

# phase: (call site, nth, match) where the stop is sent
PHASES = {
    "latent-caching": ("encode_images", 1, None),
    "steps": ("predict", 1, None),
    "final-save": ("write", 1, _final("pip.safetensors.tmp")),
}
# (phase, save) -> (status, steps in the job, "old" or steps in the new file)
STOPS = {
    ("queued", False): ("cancelled", 0, "old"),
    ("queued", True): ("cancelled", 0, "old"),          # nothing trained yet: nothing to save
    ("latent-caching", False): ("cancelled", 0, "old"),
    ("latent-caching", True): ("cancelled", 0, "old"),  # stopped before the first step: nothing to save
    ("steps", False): ("cancelled", 1, "old"),
    ("steps", True): ("done", 1, 1),                    # the steps done so far are saved
    ("final-save", False): ("cancelled", 2, "old"),     # before the files are moved into place: the old one stays
    ("final-save", True): ("done", 2, 2),
}


@pytest.mark.parametrize("phase,save", list(STOPS), ids=[f"{p}-{'save' if s else 'cancel'}" for p, s in STOPS])
def test_stop(env, phase, save):
    status, step, outcome = STOPS[(phase, save)]
    if phase == "queued":
        env.lock.acquire()  # a generation holds the WebUI's queue lock: the first job waits for it, ours is queued
        try:
            first = env.service.submit(_body(name="first"))
            job = env.service.submit(_body())
            time.sleep(0.1)
            assert (first.status, job.status) == ("running", "queued")
            assert env.service.runner.stop(job.id, save=save) is job
            assert job.status == "cancelled"
            env.service.runner.stop(first.id, save=False)
        finally:
            env.lock.release()
        assert _wait(env, first).status == "cancelled"
    else:
        where, nth, match = PHASES[phase]
        inject = Inject(env, ("stop", save), nth, match)
        with pytest.MonkeyPatch.context() as mp:
            _patch(mp, env, where, inject)
            job = _wait(env, env.service.submit(_body()))
            assert inject.fired == 1, "the stop was not sent"
        if phase == "latent-caching":  # no other picture is encoded after the stop (a big set takes minutes)
            assert inject.calls == 1
    assert job.status == status and job.error is None, job.to_dict()
    assert job.step == step
    assert _temporaries(env.root) == []
    if outcome == "old":
        assert job.lora_path is None
        _assert_old_intact(env)
    else:
        assert job.lora_path == str(env.lora_dir / "pip.safetensors")
        _assert_new_whole(env, outcome)
    assert_unchanged(env.before, env.rig.sd_model)
    _assert_next_job_runs(env)


# -- a process killed in the middle of the final save; the restart cleans up ------------------------------

CHILD = textwrap.dedent("""
    import os, sys, time, types
    sys.path.insert(0, sys.argv[1])
    import torch
    torch.set_num_threads(1)
    from lib_charlora.engine import export
    from lib_charlora.hosts.a1111 import A1111Host
    from lib_charlora.service import TrainService
    from tests.a1111_double import make_sd_model
    from tests.test_faults import FAST, _body

    real = export._write_file

    def stalled(path, chunks):
        if os.path.basename(path) == "pip.safetensors.tmp":  # half the file is on disk when the process dies
            data = b"".join(bytes(c) for c in chunks)
            with open(path, "wb") as f:
                f.write(data[:len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            print("SAVING", flush=True)
            time.sleep(300)
        return real(path, chunks)

    export._write_file = stalled
    NS = types.SimpleNamespace
    host = A1111Host(make_sd_model("sd1"), NS(lowvram=False, medvram=False), NS(CLIP_stop_at_last_layers=1),
                     NS(device="cpu", fp8=False))
    service = TrainService(lambda: host, sys.argv[2], defaults=FAST)
    job = service.submit(_body(steps=1))
    service.runner.wait(job.id, 300)
    print("NOT KILLED", job.status, job.error, flush=True)
""")


def test_killed_during_final_save_then_restart_cleans_up(rig, tmp_path):
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    for f, data in rig.old.items():
        (lora_dir / f).write_bytes(data)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    err = open(tmp_path / "child.err", "w+")
    child = subprocess.Popen([sys.executable, str(script), REPO, str(lora_dir)], stdout=subprocess.PIPE,
                             stderr=err, text=True, cwd=REPO)
    watchdog = threading.Timer(240, child.kill)  # a child that never gets to the save does not hang the test
    watchdog.start()
    try:
        said = []
        for line in child.stdout:  # until the marker (or the child's end)
            said.append(line)
            if line.strip() == "SAVING":
                break
        assert said and said[-1].strip() == "SAVING", \
            f"child said {said!r}; stderr: {open(tmp_path / 'child.err').read()[-3000:]}"
        partial = lora_dir / "pip.safetensors.tmp"
        assert 0 < partial.stat().st_size < len(rig.old["pip.safetensors"]) * 0.75  # half a LoRA file
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        watchdog.cancel()
        if child.poll() is None:
            child.kill()
            child.wait(30)
        err.close()
    assert partial.is_file()  # what the killed process left: half a file, which does not load
    with pytest.raises(Exception):
        safetensors.torch.load_file(str(partial))
    for f, data in rig.old.items():
        assert (lora_dir / f).read_bytes() == data
    # and leftovers of earlier crashes, ours (to be removed) and not ours (to be kept)
    ours = ["pip_checkpoints/pip-step000002.state.tmp", "pip_checkpoints/pip-step000002.safetensors.tmp",
            "characters/zed.safetensors.tmp", "characters/zed.json.tmp", "characters/zed.preview.png.tmp",
            "other.preview.png.tmp"]
    theirs = ["notes.tmp", "model.ckpt.tmp", "pip.safetensors.tmp.bak", ".safetensors.tmp", "pip_checkpoints/x.bin.tmp",
              "characters/deeper/zed.safetensors.tmp", "other_extension/a.safetensors.tmp", "characters/zed.txt"]
    for rel in ours + theirs:
        (lora_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (lora_dir / rel).write_bytes(b"leftover")
    (lora_dir / "folder.safetensors.tmp").mkdir()  # a folder with our suffix is not a file of ours

    # the WebUI restarts: a new service on the same folder (with a Settings sub-folder) removes our leftovers only
    service = TrainService(lambda: rig.host, str(lora_dir), settings=lambda: {"subfolder": "characters"},
                           defaults=FAST)
    expected = sorted(str(lora_dir / rel) for rel in ours + ["pip.safetensors.tmp"])
    assert sorted(service.removed_temporaries) == expected
    left = sorted(os.path.relpath(os.path.join(d, f), lora_dir) for d, dirs, files in os.walk(lora_dir)
                  for f in files + [x for x in dirs if x.endswith(".tmp")])
    assert left == sorted([*OLD_FILES, *theirs, "folder.safetensors.tmp"])
    for f, data in rig.old.items():
        assert (lora_dir / f).read_bytes() == data
    assert all((lora_dir / rel).read_bytes() == b"leftover" for rel in theirs)

    # and the next training runs (into the Settings' sub-folder)
    job = service.submit(_body(steps=1))
    assert service.runner.wait(job.id, 120) and job.status == "done", job.to_dict()
    assert sorted(os.listdir(lora_dir / "characters")) == sorted(["deeper", "zed.txt", *OLD_FILES])
    safetensors.torch.load_file(job.lora_path)
    assert_unchanged(rig.before, rig.sd_model)
    assert service.runner.idle(60)
