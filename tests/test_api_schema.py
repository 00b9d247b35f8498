"""The API's contract over the real service and the embedded tiny model: /openapi.json documents every
route and field (ranges, defaults) and they are the service's own; the limits answer 413/422 naming the
setting; strict JSON; server folders refused on a networked WebUI without credentials; credentials on
every route; and a property-based fuzz generated from the API's own OpenAPI document (schemathesis):
no 5xx, a 'detail' on every 4xx, no file written by a rejected request.

Runs under A1111's fastapi 0.94 / pydantic 1 here and Forge's 0.104.1 / pydantic 2.8 in .venv-gradio4
(test_ui.test_under_gradio4 runs this file there too)."""
import base64
import io
import json
import os
import threading
import types

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from lib_charlora import api, api_models, limits  # noqa: E402
from lib_charlora.demo import draw_character  # noqa: E402
from lib_charlora.service import TrainService  # noqa: E402

NS = types.SimpleNamespace
ROUTES = {("POST", "/charlora/v1/train"), ("POST", "/charlora/v1/evaluate"), ("POST", "/charlora/v1/promote"),
          ("GET", "/charlora/v1/jobs"), ("GET", "/charlora/v1/jobs/{job_id}"),
          ("POST", "/charlora/v1/jobs/{job_id}/stop")}
BODIES = {"/charlora/v1/train": "TrainRequest", "/charlora/v1/evaluate": "EvaluateRequest",
          "/charlora/v1/promote": "PromoteRequest", "/charlora/v1/jobs/{job_id}/stop": "StopRequest"}


def _png(size=(64, 64), seed=0):
    buf = io.BytesIO()
    draw_character(seed, 64).resize(size).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def host():
    from lib_charlora.tiny import tiny_host
    return tiny_host()


@pytest.fixture
def api_app(tmp_path, host):
    settings = {}
    policy = {"why": None}
    service = TrainService(lambda: host, str(tmp_path / "Lora"), lock=threading.Lock(),
                           settings=lambda: settings, outputs_dir=str(tmp_path / "outputs"))
    app = FastAPI()
    api.register(app, service, folder_refusal=lambda: policy["why"])
    return NS(app=app, client=TestClient(app), service=service, settings=settings, policy=policy, tmp=tmp_path)


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# -- the document ---------------------------------------------------------------------------------------------

def test_openapi_documents_every_route_body_and_answer(api_app):
    doc = api_app.client.get("/openapi.json").json()
    found = {(m.upper(), p) for p, ops in doc["paths"].items() if p.startswith("/charlora") for m in ops}
    assert found == ROUTES
    for path, title in BODIES.items():
        op = doc["paths"][path]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert body["title"] == title and body["additionalProperties"] is False
        assert all(prop.get("description") for prop in body["properties"].values()), title
        assert set(op["responses"]) >= {"200", "401", "413", "415", "422"}
        assert "ErrorAnswer" in json.dumps(op["responses"]["422"])
    train = doc["paths"]["/charlora/v1/train"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    props = train["properties"]
    assert train["required"] == ["name"]
    assert (props["steps"]["minimum"], props["steps"]["maximum"], props["steps"]["type"]) == (1, 1_000_000, "integer")
    assert props["resolution"]["multipleOf"] == 64 and props["preset"]["enum"] == ["fast", "balanced", "quality"]
    assert "balanced 1500" in props["steps"]["description"] and "default" not in props["steps"]
    assert props["alpha"]["maximum"] == 1024 and ("exclusiveMinimum" in props["alpha"] or "> 0" in
                                                    props["alpha"]["description"])
    stop = doc["paths"]["/charlora/v1/jobs/{job_id}/stop"]["post"]
    assert stop["requestBody"]["required"] is False
    assert stop["requestBody"]["content"]["application/json"]["schema"]["properties"]["save"]["default"] is True
    job = json.dumps(doc["components"]["schemas"]["JobAnswer"])
    assert all(k in job for k in ("peak_memory_mb", "cancelled", "eta_seconds", "result"))


def _bound_cases():
    schema = api_models.schema(api_models.TrainRequest)
    for name, prop in schema["properties"].items():
        if prop.get("type") not in ("integer", "number"):
            continue
        step = prop.get("multipleOf", 1 if prop["type"] == "integer" else 1e-6)
        if "minimum" in prop:
            yield name, prop["minimum"], prop["minimum"] - step
        if "exclusiveMinimum" in prop:
            yield name, prop["exclusiveMinimum"] + step, prop["exclusiveMinimum"]
        if "maximum" in prop:
            yield name, prop["maximum"], prop["maximum"] + step


@pytest.mark.parametrize("field,inside,outside", list(_bound_cases()))
def test_every_documented_bound_is_the_services_bound(api_app, field, inside, outside):
    """A value on the documented bound passes every check of that field (the request then fails on its
    pictures, so nothing trains); one step past it is refused naming the field."""
    base = {"name": "pip", "preset": "fast", "images": [base64.b64encode(b"not a picture").decode()] * 5}
    r = api_app.client.post("/charlora/v1/train", json={**base, field: inside})
    assert r.status_code == 422 and r.json()["field"] != field, r.json()
    r = api_app.client.post("/charlora/v1/train", json={**base, field: outside})
    assert r.status_code == 422 and r.json()["field"] == field, r.json()


# -- strict JSON and the limits ---------------------------------------------------------------------------------

@pytest.mark.parametrize("content,ctype,status,field,text", [
    (b'{"name": "a", "name": "b"}', "application/json", 422, "name", "appears twice"),
    (b'{"name": "pip", "steps": NaN}', "application/json", 422, "body", "NaN"),
    (b'{"name": "pip", "steps": 1' + b"0" * 5000 + b"}", "application/json", 422, "body", "5001 digits"),
    (b'{"name": true}', "application/json", 422, "name", "must be text"),
    (b'{"name": "pip"', "application/json", 422, "body", "must be JSON"),
    (b"\xff\xfe{}", "application/json", 422, "body", "UTF-8"),
    (b"", "application/json", 422, "body", "empty"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json", 422, "body", ""),
    (b'["pip"]', "application/json", 422, "body", "JSON object"),
    (b"name=pip", "application/x-www-form-urlencoded", 415, "body", "application/json"),
    (b'{"name": "pip"}', "text/plain", 415, "body", "Content-Type"),
    (b'{"name": "pip\\u0000x"}', "application/json", 422, "name", "not portable"),
    (b'{"name": "CON"}', "application/json", 422, "name", "reserved device name"),
    (b'{"name": "pip", "images": ["x"], "image_dir": "../.."}', "application/json", 422, "images", "either"),
])
def test_bad_bodies_get_a_4xx_with_detail_and_field(api_app, content, ctype, status, field, text):
    r = api_app.client.post("/charlora/v1/train", content=content, headers={"Content-Type": ctype})
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and text in r.json()["detail"]
    assert not os.path.exists(api_app.tmp / "Lora")


def test_limits_answer_413_or_422_naming_the_setting(api_app, tmp_path):
    client, settings = api_app.client, api_app.settings
    pics = [_png(seed=i) for i in range(6)]
    settings["max_request_mb"] = 1
    big = {"name": "pip", "images": pics, "captions": ["x" * 1_200_000] + [None] * 5}
    r = client.post("/charlora/v1/train", json=big)
    assert r.status_code == 413 and r.json()["field"] == "body"
    assert "Largest API request body (MB)" in r.json()["detail"] and "Settings > Character LoRA" in r.json()["detail"]
    chunks = (part for part in [b"{"] + [b" " * 2**19] * 4 + [b"}"])  # no Content-Length: counted as it streams
    r = client.post("/charlora/v1/train", content=chunks, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "the request body" in r.json()["detail"]
    settings.update(max_request_mb=1024, max_pictures=5)
    r = client.post("/charlora/v1/train", json={"name": "pip", "images": pics})
    assert r.status_code == 422 and r.json()["field"] == "images" and "6 pictures" in r.json()["detail"]
    assert "Most pictures in one training request" in r.json()["detail"]
    settings.update(max_pictures=1000, max_caption_chars=10)
    r = client.post("/charlora/v1/train", json={"name": "pip", "images": pics, "captions": [None, "y" * 11] + [None] * 4})
    assert r.status_code == 422 and r.json()["field"] == "captions[1]" and "Longest caption" in r.json()["detail"]
    settings.update(max_caption_chars=2000, max_megapixels=1)
    r = client.post("/charlora/v1/train", json={"name": "pip", "images": pics[:5] + [_png((1100, 1000))]})
    assert r.status_code == 422 and r.json()["field"] == "images[5]" and "1100x1000" in r.json()["detail"]
    assert "Largest picture (megapixels)" in r.json()["detail"]
    settings.update(max_megapixels=100, max_decoded_mb=1)
    heavy = base64.b64encode(os.urandom(700_000)).decode()
    r = client.post("/charlora/v1/train", json={"name": "pip", "images": [heavy, heavy] + pics[:4]})
    assert r.status_code == 413 and r.json()["field"] == "images" and "by picture 2" in r.json()["detail"]
    assert not os.path.exists(tmp_path / "Lora") and api_app.service.runner.list() == []


def test_a_folder_over_the_picture_limit_is_refused_before_decoding(api_app, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(7):
        (folder / f"{i}.png").write_bytes(base64.b64decode(_png(seed=i)))
    api_app.settings["max_pictures"] = 6
    r = api_app.client.post("/charlora/v1/train", json={"name": "pip", "image_dir": str(folder)})
    assert r.status_code == 422 and r.json()["field"] == "image_dir" and "more than 6 pictures" in r.json()["detail"]


def test_finished_jobs_are_bounded_and_drop_their_pictures(api_app):
    from lib_charlora.jobs import JobRunner
    runner = JobRunner(lambda job: NS(status="done", warnings=[]), keep=lambda: 3)
    jobs = []
    for i in range(6):
        jobs.append(runner.submit(f"j{i}", NS(images=[object()])))
        runner.idle(10)
    assert [j.name for j in runner.list()] == ["j3", "j4", "j5"] or len(runner.list()) <= 4
    assert all(j.spec.images == [] for j in jobs)  # a finished job keeps its record, not its pictures


# -- server folders, credentials ---------------------------------------------------------------------------------

def test_server_folders_refused_where_the_webui_is_networked_without_credentials(api_app, tmp_path):
    why = limits.folder_refusal(True, False, False, "api")
    assert "--api-auth" in why and "Allow training from server folders" in why
    assert limits.folder_refusal(True, True, False) is None and limits.folder_refusal(True, False, True) is None
    assert limits.folder_refusal(False, False, False) is None
    assert "--gradio-auth" in limits.folder_refusal(True, False, False, "tab")
    api_app.policy["why"] = why
    for path, body in (("/charlora/v1/train", {"name": "pip", "image_dir": str(tmp_path)}),
                       ("/charlora/v1/evaluate", {"lora": "pip", "image_dir": str(tmp_path)})):
        r = api_app.client.post(path, json=body)
        assert r.status_code == 403 and r.json()["field"] == "image_dir" and "--api-auth" in r.json()["detail"]
    r = api_app.client.post("/charlora/v1/train", json={"name": "pip", "images": [_png()] * 2})
    assert r.status_code == 422 and r.json()["field"] == "images"  # pictures in the body are still fine


@pytest.mark.parametrize("opts,setting,expected", [
    (dict(listen=True), False, "refused"), (dict(listen=True, api_auth="a:b"), False, None),
    (dict(listen=True), True, None), (dict(), False, None), (dict(server_name="0.0.0.0"), False, "refused"),
    (dict(share=True, gradio_auth="a:b"), False, "refused"), (dict(webui_is_non_local=True), False, "refused"),
])
def test_the_webui_policy_reads_its_command_line(monkeypatch, opts, setting, expected):
    import sys
    shared = NS(cmd_opts=NS(**opts), opts=NS(charlora_allow_server_folders=setting))
    modules = types.ModuleType("modules")
    modules.shared = shared
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    from lib_charlora import webui
    why = webui.folder_refusal("api")
    assert (why is None) if expected is None else ("turned off" in why)


def test_credentials_guard_every_route(tmp_path, host):
    service = TrainService(lambda: host, str(tmp_path / "Lora"), lock=threading.Lock())
    app = FastAPI()
    api.register(app, service, "alice:s3cret")
    client = TestClient(app)
    for method, path in ROUTES:
        url = path.replace("{job_id}", "nope")
        for auth in (None, ("alice", "wrong"), ("bob", "s3cret"), ("alice", "s3cret\u00e9")):
            r = client.request(method, url, json={"name": "pip"}, auth=auth)
            assert r.status_code == 401 and r.json()["detail"], (method, path, auth)
        assert client.request(method, url, json={}, auth=("alice", "s3cret")).status_code != 401
    assert not os.path.exists(tmp_path / "Lora")


# -- the fuzz ---------------------------------------------------------------------------------------------------

def test_fuzz_from_the_openapi_document(api_app, tmp_path):
    """schemathesis generates requests for every route from /openapi.json, valid ones and ones that break
    the schema (wrong types, out-of-range values, unknown fields, odd strings): none may get a 5xx, every
    4xx has a 'detail', and nothing is written (an old LoRA stays as it was)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    (tmp_path / "Lora").mkdir()
    (tmp_path / "Lora" / "old.safetensors").write_bytes(b"keep me")
    before = _files(tmp_path)
    schema = schemathesis.openapi.from_asgi("/openapi.json", api_app.app)
    seen = {}
    examples = int(os.environ.get("CHARLORA_FUZZ_EXAMPLES", "60"))
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def fuzz(case):
                r = case.call()
                seen.setdefault((case.method, case.path, mode.value), set()).add(r.status_code)
                assert r.status_code < 500, (case.method, case.path, case.body, r.text[:500])
                if r.status_code >= 400:
                    assert isinstance(r.json().get("detail"), str) and r.json()["detail"], r.text[:500]
                if case.method == "POST" and r.status_code == 200:  # no picture is valid here: nothing can start
                    assert case.path.endswith("/stop"), (case.path, case.body)
            try:
                fuzz()
            except Unsatisfiable:  # nothing in this operation can break its schema (GET /jobs)
                assert mode == schemathesis.GenerationMode.NEGATIVE
                print("no negative cases for", operation.method, operation.path)
    assert {(m, p) for m, p, _ in seen} == ROUTES, seen
    assert {p for m, p, mode in seen if mode == "negative"} >= set(BODIES) - {"/charlora/v1/jobs/{job_id}/stop"}
    assert seen[("GET", "/charlora/v1/jobs", "positive")] == {200}
    assert seen[("GET", "/charlora/v1/jobs/{job_id}", "positive")] == {404}
    assert any(400 <= code < 500 for codes in seen.values() for code in codes)
    assert _files(tmp_path) == before  # nothing written, nothing removed
    assert (tmp_path / "Lora" / "old.safetensors").read_bytes() == b"keep me" and api_app.service.runner.list() == []
