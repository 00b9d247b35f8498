"""The /charlora/v1 routes on the web stack each WebUI ships, over a stub service (no model libraries):
A1111 1.10's fastapi 0.94 / pydantic 1 in .venv, Forge's fastapi 0.104.1 / pydantic 2.8.2 in .venv-gradio4
(run there by test_ui.test_under_gradio4). The model-backed API tests are in test_api.py."""
import os
import sys
import types

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from lib_charlora import api, limits  # noqa: E402
from lib_charlora.engine.dataset import DatasetError  # noqa: E402
from lib_charlora.engine.errors import ConfigError, UnsupportedModelError  # noqa: E402

NS = types.SimpleNamespace
STACKS = {"3.41.2": ("0.94.0", "1.10"), "4.40.0": ("0.104.1", "2.8.2")}  # gradio -> (fastapi, pydantic)


class StubRunner:
    def __init__(self):
        self.jobs = {}

    def list(self):
        return list(self.jobs.values())

    def get(self, job_id):
        return self.jobs.get(job_id)

    def stop(self, job_id, save=True):
        job = self.jobs.get(job_id)
        if job is not None:
            job.stopped = save
        return job


class StubJob:
    def __init__(self, job_id):
        self.id, self.warnings, self.stopped = job_id, ["a warning"], None

    def to_dict(self):
        return {"job_id": self.id, "kind": "train", "status": "queued", "step": 0, "total_steps": 10,
                "warnings": self.warnings}


class StubService:
    def __init__(self):
        self.runner = StubRunner()

    def limits(self):
        return limits.values({})

    def submit(self, body):
        name = body.get("name")
        if name == "bad":
            raise ConfigError("name", "is bad")
        if name == "few":
            raise DatasetError("only 1 usable picture", {"files": [{"name": "a.png", "accepted": False}]})
        if name == "flux":
            raise UnsupportedModelError("Flux models cannot be trained here")
        job = StubJob(f"j{len(self.runner.jobs) + 1}")
        self.runner.jobs[job.id] = job
        return job

    def submit_evaluation(self, body):
        if body.get("lora") == "missing":
            raise ConfigError("lora", "no LoRA named 'missing'")
        job = self.submit({"name": body["lora"]})
        job.total_steps = 12
        return job

    def promote(self, body):
        if body.get("checkpoint") is None:
            raise ConfigError("checkpoint", "is not an intermediate checkpoint")
        return {"lora": body["lora"], "path": "/loras/pip.safetensors", "ss_steps": "4",
                "promoted_from": body["checkpoint"], "preferred_weight": 1.0, "warnings": []}


def _client(api_auth=None):
    app = FastAPI()
    service = StubService()
    api.register(app, service, api_auth)
    return TestClient(app), service


def test_the_web_stack_is_the_webuis():
    gradio = sys.modules.get("gradio") or pytest.importorskip("gradio")
    want_fastapi, want_pydantic = STACKS[gradio.__version__]
    import pydantic
    assert fastapi.__version__ == want_fastapi and pydantic.VERSION.startswith(want_pydantic)


def test_routes_answer_and_refuse_with_the_field():
    client, service = _client()
    r = client.post("/charlora/v1/train", json={"name": "pip"})
    assert r.status_code == 200 and r.json() == {"job_id": "j1", "warnings": ["a warning"]}
    job = {"job_id": "j1", "kind": "train", "status": "queued", "step": 0, "total_steps": 10, "loss": None,
           "eta_seconds": None, "peak_memory_mb": None, "lora_name": None, "lora_path": None,
           "warnings": ["a warning"], "error": None, "result": None}
    assert client.get("/charlora/v1/jobs").json() == {"jobs": [job]}
    assert client.get("/charlora/v1/jobs/j1").json() == job
    assert client.post("/charlora/v1/jobs/j1/stop", json={"save": False}).json() == job
    assert service.runner.jobs["j1"].stopped is False
    assert client.post("/charlora/v1/jobs/j1/stop").status_code == 200  # no body: stop and save
    assert service.runner.jobs["j1"].stopped is True
    r = client.post("/charlora/v1/jobs/j1/stop", json={"save": "no"})
    assert r.status_code == 422 and r.json()["field"] == "save"
    assert client.get("/charlora/v1/jobs/nope").status_code == 404
    assert client.post("/charlora/v1/jobs/nope/stop", json={}).status_code == 404
    r = client.post("/charlora/v1/train", json={"name": "bad"})
    assert r.status_code == 422 and r.json() == {"detail": "name: is bad", "field": "name"}
    r = client.post("/charlora/v1/train", json={"name": "few"})
    assert r.status_code == 422 and r.json()["field"] == "images" and r.json()["report"]["files"][0]["name"] == "a.png"
    r = client.post("/charlora/v1/train", json={"name": "flux"})
    assert r.status_code == 422 and "Flux" in r.json()["detail"]
    r = client.post("/charlora/v1/train", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "body"
    r = client.post("/charlora/v1/evaluate", json={"lora": "pip"})
    assert r.status_code == 200 and r.json()["pictures"] == 12 and r.json()["job_id"] == "j2"
    r = client.post("/charlora/v1/evaluate", json={"lora": "missing"})
    assert r.status_code == 422 and r.json()["field"] == "lora"
    assert client.post("/charlora/v1/promote", json={"lora": "pip", "checkpoint": "pip-step000004.safetensors"}
                       ).json()["ss_steps"] == "4"
    r = client.post("/charlora/v1/promote", json={"lora": "pip"})
    assert r.status_code == 422 and r.json()["field"] == "checkpoint"


def test_api_auth():
    client, _ = _client("alice:secret,bob:pw2")
    assert client.get("/charlora/v1/jobs").status_code == 401
    assert client.get("/charlora/v1/jobs", auth=("alice", "wrong")).status_code == 401
    assert client.get("/charlora/v1/jobs", auth=("alice", "secret")).json() == {"jobs": []}
    assert client.post("/charlora/v1/train", json={"name": "pip"}, auth=("bob", "pw2")).status_code == 200


def test_webui_picks_the_adapter_by_the_running_webui(monkeypatch):
    """Forge (``sd_models.forge_model_reload``) gets the Forge adapter, reForge (``ldm_patched``) its own,
    A1111 the A1111 one;
    the service asks the request-time factory with the queue lock and the job-time one in the job."""
    import importlib.util
    from lib_charlora import webui
    from lib_charlora.hosts import a1111, forge, reforge
    calls = []
    monkeypatch.setattr(forge, "request_host", lambda lock: calls.append(("forge request", lock)) or "host")
    monkeypatch.setattr(forge, "job_host", lambda: calls.append(("forge job",)) or "host")
    lock = object()
    find_spec = importlib.util.find_spec
    for has_reload, has_ldm_patched, expected in ((True, False, forge), (False, True, reforge), (False, False, a1111)):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (object() if has_ldm_patched else None) if name == "ldm_patched"
                            else find_spec(name, *a))
        sd_models = NS(forge_model_reload=lambda: None) if has_reload else NS()
        modules = types.ModuleType("modules")
        modules.sd_models = sd_models
        modules.call_queue = NS(queue_lock=lock)
        modules.progress = NS()
        modules.shared = NS(state=NS(), cmd_opts=NS(lora_dir=os.getcwd()))
        modules.paths = NS(data_path=os.getcwd())
        for name in ("sd_models", "call_queue", "progress", "shared", "paths"):
            monkeypatch.setitem(sys.modules, f"modules.{name}", getattr(modules, name))
        monkeypatch.setitem(sys.modules, "modules", modules)
        monkeypatch.setattr(webui, "_service", None)
        assert webui.adapter() is expected
        if expected is forge:
            service = webui.service()
            assert service.host_factory() == "host" and service.job_host_factory() == "host"
            assert calls == [("forge request", lock), ("forge job",)]
