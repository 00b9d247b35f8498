"""The "Character LoRA" tab (gradio 3.41.2 in A1111 / reForge, 4.40.0 in Forge, either one standalone).

The tab is a thin layer over ``TrainService``: it reads uploads or a server folder, shows the
intake report with thumbnails and an editable caption table, submits a job (validated before it
is queued, like the API) and follows it with a generator, so the tab shows step, loss and ETA.
Laid out like the WebUI's own tabs: what the user gives on the left; Train, progress and the
result on the right, so nothing needs scrolling away from the Train button.
"""
import html
import math
import os
import time

import gradio as gr
from PIL import Image

from .engine.dataset import DatasetError, load_folder, load_uploads
from .engine.errors import CharLoraError, ConfigError
from .engine.memory import memory_text

GRADIO4 = int(gr.__version__.split(".")[0]) >= 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSS_FILE = os.path.join(ROOT, "style.css")          # the WebUIs load an extension's style.css themselves
JS_FILE = os.path.join(ROOT, "javascript", "charlora.js")
PRESET_LABELS = {"Fast": "fast", "Balanced": "balanced", "Quality": "quality"}
ADVANCED = [  # (request field, label, default, kind)
    ("steps", "Steps", 1500, "int"), ("rank", "Rank", 16, "int"), ("alpha", "Alpha", 8, "float"),
    ("learning_rate", "UNet learning rate", 1e-4, "float"), ("text_encoder_lr", "Text encoder learning rate", 5e-5, "float"),
    ("resolution", "Resolution", 512, "int"), ("batch_size", "Batch size", 1, "int"), ("seed", "Seed", 0, "int"),
    ("sample_every", "Preview picture every N steps (0 = off)", 0, "int"),
    ("save_every", "Save a checkpoint every N steps (0 = off)", 0, "int"),
]
RESOLUTION = [f for f, *_ in ADVANCED].index("resolution")
LABELS = {"name": "Character name", "trigger": "Trigger word", "images": "Pictures", "image_dir": "Folder",
          **{field: label for field, label, _, _ in ADVANCED}}
TEMPLATE = "photo of {trigger}"  # what an empty caption stands for (engine.captions.DEFAULT_TEMPLATE)


def _click(button, fn, inputs, outputs, js=None, **kwargs):
    if js:
        kwargs["js" if GRADIO4 else "_js"] = js
    return button.click(fn=fn, inputs=inputs, outputs=outputs, **kwargs)


def _file_list(files):
    """gradio 3 passes tempfile wrappers (``.name``), gradio 4 paths."""
    out = []
    for f in files or []:
        path = getattr(f, "name", f)
        with open(path, "rb") as fh:
            out.append((os.path.basename(getattr(f, "orig_name", None) or path), fh.read()))
    return out


def message(text, kind="error"):
    """A message box: red with a cross for errors, amber with a warning sign for warnings."""
    icon = {"error": "\u2716", "warning": "\u26a0", "info": "\u2139"}[kind]
    return (f"<div class='charlora-msg charlora-{kind}'><span class='charlora-icon'>{icon}</span> "
            f"{html.escape(text)}</div>")


def _error(e):
    """A refusal as the tab words it: the field by its label in the tab, not its API name."""
    text = str(e)
    field = getattr(e, "field", None)
    if field and text.startswith(field + ": "):
        text = f"{LABELS.get(field, field)}: {text[len(field) + 2:]}"
    return message(text.replace("or set overwrite", "or tick \u201cReplace an existing LoRA of this name\u201d"))


def _report_html(report, resolution):
    rows = []
    for f in report.files:
        state = "<span class='charlora-ok'>\u2714 ok</span>" if f.accepted else \
            "<span class='charlora-bad'>\u2716 rejected</span>"
        detail = "; ".join(([f.reason] if f.reason else []) + list(f.warnings))
        rows.append(f"<tr><td>{html.escape(f.name)}</td><td>{state}</td><td>{html.escape(detail)}</td></tr>")
    head = (f"<p><b>{len(report.accepted)}</b> pictures accepted, <b>{len(report.rejected)}</b> rejected "
            f"(checked for training at {resolution} px)</p>")
    notes = "".join(message(e) for e in report.errors) + "".join(message(w, "warning") for w in report.warnings)
    return (head + notes + "<table class='charlora-report'><thead><tr><th>picture</th><th>status</th>"
            "<th>notes</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def uploads(files):
    """[(name, bytes)] of the uploaded files; refuses files that arrived empty (gradio 3 sends a file whose
    upload is still running as an empty one)."""
    out = _file_list(files)
    empty = [n for n, b in out if not b]
    if empty:
        raise ConfigError("images", f"{len(empty)} of the {len(out)} files arrived empty ({', '.join(empty[:3])}"
                                    f"{', …' if len(empty) > 3 else ''}): if they were still uploading, wait until "
                                    "the upload has finished and press the button again; remove empty files")
    return out


def read_pictures(files, folder, resolution, folder_refusal=None):
    """-> (images, report) from the upload list or the folder path."""
    given = uploads(files)
    folder = (folder or "").strip()
    if given and folder:
        raise ConfigError("images", "choose either uploaded pictures or a server folder, not both")
    if folder:
        check_folder(folder_refusal)
        return load_folder(folder, int(resolution))
    if not given:
        raise ConfigError("images", "add pictures (or give a folder on the server)")
    return load_uploads([(n, b, None) for n, b in given], int(resolution))


def check_folder(folder_refusal):
    why = folder_refusal() if folder_refusal is not None else None
    if why:
        raise ConfigError("image_dir", why)


def create_tab(service, model_info=lambda: "no checkpoint information", captioners=None, standalone=False,
               folder_refusal=None):
    """Build the tab's Blocks. ``service``: a ``TrainService``; ``model_info()``: the loaded checkpoint as
    text; ``captioners``: {"BLIP": fn(image) -> str, ...} (the WebUI's interrogators; none = no button);
    ``standalone``: served on its own (``python -m lib_charlora ui``): a download link instead of
    "Use in txt2img", and the tab's own progress bar instead of the WebUI's; ``folder_refusal()``: None,
    or why server folders may not be read from this tab (a networked WebUI without credentials)."""
    captioners = dict(captioners or {})
    with gr.Blocks(analytics_enabled=False) as tab:
        job_state = gr.State(None)
        checked_at = gr.State(None)   # the resolution the shown report was made for
        task_box = gr.Textbox(visible=False, elem_id="charlora_task")  # filled by JS with the progress task id
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, elem_id="charlora_inputs"):
                with gr.Row():
                    model_md = gr.Markdown(model_info(), elem_id="charlora_model")
                    refresh = gr.Button("\u21bb", elem_id="charlora_refresh_model", scale=0, min_width=40)
                with gr.Row():
                    name = gr.Textbox(label="Character name (file name)", placeholder="pip_v1", elem_id="charlora_name")
                    trigger = gr.Textbox(label="Trigger word", placeholder="pipchr", elem_id="charlora_trigger")
                overwrite = gr.Checkbox(label="Replace an existing LoRA of this name", value=False,
                                        elem_id="charlora_overwrite")
                with gr.Row():
                    files = gr.File(label="Pictures (20-50 work best)", file_count="multiple", elem_id="charlora_files")
                    folder = gr.Textbox(label="…or a folder on the server", placeholder="/path/to/pictures",
                                        elem_id="charlora_folder")
                with gr.Row():
                    check = gr.Button("Check pictures", elem_id="charlora_check")
                    resolution_note = gr.HTML(elem_id="charlora_resolution_note")
                report_html = gr.HTML(elem_id="charlora_report")
                gallery = gr.Gallery(show_label=False, columns=4, object_fit="contain", allow_preview=True,
                                     elem_id="charlora_gallery", **({"height": "auto"} if GRADIO4 else {}))
                captions = gr.Dataframe(headers=["picture", "caption"], datatype=["str", "str"], interactive=True,
                                        col_count=(2, "fixed"), wrap=True, label=_captions_label(""),
                                        elem_id="charlora_captions",
                                        **({"height": 420} if GRADIO4 else {"max_rows": None}))
                with gr.Row(visible=bool(captioners)):
                    captioner = gr.Dropdown(list(captioners) or ["-"], value=(list(captioners) or ["-"])[0],
                                            label="Interrogator", elem_id="charlora_captioner")
                    autocaption = gr.Button("Auto-caption empty captions", elem_id="charlora_autocaption")
                preset = gr.Radio(list(PRESET_LABELS), value=_default_preset(service), label="Preset",
                                  elem_id="charlora_preset")
                with gr.Accordion("Advanced", open=False, elem_id="charlora_advanced"):
                    use_advanced = gr.Checkbox(label="Use these values instead of the preset's", value=False,
                                               elem_id="charlora_use_advanced")
                    adv = []
                    with gr.Row():
                        for field, label, default, kind in ADVANCED:
                            adv.append(gr.Number(label=label, value=default, precision=0 if kind == "int" else None,
                                                 elem_id=f"charlora_adv_{field}", min_width=120))
                    train_te = gr.Checkbox(label="Train the text encoder", value=True, elem_id="charlora_train_te")
            with gr.Column(scale=1, elem_id="charlora_outputs"):
                with gr.Row():
                    train = gr.Button("Train", variant="primary", elem_id="charlora_train")
                    stop_save = gr.Button("Stop and save", elem_id="charlora_stop", interactive=False)
                    cancel = gr.Button("Cancel", elem_id="charlora_cancel", interactive=False)
                with gr.Column(elem_classes=["progress-container"], elem_id="charlora_progress_box"):
                    gr.HTML("", elem_id="charlora_progress")  # the WebUI draws its progress bar here
                    status = gr.HTML(elem_id="charlora_status")
                loss_plot = gr.HTML(_loss_svg([], 0), elem_id="charlora_loss")
                preview = gr.Image(label="Preview", interactive=False, elem_id="charlora_preview", height=320,
                                   type="pil")
                result = gr.Textbox(label="Prompt for the LoRA", interactive=False, elem_id="charlora_result",
                                    show_copy_button=True)
                with gr.Row():
                    send = gr.Button("Use in txt2img", elem_id="charlora_send", visible=not standalone)
                    download = gr.File(label="LoRA file", interactive=False, visible=standalone,
                                       elem_id="charlora_download")
        test = _TestSection(service, standalone)

        def resolution_for(preset_, use_adv, res):
            if use_adv and res:
                return int(res)
            return service.resolution(PRESET_LABELS.get(preset_, "balanced"))

        def on_check(files_, folder_, table, trigger_, preset_, use_adv, res):
            try:
                resolution = resolution_for(preset_, use_adv, res)
                images, report = read_pictures(files_, folder_, resolution, folder_refusal)
            except (CharLoraError, DatasetError) as e:
                return _error(e), gr.update(), gr.update(), gr.update(), ""  # typed captions stay
            thumbs = []
            for im in images:
                t = im.image.copy()
                t.thumbnail((256, 256))
                thumbs.append((t, im.name))
            given = _captions_from_table(table)  # a second check keeps what the user typed
            table = [[im.name, given.get(im.name) or im.caption or ""] for im in images] or [["", ""]]
            return (_report_html(report, resolution), thumbs, gr.update(value=table, label=_captions_label(trigger_)),
                    resolution, "")

        def on_settings(preset_, use_adv, res, checked):
            """After the preset or resolution changed: say when the shown report is for another resolution."""
            try:
                resolution = resolution_for(preset_, use_adv, res)
            except CharLoraError as e:
                return _error(e)
            if checked is not None and checked != resolution:
                return message(f"The report below was made for {checked} px; training will use {resolution} px: "
                               "press Check pictures again.", "warning")
            return ""

        outputs = [job_state, status, loss_plot, preview, result, download, train, stop_save, cancel]

        def on_train(task_id, files_, folder_, table, name_, trigger_, overwrite_, preset_, auto_test, use_adv, te,
                     *adv_values):
            keep = (gr.update(),) * 5
            body = {"name": (name_ or "").strip(), "preset": PRESET_LABELS.get(preset_, "balanced")}
            if (trigger_ or "").strip():
                body["trigger"] = trigger_.strip()
            if overwrite_:
                body["overwrite"] = True
            if auto_test:  # keep a few checkpoints to compare in the test after training
                body.update(keep_checkpoints=True, checkpoint_count=TEST_CHECKPOINTS)
            yield (gr.update(), message("Checking the pictures and settings…", "info")) + keep[:4] + _buttons(True)
            try:
                if use_adv:
                    for (field, label, _, kind), value in zip(ADVANCED, adv_values):
                        if value is None:
                            raise ConfigError(field, "is empty")
                        body[field] = int(value) if kind == "int" else float(value)
                    body["train_text_encoder"] = bool(te)
                if (folder_ or "").strip():
                    check_folder(folder_refusal)
                    body["image_dir"] = folder_.strip()
                    job = service.submit(body, task_id=task_id or None)
                else:
                    given = _captions_from_table(table)
                    job = service.submit(body, files=[(n, b, given.get(n)) for n, b in uploads(files_)],
                                         task_id=task_id or None)
                    missing = [im.name for im in job.spec.images if im.name not in given]
                    if given and missing:
                        job.warnings.append(f"{len(missing)} pictures have no row in the caption table "
                                            f"({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}): "
                                            "they use their own caption file or the template")
            except (CharLoraError, DatasetError) as e:  # the previous result stays on screen; no job: no test after
                yield (None, _error(e)) + keep[:4] + _buttons(False)
                return
            yield from _follow(job, webui_bar=bool(task_id) and not standalone)

        def _follow(job, webui_bar):
            while job.status in ("queued", "running"):
                yield (job.id, _status_html(job, bar=not webui_bar), _loss_svg(job.loss_history, job.total_steps),
                       getattr(job, "preview", None) or gr.update(), "", None) + _buttons(True)
                time.sleep(0.5)
            picture, text, path = None, "", None
            if job.lora_path:
                stem = job.lora_path[:-len(".safetensors")]
                if os.path.exists(stem + ".preview.png"):
                    with Image.open(stem + ".preview.png") as im:
                        picture = im.copy()
                text = f"<lora:{job.lora_name}:1> {job.spec.config.trigger}"
                path = job.lora_path if standalone else None
            yield (job.id, _status_html(job, bar=False), _loss_svg(job.loss_history, job.total_steps), picture, text,
                   path) + _buttons(False)

        def on_load():
            """A reloaded page shows the running (or last) training again and follows it."""
            jobs = [j for j in service.runner.list() if j.kind == "train"]
            if not jobs:
                yield (gr.update(),) * len(outputs)
                return
            yield from _follow(jobs[-1], webui_bar=False)

        def on_autocaption(files_, folder_, table, which, preset_, use_adv, res):
            fn = captioners.get(which)
            if fn is None:
                return table, message("No interrogator is available.")
            try:
                images, _ = read_pictures(files_, folder_, resolution_for(preset_, use_adv, res), folder_refusal)
            except (CharLoraError, DatasetError) as e:
                return table, _error(e)
            given = _captions_from_table(table)
            rows, filled = [], 0
            for im in images:
                text = (given.get(im.name) or im.caption or "").strip()
                if not text:
                    text = (fn(im.image) or "").strip()
                    filled += 1
                rows.append([im.name, text])
            return rows or [["", ""]], message(f"{filled} captions written by {which}; edit them as needed.", "info")

        def on_stop(job_id, save):
            job = service.runner.stop(job_id, save=save) if job_id else None
            return _status_html(job, bar=False) if job else message("No training is running.", "info")

        _click(refresh, lambda: model_info(), [], [model_md])
        settings = [preset, use_advanced, adv[RESOLUTION]]
        _click(check, on_check, [files, folder, captions, trigger, *settings], [report_html, gallery, captions, checked_at, resolution_note])
        for component in settings:
            component.change(on_settings, [*settings, checked_at], [resolution_note])
        trained = _click(train, on_train, [task_box, files, folder, captions, name, trigger, overwrite, preset,
                                           test.auto, use_advanced, train_te, *adv],
                         outputs, js="charloraStartTraining")
        trained.then(fn=test.after_training, inputs=[job_state, test.auto, *test.settings], outputs=test.outputs)
        tab.load(on_load, [], outputs)
        _click(autocaption, on_autocaption, [files, folder, captions, captioner, *settings], [captions, status])
        _click(stop_save, lambda j: on_stop(j, True), [job_state], [status])
        _click(cancel, lambda j: on_stop(j, False), [job_state], [status])
        _click(send, None, [result], [], js="charloraSendToTxt2img")
        tab.charlora = {"train": on_train, "check": on_check, "stop": on_stop, "autocaption": on_autocaption,
                        "load": on_load, "settings": on_settings,
                        "test": test.run, "after_training": test.after_training, "use": test.use}
    return tab


def _default_preset(service):
    settings = service.settings() if callable(getattr(service, "settings", None)) else {}
    chosen = settings.get("default_preset", "balanced")
    return next((label for label, value in PRESET_LABELS.items() if value == chosen), "Balanced")


def _buttons(running):
    """(Train, Stop and save, Cancel): only what can be done now is enabled."""
    return (gr.update(interactive=not running), gr.update(interactive=running), gr.update(interactive=running))


def _captions_label(trigger):
    example = TEMPLATE.format(trigger=(trigger or "").strip() or "<trigger>")
    return f"Captions (edit in place; an empty caption means \u201c{example}\u201d)"


def _captions_from_table(table):
    """{picture: caption or None (= the template)} from the caption table."""
    given = {}
    for row in _rows(table):
        if row and row[0]:
            text = row[1] if len(row) > 1 else None
            given[str(row[0])] = (str(text).strip() or None) if text is not None else None
    return given


TEST_CHECKPOINTS = 3  # intermediate checkpoints a training keeps for the test after it
SCORE_HEADERS = ["checkpoint", "step", "strength", "identity", "identity lift", "prompt fidelity", "fidelity change"]


class _TestSection:
    """The "Test" section: grids and scores of a LoRA's checkpoints (an evaluation job), the pick, and
    "Use this checkpoint" / "Send to txt2img"."""

    def __init__(self, service, standalone=False):
        from .engine.evaluate import DEFAULT_PROMPTS
        self.service = service
        settings = service.settings() if callable(getattr(service, "settings", None)) else {}
        with gr.Accordion("Test", open=True, elem_id="charlora_test_section"):
            with gr.Row():
                self.lora = gr.Textbox(label="LoRA to test (default: the one just trained)", elem_id="charlora_test_lora")
                self.auto = gr.Checkbox(label="Test automatically after training",
                                        value=settings.get("test_after_training", True), elem_id="charlora_test_auto")
            prompts = gr.Textbox(label="Prompts, one per line ({trigger} = the trigger word)", lines=6,
                                 value="\n".join(DEFAULT_PROMPTS), elem_id="charlora_test_prompts")
            with gr.Row():
                strengths = gr.Textbox(label="Strengths", value="0.6, 0.8, 1.0", elem_id="charlora_test_strengths")
                seeds = gr.Textbox(label="Seeds", value="1, 2", elem_id="charlora_test_seeds")
                steps = gr.Number(label="Sampling steps", value=20, precision=0, elem_id="charlora_test_steps")
            self.settings = [prompts, strengths, seeds, steps]
            run = gr.Button("Test", elem_id="charlora_test")
            self.state = gr.State(None)
            status = gr.HTML(elem_id="charlora_test_status")
            grids = gr.Gallery(label="One grid per checkpoint: first row without the LoRA, then one row per strength",
                               columns=1, object_fit="contain", elem_id="charlora_test_grids")
            scores = gr.Dataframe(headers=SCORE_HEADERS, interactive=False, label="Scores",
                                  elem_id="charlora_test_scores")
            best = gr.Textbox(label="Recommended", interactive=False, elem_id="charlora_test_best",
                              show_copy_button=True)
            with gr.Row():
                use = gr.Button("Use this checkpoint", elem_id="charlora_test_use")
                send = gr.Button("Send to txt2img", elem_id="charlora_test_send", visible=not standalone)
        self.outputs = [self.lora, status, grids, scores, best, self.state]
        _click(run, self.run, [self.lora, *self.settings], self.outputs)
        _click(use, self.use, [self.state], [status, best])
        _click(send, None, [best], [], js="charloraSendToTxt2img")

    def after_training(self, job_id, auto, *settings):
        job = self.service.runner.get(job_id) if job_id else None
        if not auto or job is None or job.status != "done" or not job.lora_path:
            yield (gr.update(),) * 5 + (None,)
            return
        yield from self.run(job.lora_name, *settings)

    def run(self, lora, prompts, strengths, seeds, steps):
        lora = (lora or "").strip()
        try:
            body = {"lora": lora, "prompts": [p.strip() for p in (prompts or "").splitlines() if p.strip()],
                    "strengths": _numbers(strengths, "strengths", float), "seeds": _numbers(seeds, "seeds", int),
                    "steps": int(steps or 20)}
            job = self.service.submit_evaluation(body)
        except (CharLoraError, DatasetError) as e:
            yield lora, _error(e), [], None, "", None
            return
        while job.status in ("queued", "running"):
            yield lora, _status_html(job, bar=True), [], None, "", None
            time.sleep(0.5)
        result = job.result or {}
        rows = [[s["checkpoint"], s["step"], s["strength"]] + [None if s[k] is None else round(s[k], 4) for k in
                ("identity", "identity_lift", "prompt_fidelity", "prompt_fidelity_delta")]
                for s in result.get("scores", [])]
        best = result.get("best") or {}
        trigger = result.get("trigger", "")
        text = f"<lora:{best['checkpoint'][:-len('.safetensors')]}:{best['strength']:g}> {trigger}" if best else ""
        grids = []  # pictures, not paths: gradio 4 refuses files outside its allowed folders
        for path in result.get("grid_paths", []):
            with Image.open(path) as im:
                grids.append((im.copy(), os.path.basename(path)))
        yield (lora, _status_html(job, bar=False) + (f"<p>{html.escape(best.get('reason', ''))}</p>" if best else ""),
               grids, rows or None, text.strip(), {"lora": lora, "best": best, "trigger": trigger})

    def use(self, state):
        best = (state or {}).get("best")
        if not best:
            return message("Test a LoRA first."), ""
        if best["checkpoint"] == state["lora"] + ".safetensors":
            return (message("The recommended checkpoint is already the LoRA's file.", "info"),
                    f"<lora:{state['lora']}:{best['strength']:g}> {state['trigger']}".strip())
        try:
            out = self.service.promote({"lora": state["lora"], "checkpoint": best["checkpoint"],
                                        "strength": best["strength"]})
        except CharLoraError as e:
            return _error(e), ""
        return (message(f"{out['lora']} is now the checkpoint of step {out['ss_steps']} (the former file is kept as "
                        f"{out['lora']}_checkpoints/{out['lora']}-final.safetensors).", "info"),
                f"<lora:{out['lora']}:{best['strength']:g}> {state['trigger']}".strip())


def _numbers(text, field, kind):
    try:
        return [kind(x) for x in (text or "").replace(";", ",").split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(field, f"must be numbers separated by commas ({e})") from e


def _rows(table):
    if table is None:
        return []
    if hasattr(table, "values"):  # pandas DataFrame
        return table.values.tolist()
    return table


def _loss_svg(history, total_steps, width=480, height=200):
    """The loss curve as an inline SVG: whole-step ticks, the same under gradio 3 and 4."""
    left, right, top, bottom = 52, 12, 24, 30
    w, h = width - left - right, height - top - bottom
    points = [(int(s), float(v)) for s, v in history or []]
    x_max = max([total_steps or 0] + [s for s, _ in points] + [1])
    parts = [f"<svg class='charlora-loss' viewBox='0 0 {width} {height}' width='100%' role='img' "
             f"data-points='{len(points)}' aria-label='Loss over {len(points)} readings'>",
             f"<text x='{left}' y='16' class='charlora-loss-title'>Loss</text>",
             f"<line x1='{left}' y1='{top + h}' x2='{left + w}' y2='{top + h}' class='charlora-axis'/>",
             f"<line x1='{left}' y1='{top}' x2='{left}' y2='{top + h}' class='charlora-axis'/>"]
    for step in _ticks(0, x_max, integer=True):
        x = left + w * step / x_max
        parts.append(f"<text x='{x:.1f}' y='{top + h + 16}' text-anchor='middle'>{step:g}</text>")
    parts.append(f"<text x='{left + w}' y='{height - 2}' text-anchor='end'>step</text>")
    if points:
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5 * abs(lo or 1) * 0.1, hi + 0.5 * abs(hi or 1) * 0.1
        ticks = _ticks(lo, hi)
        decimals = max(0, -math.floor(math.log10(ticks[1] - ticks[0]))) if len(ticks) > 1 else 3
        for value in ticks:
            y = top + h - h * (value - lo) / (hi - lo)
            parts.append(f"<text x='{left - 6}' y='{y + 4:.1f}' text-anchor='end'>{value:.{decimals}f}</text>")
        coords = " ".join(f"{left + w * s / x_max:.1f},{top + h - h * (v - lo) / (hi - lo):.1f}" for s, v in points)
        parts.append(f"<polyline points='{coords}' class='charlora-loss-line'/>")
    else:
        parts.append(f"<text x='{left + w / 2}' y='{top + h / 2}' text-anchor='middle' class='charlora-muted'>"
                     "the loss appears here while training</text>")
    return "".join(parts) + "</svg>"


def _ticks(lo, hi, integer=False, count=5):
    """A few round tick values between lo and hi (whole numbers when ``integer``)."""
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1, round(step))
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _status_html(job, bar=True):
    """The job's state in words; ``bar``: draw a progress bar too (when the WebUI's own bar is not shown)."""
    total = max(1, job.total_steps or 1)
    stopping = job.status == "running" and job.cancel.requested
    if job.status == "queued":
        head = "Queued: waiting for the job before it (or a generation) to finish"
    elif stopping:
        head = ("Stopping: drawing the preview picture and writing the LoRA file…" if job.cancel.save
                else "Cancelling: nothing will be written…")
    elif job.status == "running" and job.step == 0:
        head = "Preparing: reading the pictures and encoding them…" if job.kind == "train" else "Preparing…"
    elif job.status == "running" and job.kind == "train" and job.step >= job.total_steps:
        head = "Finishing: drawing the preview picture and writing the LoRA file…"
    elif job.status == "running":
        parts = [f"Training: step {job.step}/{job.total_steps}" if job.kind == "train"
                 else f"Testing: picture {job.step}/{job.total_steps}"]
        if job.loss is not None:
            parts.append(f"loss {job.loss:.4f}")
        if job.eta_seconds is not None and bar:
            parts.append(f"ETA {_duration(job.eta_seconds)}")
        if job.kind == "train" and job.peak_memory_mb is not None:
            parts.append(f"memory {memory_text(job.peak_memory_mb)}")
        head = " · ".join(parts)
    elif job.status == "done" and job.kind == "train" and job.step < job.total_steps:
        head = f"Stopped at step {job.step}/{job.total_steps} and saved"
    elif job.status == "done":
        head = f"Done: {job.total_steps} {'steps' if job.kind == 'train' else 'pictures'}"
    elif job.status == "cancelled":
        head = f"Cancelled at step {job.step}: nothing was written"
    else:
        head = "Failed"
    out = f"<p class='charlora-state' data-status='{html.escape(job.status)}'><b>{html.escape(head)}</b></p>"
    if bar and job.status == "running":
        percent = 100.0 * min(job.step, total) / total
        out += (f"<div class='charlora-bar'><div class='charlora-bar-fill' style='width:{percent:.1f}%'></div>"
                f"</div>")
    if job.error:
        out += message(job.error)
    if job.lora_path:
        out += f"<p>Saved <code>{html.escape(job.lora_path)}</code></p>"
    if job.kind == "train" and job.status not in ("queued", "running") and job.peak_memory_mb is not None:
        out += (f"<p class='charlora-memory'>Peak memory of the training beyond the loaded model: "
                f"{memory_text(job.peak_memory_mb)}</p>")
    out += "".join(message(w, "warning") for w in job.warnings)
    return out


def _duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
