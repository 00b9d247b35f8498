"""The tab in a real browser (Debian's Chromium driven by Playwright), served by gradio 3.41.2 (.venv, as in
A1111 and reForge) and 4.40.0 (.venv-gradio4, as in Forge), over the real service and the embedded tiny model:
the flow in ``browser_flow.py``. And ``python -m lib_charlora ui --demo`` as a user starts it: train in the
browser, download the LoRA.

Without Chromium these tests are skipped, unless CHARLORA_REQUIRE_BROWSER=1 (CI sets it): then they fail.
Screenshots of every state: test-artifacts/browser-gradio3/, browser-gradio4/, browser-ui-demo/.
"""
import json
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from tests import browser_flow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
VENVS = {"gradio3": os.path.join(ROOT, ".venv", "bin", "python"),
         "gradio4": os.path.join(ROOT, ".venv-gradio4", "bin", "python")}


def _browser_or_skip():
    missing = [what for what, ok in (("chromium", os.path.exists(browser_flow.CHROMIUM)),
                                     ("playwright", _importable("playwright"))) if not ok]
    if missing:
        if os.environ.get("CHARLORA_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{' and '.join(missing)} missing: run dev/setup.sh and apt-get install chromium")
        pytest.skip(f"{' and '.join(missing)} not installed")


def _importable(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process; waits until its port answers, stops it (Ctrl-C, as a user would) at the end."""

    def __init__(self, argv, port, log_path, cwd=ROOT):
        env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}/"
        end = time.time() + 240
        while time.time() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server ended (exit {self.proc.returncode}):\n{self.output()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    if "READY" in self.output() or "Character LoRA on http" in self.output():
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"the server did not start:\n{self.output()[-3000:]}")

    def output(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            import signal
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(300)  # a training in progress is saved first
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def browser():
    _browser_or_skip()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=browser_flow.CHROMIUM, args=browser_flow.CHROMIUM_ARGS)
        yield b
        b.close()


def _page(browser, shots):
    os.makedirs(shots, exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    return context, page


@pytest.mark.parametrize("gradio", ["gradio3", "gradio4"])
def test_tab_in_a_browser(browser, gradio, tmp_path):
    python = VENVS[gradio]
    if not os.path.exists(python):
        pytest.fail(f"{python} is missing: run dev/setup.sh")
    port = _free_port()
    lora_dir = str(tmp_path / "Lora")
    server = Server([python, os.path.join(ROOT, "tests", "browser_app.py"), "--port", str(port), "--out", lora_dir],
                    port, str(tmp_path / "server.log"))
    shots = os.path.join(ARTIFACTS, f"browser-{gradio}")
    context, page = _page(browser, shots)
    try:
        assert f"READY gradio {'3.41.2' if gradio == 'gradio3' else '4.40.0'}" in server.output()
        browser_flow.run(page, server.url, lora_dir, shots, browser_flow.pictures(str(tmp_path / "pictures")))
    except Exception:
        page.screenshot(path=os.path.join(shots, "failed.png"), full_page=True)
        raise
    finally:
        context.close()
        server.stop()
    assert "Traceback" not in server.output(), server.output()[-3000:]


def test_ui_demo_command_trains_and_the_lora_downloads(browser, tmp_path):
    """``python -m lib_charlora ui --demo`` started as the README says; a browser trains and downloads."""
    port = _free_port()
    out = tmp_path / "loras"
    server = Server([sys.executable, "-m", "lib_charlora", "ui", "--demo", "--port", str(port), "--out", str(out)],
                    port, str(tmp_path / "server.log"), cwd=str(tmp_path))
    shots = os.path.join(ARTIFACTS, "browser-ui-demo")
    context, page = _page(browser, shots)
    tab = browser_flow.Tab(page, shots)
    try:
        page.goto(server.url)
        tab.open_tab()
        assert "embedded demo model" in tab.text("charlora_model")
        assert tab.q("#charlora_send").count() == 0 or not tab.q("#charlora_send").first.is_visible()
        tab.field("charlora_name").fill("pip_demo")
        tab.field("charlora_trigger").fill("pipchr")
        pictures = browser_flow.pictures(str(tmp_path / "pictures"))[:6]
        tab.q("#charlora_files input[type=file]").set_input_files(pictures)
        browser_flow.wait_uploaded(tab, len(pictures))
        tab.q("#charlora_check").click()
        tab.wait_text("charlora_report", r"6 pictures accepted, 0 rejected \(checked for training at 128 px\)")
        tab.q("#charlora_advanced .label-wrap").first.click()
        tab.q("#charlora_use_advanced input").check()
        tab.field("charlora_adv_steps").fill("12")
        tab.field("charlora_adv_resolution").fill("64")
        tab.q("#charlora_train").click()
        tab.wait_text("charlora_status", r"Done: 12 steps", timeout=300_000)
        link = tab.q("#charlora_download a").first
        link.wait_for(state="visible")
        with page.expect_download() as download:
            link.click()
        path = download.value.path()
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        assert header["__metadata__"]["ss_output_name"] == "pip_demo"
        assert sum(k.startswith("lora_unet_") for k in header) > 10
        with open(out / "pip_demo.safetensors", "rb") as f:
            assert f.read() == open(path, "rb").read()  # the downloaded file is the written one
        tab.shot("done")
        jobs = page.request.get(server.url + "charlora/v1/jobs").json()["jobs"]  # the API is served beside it
        assert [j["status"] for j in jobs] == ["done"]
        # Ctrl-C while a training runs: the server stops, the training is saved first
        tab.field("charlora_name").fill("pip_long")
        tab.field("charlora_adv_steps").fill("5000")
        tab.q("#charlora_train").click()
        tab.wait_text("charlora_status", r"Training: step [1-9]\d*/5000", timeout=300_000)
    except Exception:
        page.screenshot(path=os.path.join(shots, "failed.png"), full_page=True)
        raise
    finally:
        context.close()
        code = server.stop()
    assert code == 0, server.output()[-3000:]
    assert "Traceback" not in server.output(), server.output()[-3000:]
    with open(out / "pip_long.safetensors", "rb") as f:
        steps = int(json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))["__metadata__"]["ss_steps"])
    assert 0 < steps < 5000
