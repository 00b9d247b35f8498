"""HTTP API on a FastAPI app (A1111 1.10's fastapi 0.94 / pydantic 1), over the A1111 adapter and double."""
import base64
import io
import os
import threading
import time
import types

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib_charlora import api
from lib_charlora.demo import draw_character
from lib_charlora.hosts.a1111 import A1111Host
from lib_charlora.service import TrainService
from tests.a1111_double import FakeNetworks, make_sd_model
from tests.conftest import assert_unchanged, snapshot

NS = types.SimpleNamespace


def _b64_png(seed):
    buf = io.BytesIO()
    draw_character(seed, 64).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


PICS = [_b64_png(i) for i in range(6)]


@pytest.fixture
def webui(tmp_path):
    sd_model = make_sd_model("sd1")
    nets = FakeNetworks()
    host = A1111Host(sd_model, NS(lowvram=False, medvram=False), NS(CLIP_stop_at_last_layers=1),
                     NS(device="cpu", fp8=False), nets)
    lock = threading.Lock()  # stands in for A1111's queue_lock
    state = NS(interrupted=False, job=None, job_count=0, job_no=0, textinfo="")
    service = TrainService(lambda: host, str(tmp_path / "Lora"), lock=lock, state=state)
    app = FastAPI()
    api.register(app, service)
    return NS(client=TestClient(app), service=service, sd_model=sd_model, nets=nets, lock=lock, state=state,
              lora_dir=tmp_path / "Lora")


def _body(**kw):
    base = {"name": "pip", "trigger": "pipchr", "images": PICS, "preset": "fast", "steps": 3, "resolution": 64}
    base.update(kw)
    return base


def _wait(client, job_id, statuses=("done", "failed", "cancelled"), timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        j = client.get(f"/charlora/v1/jobs/{job_id}").json()
        if j["status"] in statuses:
            return j
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stuck: {j}")


def test_train_and_poll(webui):
    before = snapshot(webui.sd_model)
    r = webui.client.post("/charlora/v1/train", json=_body(captions=["pipchr, smiling"] + [None] * 5))
    assert r.status_code == 200, r.text
    job = _wait(webui.client, r.json()["job_id"])
    assert job["status"] == "done" and job["step"] == job["total_steps"] == 3 and job["error"] is None
    assert job["lora_name"] == "pip" and os.path.isfile(job["lora_path"])
    assert job["lora_path"] == str(webui.lora_dir / "pip.safetensors")
    assert isinstance(job["peak_memory_mb"], float) and job["peak_memory_mb"] >= 0  # measured (engine.memory)
    assert sorted(os.listdir(webui.lora_dir)) == ["pip.json", "pip.preview.png", "pip.safetensors"]
    assert ("list_available_networks",) in webui.nets.calls  # the Lora list is refreshed in-process
    assert webui.state.job_count == 3 and webui.state.job_no == 3 and "step 3/3" in webui.state.textinfo
    listed = webui.client.get("/charlora/v1/jobs").json()["jobs"]
    assert [j["job_id"] for j in listed] == [job["job_id"]]
    assert_unchanged(before, webui.sd_model)
    # the same name again without overwrite is refused before anything is queued
    r = webui.client.post("/charlora/v1/train", json=_body())
    assert r.status_code == 422 and r.json()["field"] == "name" and "already exists" in r.json()["detail"]
    assert webui.client.post("/charlora/v1/train", json=_body(overwrite=True)).status_code == 200


@pytest.mark.parametrize("body,field,text", [
    ({"images": PICS}, "name", "required"),
    (_body(name="../evil"), "name", "path separator"),
    (_body(name="a b"), "name", "not portable"),
    (_body(resolution=100), "resolution", "multiple of 64"),
    (_body(steps="10"), "steps", "integer"),
    (_body(rank=0), "rank", ">= 1"),
    (_body(learning_rate=-1), "learning_rate", ">"),
    (_body(preset="turbo"), "preset", "choose one of"),
    (_body(colour="red"), "colour", "unknown field"),
    (_body(image_dir="/tmp"), "images", "either"),
    (_body(images=["%%%"]), "images[0]", "base64"),
    (_body(captions=["x"]), "captions", "one per picture"),
    (_body(images=None, image_dir="/does/not/exist"), "image_dir", "does not exist"),
    (_body(train_text_encoder="yes"), "train_text_encoder", "true or false"),
])
def test_invalid_requests_get_422_naming_the_field(webui, body, field, text):
    before = snapshot(webui.sd_model)
    r = webui.client.post("/charlora/v1/train", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and text in r.json()["detail"]
    assert webui.service.runner.list() == [] and not os.path.exists(webui.lora_dir)
    assert_unchanged(before, webui.sd_model)


def test_too_few_usable_pictures(webui):
    r = webui.client.post("/charlora/v1/train", json=_body(images=PICS[:3] + [base64.b64encode(b"junk").decode()]))
    assert r.status_code == 422 and "only 3 usable pictures" in r.json()["detail"]
    files = r.json()["report"]["files"]
    assert [f["accepted"] for f in files] == [True, True, True, False] and "not an image" in files[3]["reason"]
    assert webui.client.post("/charlora/v1/train", content=b"not json").status_code == 422


def test_jobs_queue_behind_the_lock_and_stop(webui):
    webui.lock.acquire()  # a txt2img generation is running
    try:
        first = webui.client.post("/charlora/v1/train", json=_body(name="a", steps=200)).json()["job_id"]
        second = webui.client.post("/charlora/v1/train", json=_body(name="b", steps=200)).json()["job_id"]
        again = webui.client.post("/charlora/v1/train", json=_body(name="b", steps=200))  # a second click
        assert again.status_code == 422 and "a training of 'b' is already queued" in again.json()["detail"]
        time.sleep(0.3)
        statuses = {j["job_id"]: j["status"] for j in webui.client.get("/charlora/v1/jobs").json()["jobs"]}
        assert statuses == {first: "running", second: "queued"}  # the worker waits for the lock
        assert webui.client.get(f"/charlora/v1/jobs/{first}").json()["step"] == 0
    finally:
        webui.lock.release()
    _wait(webui.client, first, statuses=("running",))
    while webui.client.get(f"/charlora/v1/jobs/{first}").json()["step"] < 2:
        time.sleep(0.05)
    r = webui.client.post(f"/charlora/v1/jobs/{first}/stop", json={"save": False})
    assert r.status_code == 200
    assert _wait(webui.client, first)["status"] == "cancelled"
    _wait(webui.client, second, statuses=("running",))
    while webui.client.get(f"/charlora/v1/jobs/{second}").json()["step"] < 2:
        time.sleep(0.05)
    webui.client.post(f"/charlora/v1/jobs/{second}/stop", json={"save": True})
    done = _wait(webui.client, second)
    assert done["status"] == "done" and done["step"] < 200 and os.path.isfile(done["lora_path"])
    assert sorted(os.listdir(webui.lora_dir)) == ["b.json", "b.preview.png", "b.safetensors"]
    assert webui.client.post("/charlora/v1/jobs/nope/stop", json={}).status_code == 404
    assert webui.client.get("/charlora/v1/jobs/nope").status_code == 404


def test_webui_interrupt_stops_and_saves(webui):
    job_id = webui.client.post("/charlora/v1/train", json=_body(steps=500)).json()["job_id"]
    _wait(webui.client, job_id, statuses=("running",))
    while webui.client.get(f"/charlora/v1/jobs/{job_id}").json()["step"] < 1:
        time.sleep(0.05)
    webui.state.interrupted = True
    job = _wait(webui.client, job_id)
    assert job["status"] == "done" and job["step"] < 500 and os.path.isfile(job["lora_path"])


def test_failure_is_reported_and_model_restored(webui, monkeypatch):
    before = snapshot(webui.sd_model)

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(type(webui.sd_model), "apply_model", boom)
    job_id = webui.client.post("/charlora/v1/train", json=_body()).json()["job_id"]
    job = _wait(webui.client, job_id)
    assert job["status"] == "failed" and "out of memory" in job["error"] and "Fast preset" in job["error"]
    monkeypatch.undo()
    assert_unchanged(before, webui.sd_model)
    assert not os.path.exists(webui.lora_dir / "pip.safetensors")


def test_no_worker_thread_outlives_the_queue(webui):
    import threading as th
    job_id = webui.client.post("/charlora/v1/train", json=_body()).json()["job_id"]
    _wait(webui.client, job_id)
    assert webui.service.runner.idle(timeout=10)
    # a live thread that ran torch would slow every torch call in the WebUI's other threads
    assert not any(t.name == "charlora-jobs" and t.is_alive() for t in th.enumerate() if t is not th.current_thread())


def test_settings_subfolder_default_preset_and_checkpoints(tmp_path):
    host = A1111Host(make_sd_model("sd1"), NS(lowvram=False, medvram=False), NS(CLIP_stop_at_last_layers=1),
                     NS(device="cpu", fp8=False))
    chosen = {"default_preset": "fast", "subfolder": "characters", "keep_checkpoints": False}
    service = TrainService(lambda: host, str(tmp_path / "Lora"), settings=lambda: dict(chosen))
    body = {"name": "pip", "images": PICS, "steps": 4, "resolution": 64, "save_every": 2}
    spec = service.parse(dict(body))
    assert spec.config.rank == 8  # the Fast preset from Settings
    job = service.submit(dict(body))
    service.runner.wait(job.id, 60)
    assert job.status == "done" and job.lora_path == str(tmp_path / "Lora" / "characters" / "pip.safetensors")
    assert sorted(os.listdir(tmp_path / "Lora" / "characters")) == ["pip.json", "pip.preview.png", "pip.safetensors"]
    chosen["keep_checkpoints"] = True
    job = service.submit(dict(body, name="pip2"))
    service.runner.wait(job.id, 60)
    assert sorted(os.listdir(tmp_path / "Lora" / "characters" / "pip2_checkpoints")) == \
        ["pip2-step000002.safetensors", "pip2-step000002.state"]
    chosen["subfolder"] = "../outside"
    with pytest.raises(Exception, match="plain relative folder"):
        service.submit(dict(body, name="pip3"))


def test_webui_settings_registration(monkeypatch):
    import sys
    added = {}
    opts = NS(add_option=lambda key, info: added.setdefault(key, info))
    shared = NS(opts=opts, OptionInfo=lambda default, label, *a, **k: NS(default=default, label=label, section=k["section"]))
    fake = types.ModuleType("modules")
    fake.shared = shared
    monkeypatch.setitem(sys.modules, "modules", fake)
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    from lib_charlora import webui
    webui.on_ui_settings()
    from lib_charlora.limits import LIMITS, SECTION_NAME
    assert set(added) == {"charlora_default_preset", "charlora_subfolder", "charlora_keep_checkpoints",
                          "charlora_test_after_training", "charlora_clip_model", "charlora_allow_server_folders",
                          *(f"charlora_{limit.key}" for limit in LIMITS)}
    assert all(i.section == ("charlora", "Character LoRA") for i in added.values())
    assert SECTION_NAME.endswith(added["charlora_default_preset"].section[1])  # the messages name the real section
    for limit in LIMITS:  # the label a limit's message names is the setting's label
        assert added[f"charlora_{limit.key}"].label == limit.label and added[f"charlora_{limit.key}"].default == limit.default
    opts.charlora_default_preset, opts.charlora_subfolder, opts.charlora_keep_checkpoints = "Quality", "x", True
    opts.charlora_test_after_training, opts.charlora_clip_model = False, " my/clip "
    opts.charlora_max_pictures = 40.0  # gr.Number may give a float
    settings = webui.settings()
    assert {k: settings[k] for k in ("default_preset", "subfolder", "keep_checkpoints", "clip_model",
                                     "test_after_training")} == {
        "default_preset": "quality", "subfolder": "x", "keep_checkpoints": True, "clip_model": "my/clip",
        "test_after_training": False}
    from lib_charlora import limits
    assert limits.values(settings)["max_pictures"] == 40 and limits.values(settings)["jobs_kept"] == 100


def test_sample_every_shows_live_previews(tmp_path):
    from PIL import Image
    shown = []
    processing = NS(StableDiffusionProcessingTxt2Img=lambda **kw: NS(kw=kw),
                    process_images=lambda p: NS(images=[Image.new("RGB", (p.kw["width"], p.kw["height"]))]))
    host = A1111Host(make_sd_model("sd1"), NS(lowvram=False, medvram=False), NS(CLIP_stop_at_last_layers=1),
                     NS(device="cpu", fp8=False), processing=processing)
    state = NS(interrupted=False, assign_current_image=shown.append)
    cleared = []
    service = TrainService(lambda: host, str(tmp_path / "Lora"), state=state,
                           total_progress=NS(clear=lambda: cleared.append(1)))
    job = service.submit({"name": "pip", "images": PICS, "steps": 5, "resolution": 64, "sample_every": 2})
    assert job.spec.config.preview_every == 2 and job.spec.config.save_every == 0
    service.runner.wait(job.id, 60)
    assert job.status == "done" and len(shown) == 2 and job.preview is shown[-1]
    assert cleared == [1]  # the console's "Total progress" bar the previews advanced is reset, as the WebUI's API does


def test_two_clicks_checked_side_by_side_queue_one_job(webui, monkeypatch):
    # a double click: both requests are parsed at the same time (intake takes seconds), so both pass the check in
    # parse(); only one may be queued
    parse, arrived = webui.service.parse, threading.Barrier(2)

    def slow_parse(*a, **kw):
        spec = parse(*a, **kw)
        arrived.wait(10)  # both have been checked before either is queued
        return spec
    monkeypatch.setattr(webui.service, "parse", slow_parse)
    webui.lock.acquire()  # keep the first one queued
    try:
        results = []

        def click():
            try:
                results.append(webui.service.submit(_body(name="twice", steps=50)).id)
            except Exception as e:
                results.append(e)
        threads = [threading.Thread(target=click) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        jobs = [j for j in webui.service.runner.list() if j.name == "twice"]
        assert len(jobs) == 1, results
        assert any("a training of 'twice' is already" in str(r) for r in results), results
    finally:
        webui.lock.release()
        webui.service.runner.stop(jobs[0].id, save=False)
        webui.service.runner.idle(60)
