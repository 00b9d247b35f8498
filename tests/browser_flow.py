"""What a user does in the "Character LoRA" tab, driven in a real Chromium by Playwright, with assertions on
what the page shows. Used by ``test_browser.py`` (gradio 3.41.2 and 4.40.0) and, with ``--url``, against any
page that has the tab (a real WebUI); ``--docs docs --finish`` writes the README's pictures (dev/screenshots.sh).

    python tests/browser_flow.py --url http://127.0.0.1:7860 --shots /tmp/shots [--lora-dir DIR]
"""
import argparse
import json
import os
import re
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHROMIUM = os.environ.get("CHARLORA_CHROMIUM", "/usr/bin/chromium")
# a closed network: no background connections, no sandbox (root in CI)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
NAME, TRIGGER = "pip_browser", "pipchr"
DOCS = {"01-empty": "ui-empty.jpg", "02-checked": "ui-checked.jpg", "04-training": "ui-training.jpg",
        "07-finished": "ui-done.jpg"}   # the README's pictures (--docs): states of the --finish flow


def pictures(folder, good=6):
    """``good`` drawings of the demo character, one file that is not a picture, one picture too small."""
    from PIL import Image
    from lib_charlora.demo import draw_character
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(good):
        paths.append(os.path.join(folder, f"pip{i}.png"))
        draw_character(100 + i, 128).save(paths[-1])
    paths.append(os.path.join(folder, "broken.png"))
    with open(paths[-1], "wb") as f:
        f.write(b"this is not a picture")
    paths.append(os.path.join(folder, "tiny.png"))
    Image.new("RGB", (40, 40), (200, 30, 30)).save(paths[-1])
    return paths


class Tab:
    """The tab in a page, with helpers that read what a user sees."""

    def __init__(self, page, shots, timeout=240_000, docs=None):
        self.page, self.shots, self.timeout, self.docs = page, shots, timeout, docs
        self.taken = []

    def q(self, selector):
        return self.page.locator(selector)

    def text(self, elem_id):
        return self.q(f"#{elem_id}").first.inner_text()

    def field(self, elem_id):
        return self.q(f"#{elem_id} textarea, #{elem_id} input").first

    def wait_text(self, elem_id, pattern, timeout=None):
        """Wait until the element's visible text matches ``pattern``; -> the match."""
        end = time.time() + (timeout or self.timeout) / 1000
        last = ""
        while time.time() < end:
            last = self.text(elem_id)
            m = re.search(pattern, last)
            if m:
                return m
            self.page.wait_for_timeout(250)
        raise AssertionError(f"#{elem_id} never showed {pattern!r}; it shows: {last[:500]!r}")

    def enabled(self, elem_id):
        return self.q(f"#{elem_id}").first.is_enabled()

    def wait_enabled(self, elem_id, state=True, timeout=60_000):
        end = time.time() + timeout / 1000
        while time.time() < end:
            if self.enabled(elem_id) == state:
                return
            self.page.wait_for_timeout(200)
        raise AssertionError(f"#{elem_id} did not become {'enabled' if state else 'disabled'}")

    def shot(self, name):
        if self.shots:
            path = os.path.join(self.shots, name + ".png")
            self.page.screenshot(path=path, full_page=True)
            self.taken.append(path)
        if self.docs and name in DOCS:  # the two columns, down to the Test section
            self.page.wait_for_timeout(500)
            top = self.q("#charlora_test_section").first.bounding_box()["y"] + self.page.evaluate("window.scrollY")
            width = self.page.viewport_size["width"]
            self.page.screenshot(path=os.path.join(self.docs, DOCS[name]), full_page=True, type="jpeg", quality=80,
                                 clip={"x": 0, "y": 0, "width": width, "height": top - 4})

    def open_tab(self):
        self.q("#charlora_train").wait_for(state="attached", timeout=60_000)
        if not self.q("#charlora_train").is_visible():  # a tab among others (a WebUI): open it
            name = re.compile(r"^\s*Character LoRA\s*$")  # gradio 4 marks tabs as tabs, gradio 3 as buttons
            self.page.get_by_role("tab", name=name).or_(self.page.get_by_role("button", name=name)).first.click()
        self.q("#charlora_train").wait_for(state="visible", timeout=60_000)

    def caption_rows(self):
        rows = self.q("#charlora_captions tr[slot=tbody]")  # gradio 4 (its first row only measures widths)
        return rows if rows.count() else self.q("#charlora_captions tbody tr")

    def edit_caption(self, row, text):
        cell = self.caption_rows().nth(row).locator("td").nth(1)
        cell.dblclick()
        editor = cell.locator("input, textarea").first
        editor.wait_for(state="visible", timeout=10_000)
        editor.fill(text)
        editor.press("Enter")
        self.page.wait_for_timeout(300)


def wait_uploaded(tab, count, timeout=60):
    """Until the upload has finished: each file links to its server copy then."""
    links = tab.q("#charlora_files a[href*='file=']")
    end = time.time() + timeout
    while links.count() < count and time.time() < end:
        tab.page.wait_for_timeout(250)
    assert links.count() >= count, f"{links.count()} of {count} files uploaded"


def run(page, base_url, lora_dir=None, shots=None, pics=None, steps=300, name=NAME, stop=True, docs=None):
    """The whole flow; ``lora_dir`` (where the server writes LoRAs) lets it check the file itself; ``stop``:
    reload the page while training and press Stop and save (else: let the training finish)."""
    tab = Tab(page, shots, docs=docs)
    page.goto(base_url)
    tab.open_tab()
    assert "Training on" in tab.text("charlora_model")
    assert not tab.enabled("charlora_stop") and not tab.enabled("charlora_cancel")
    tab.shot("01-empty")

    # refusals before anything else: a message styled as an error, nothing queued
    tab.q("#charlora_train").click()
    tab.wait_text("charlora_status", r"Character name: a name is required")
    assert tab.q("#charlora_status .charlora-error").count() == 1
    tab.wait_enabled("charlora_train")
    tab.field("charlora_name").fill("a/b")
    tab.q("#charlora_train").click()
    tab.wait_text("charlora_status", r"path separator")
    tab.wait_enabled("charlora_train")
    tab.q("#charlora_check").click()  # zero pictures
    tab.wait_text("charlora_report", r"Pictures: add pictures")

    tab.field("charlora_name").fill(name)
    tab.field("charlora_trigger").fill(TRIGGER)
    tab.q("#charlora_files input[type=file]").set_input_files(pics)
    wait_uploaded(tab, len(pics))
    tab.q("#charlora_check").click()
    checked = int(tab.wait_text("charlora_report", r"6 pictures accepted, 2 rejected \(checked for training at (\d+) px")
                  .group(1))
    report = tab.text("charlora_report")
    assert re.search(r"broken\.png\s+\u2716 rejected", report), report
    assert re.search(r"tiny\.png\s+\u2716 rejected.*64", report), report
    assert report.count("\u2714 ok") == 6, report
    thumbs = tab.q("#charlora_gallery img")
    thumbs.first.wait_for(state="visible")
    assert thumbs.count() == 6, thumbs.count()
    assert all(thumbs.nth(i).is_visible() for i in range(6)), "a thumbnail is hidden"
    fit = thumbs.first.evaluate("e => getComputedStyle(e).objectFit")
    assert fit == "contain", fit  # whole pictures, not square crops
    rows = tab.caption_rows()
    assert rows.count() == 6, rows.count()
    assert "photo of pipchr" in tab.text("charlora_captions")  # what an empty caption stands for
    tab.edit_caption(0, "pipchr, smiling, waving")
    assert "waving" in tab.text("charlora_captions")
    tab.shot("02-checked")

    tab.q("#charlora_preset label").filter(has_text="Fast").click()
    tab.q("#charlora_advanced .label-wrap").first.click()
    tab.q("#charlora_use_advanced input").check()
    tab.field("charlora_adv_steps").fill(str(steps))
    tab.field("charlora_adv_resolution").fill("64")
    tab.field("charlora_adv_resolution").press("Tab")
    tab.field("charlora_adv_sample_every").fill("10")
    tab.field("charlora_adv_sample_every").press("Tab")
    tab.wait_text("charlora_resolution_note", r"made for %d px; training will use 64 px" % checked)
    tab.q("#charlora_check").click()
    tab.wait_text("charlora_report", r"checked for training at 64 px")
    tab.wait_text("charlora_resolution_note", r"^\s*$")
    assert "waving" in tab.text("charlora_captions")  # checking again keeps the edited caption
    tab.shot("03-settings")

    # a double click on Train: one job
    tab.q("#charlora_train").dblclick()
    tab.wait_enabled("charlora_train", False)
    tab.wait_text("charlora_status", r"Training: step \d+/%d" % steps)
    tab.wait_enabled("charlora_stop")
    assert not tab.enabled("charlora_train")
    first = int(tab.wait_text("charlora_status", r"step (\d+)/").group(1))
    tab.wait_text("charlora_status", r"loss \d\.\d{4}")
    end = time.time() + 180
    while int(tab.q("#charlora_loss svg").first.get_attribute("data-points")) < 2 and time.time() < end:
        page.wait_for_timeout(300)  # the loss is read every few steps: the plot fills
    assert int(tab.q("#charlora_loss svg").first.get_attribute("data-points")) >= 2
    assert int(re.search(r"step (\d+)/", tab.text("charlora_status")).group(1)) > first  # the step moves
    if page.evaluate("typeof requestProgress === 'function'"):  # in a WebUI: its progress bar, by the status
        bar = tab.q("#charlora_progress_box .progressDiv").first
        assert abs(bar.bounding_box()["y"] - tab.q("#charlora_status").first.bounding_box()["y"]) < 120
        assert bar.inner_text().count("ETA") <= 1, bar.inner_text()
    else:
        tab.wait_text("charlora_status", r"ETA \d+")
    tab.q("#charlora_preview img").first.wait_for(state="visible", timeout=120_000)  # a preview every 10 steps
    tab.shot("04-training")
    if not stop:
        return finish(tab, base_url, lora_dir, steps, name)

    # the page reloaded while training: the running job is shown again
    page.reload()
    tab.open_tab()
    tab.wait_text("charlora_status", r"Training: step \d+/%d" % steps, timeout=60_000)
    tab.wait_enabled("charlora_stop")
    assert not tab.enabled("charlora_train")
    tab.shot("05-reloaded")

    tab.q("#charlora_stop").click()
    m = tab.wait_text("charlora_status", r"Stopped at step (\d+)/%d and saved" % steps)
    stopped = int(m.group(1))
    assert 0 < stopped < steps
    tab.wait_enabled("charlora_train")
    assert not tab.enabled("charlora_stop") and not tab.enabled("charlora_cancel")
    assert tab.field("charlora_result").input_value() == f"<lora:{name}:1> {TRIGGER}"
    tab.q("#charlora_preview img").first.wait_for(state="visible")
    tab.shot("07-done")

    jobs = page.request.get(base_url.rstrip("/") + "/charlora/v1/jobs").json()
    trainings = [j for j in jobs["jobs"] if j["kind"] == "train" and j["lora_name"] == name]
    assert len(trainings) == 1, trainings  # the double click queued one job

    if lora_dir:
        meta = _metadata(os.path.join(lora_dir, name + ".safetensors"))
        assert int(meta["ss_steps"]) == stopped
        assert "waving" in json.dumps(json.loads(meta["ss_tag_frequency"])), meta["ss_tag_frequency"]

    # a refused second training keeps the result on screen; the message names the tab's checkbox
    tab.field("charlora_name").fill(name)  # the reload emptied the form
    tab.q("#charlora_train").click()
    tab.wait_text("charlora_status", r"already exists.*Replace an existing LoRA of this name")
    assert tab.field("charlora_result").input_value() == f"<lora:{name}:1> {TRIGGER}"
    tab.wait_enabled("charlora_train")

    send_to_txt2img(tab, name)
    return tab


def finish(tab, base_url, lora_dir, steps, name):
    """Let the training end by itself; the result card; "Use in txt2img"."""
    tab.wait_text("charlora_status", r"Done: %d steps" % steps, timeout=600_000)
    tab.wait_enabled("charlora_train")
    assert tab.field("charlora_result").input_value() == f"<lora:{name}:1> {TRIGGER}"
    tab.q("#charlora_preview img").first.wait_for(state="visible")
    tab.shot("07-finished")
    if lora_dir:
        assert int(_metadata(os.path.join(lora_dir, name + ".safetensors"))["ss_steps"]) == steps
    send_to_txt2img(tab, name)
    return tab


def send_to_txt2img(tab, name):
    send = tab.q("#charlora_send")
    if send.count() and send.is_visible():
        send.click()
        prompt = tab.q("#txt2img_prompt textarea").first
        prompt.wait_for(state="visible", timeout=10_000)
        value = prompt.input_value()
        assert f"<lora:{name}:1> {TRIGGER}" in value, value
        assert tab.q("#charlora_train").is_hidden()  # the txt2img tab is shown
        tab.shot("08-txt2img")


def _metadata(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))["__metadata__"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--shots", help="folder for screenshots of each state")
    p.add_argument("--lora-dir", help="the server's Lora folder (checks the written file)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--name", default=NAME, help="the LoRA's name (default: %(default)s)")
    p.add_argument("--finish", action="store_true", help="let the training finish (no reload, no Stop)")
    p.add_argument("--docs", help="write the README's pictures into this folder (with --finish)")
    args = p.parse_args()
    import tempfile
    from playwright.sync_api import sync_playwright
    if args.shots:
        os.makedirs(args.shots, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        run(page, args.url, args.lora_dir, args.shots, pictures(tmp), steps=args.steps, name=args.name,
            stop=not args.finish, docs=args.docs)
        browser.close()
    print("browser flow passed")


if __name__ == "__main__":
    main()
