"""Load on the HTTP API over the A1111 adapter and double: generations wait for a training and then run,
many clients at once keep the queue's order and lose nothing, and many trainings in a row leak nothing
(memory, threads, hooks, tensors)."""
import contextlib
import gc
import os
import threading
import time

import safetensors.torch
import torch

from tests.conftest import assert_unchanged, snapshot
from tests.test_api import _body, _wait, webui  # noqa: F401  (the fixture)


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_generation_waits_for_the_training_then_runs(webui):  # noqa: F811
    job_id = webui.client.post("/charlora/v1/train", json=_body(steps=40)).json()["job_id"]
    _wait(webui.client, job_id, statuses=("running",))
    ran = {}

    def txt2img():  # what the WebUI's generation does: take the queue lock, run the model
        with webui.lock:
            ran["at"] = time.time()
            with torch.no_grad():
                cond = webui.sd_model.cond_stage_model(["a picture"])
                ran["out"] = webui.sd_model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([10]), cond)

    gen = threading.Thread(target=txt2img)
    gen.start()
    time.sleep(0.3)
    assert gen.is_alive() and "at" not in ran  # queued behind the training
    job = _wait(webui.client, job_id)
    gen.join(30)
    assert job["status"] == "done" and not gen.is_alive()
    assert ran["at"] >= webui.service.runner.get(job_id).finished_at - 0.05 and torch.isfinite(ran["out"]).all()


@contextlib.contextmanager
def _served(app):
    """The app on a real server (uvicorn, one event loop, as the WebUI runs it) on a free local port."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.time() + 30
    while not server.started and time.time() < end:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_twenty_pollers_and_five_trainings_at_once(webui):  # noqa: F811
    import httpx
    before = snapshot(webui.sd_model)
    stop, problems, polls = threading.Event(), [], [0]
    ids = []

    def poll(url):
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                r = client.get("/charlora/v1/jobs")
                if r.status_code != 200:
                    problems.append(r.text)
                    continue
                for j in r.json()["jobs"][-2:]:
                    one = client.get(f"/charlora/v1/jobs/{j['job_id']}")
                    if one.status_code != 200 or one.json()["status"] not in ("queued", "running", "done"):
                        problems.append(one.text)
                polls[0] += 1
                time.sleep(0.5)  # a browser or a script polls a few times a second

    start = threading.Barrier(5)

    def send(url, i):
        start.wait()
        r = httpx.post(f"{url}/charlora/v1/train", json=_body(name=f"c{i}", steps=3, seed=i), timeout=120)
        if r.status_code != 200:
            problems.append(r.text)
        else:
            ids.append(r.json()["job_id"])

    with _served(webui.client.app) as url:
        pollers = [threading.Thread(target=poll, args=(url,)) for _ in range(20)]
        senders = [threading.Thread(target=send, args=(url, i)) for i in range(5)]
        for t in pollers + senders:
            t.start()
        for t in senders:
            t.join(120)
        for job_id in ids:
            _wait(webui.client, job_id, timeout=180)
        stop.set()
        for t in pollers:
            t.join(60)
    assert problems == [] and len(ids) == 5 and polls[0] > 20
    jobs = [webui.service.runner.get(i) for i in ids]
    by_queue = sorted(jobs, key=lambda j: int(j.id.split("-")[0]))  # the order they were accepted in
    assert [j.id for j in webui.service.runner.list()] == [j.id for j in by_queue]
    assert [j.finished_at for j in by_queue] == sorted(j.finished_at for j in by_queue)  # run first in, first out
    for j in jobs:
        assert j.status == "done", j.error
        tensors = safetensors.torch.load_file(j.lora_path)  # every file whole
        assert tensors and all(torch.isfinite(t.float()).all() for t in tensors.values())
        with safetensors.safe_open(j.lora_path, "pt") as f:
            assert f.metadata()["ss_steps"] == "3" and f.metadata()["ss_output_name"] == j.name
    assert sorted(os.listdir(webui.lora_dir)) == sorted(f"c{i}{ext}" for i in range(5)
                                                        for ext in (".json", ".preview.png", ".safetensors"))
    assert_unchanged(before, webui.sd_model)


def test_fifty_trainings_in_a_row_leak_nothing(webui):  # noqa: F811
    before, hooks = snapshot(webui.sd_model), _hooks(webui.sd_model)  # the WebUI's own hooks (the double's)

    def train(i):
        job_id = webui.client.post("/charlora/v1/train", json=_body(name="leak", steps=2, overwrite=True,
                                                                    seed=i)).json()["job_id"]
        assert _wait(webui.client, job_id, timeout=60)["status"] == "done"

    def measure():
        webui.service.runner.idle(10)
        gc.collect()
        tensors = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
        return _rss_mb(), threading.active_count(), tensors

    for i in range(10):  # warm: allocator pools, caches, lazy imports
        train(i)
    rss0, threads0, tensors0 = measure()
    for i in range(10, 50):
        train(i)
    rss1, threads1, tensors1 = measure()
    print(f"after 10 trainings: {rss0:.0f} MB, {threads0} threads, {tensors0} tensors; "
          f"after 50: {rss1:.0f} MB, {threads1} threads, {tensors1} tensors")
    assert threads1 <= threads0 and tensors1 <= tensors0 + 5 and _hooks(webui.sd_model) == hooks
    assert rss1 - rss0 < 40, f"memory grew {rss1 - rss0:.0f} MB over 40 trainings"
    assert len(webui.service.runner.list()) == 50 and all(j.spec.images == [] for j in webui.service.runner.list())
    assert_unchanged(before, webui.sd_model)
