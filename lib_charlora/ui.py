"""The "Character LoRA" tab (gradio 3.41.2 in A1111 / reForge, 4.40.0 in Forge).

The tab is a thin layer over ``TrainService``: it reads uploads or a server folder, shows the
intake report with thumbnails and an editable caption table, submits a job (validated before it
is queued, like the API) and follows it with a generator, so the tab shows step, loss and ETA.
"""
import html
import os
import time

import gradio as gr
import pandas as pd
from PIL import Image

from .engine.dataset import DatasetError, load_folder, load_uploads
from .engine.errors import CharLoraError, ConfigError

GRADIO4 = int(gr.__version__.split(".")[0]) >= 4
PRESET_LABELS = {"Fast": "fast", "Balanced": "balanced", "Quality": "quality"}
ADVANCED = [  # (request field, label, default, kind)
    ("steps", "Steps", 1500, "int"), ("rank", "Rank", 16, "int"), ("alpha", "Alpha", 8, "float"),
    ("learning_rate", "UNet learning rate", 1e-4, "float"), ("text_encoder_lr", "Text encoder learning rate", 5e-5, "float"),
    ("resolution", "Resolution", 512, "int"), ("batch_size", "Batch size", 1, "int"), ("seed", "Seed", 0, "int"),
    ("sample_every", "Preview picture every N steps (0 = off)", 0, "int"),
    ("save_every", "Save a checkpoint every N steps (0 = off)", 0, "int"),
]


def _click(button, fn, inputs, outputs, js=None):
    kwargs = {}
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


def _report_html(report):
    rows = []
    for f in report.files:
        state = "ok" if f.accepted else "rejected"
        detail = "; ".join(([f.reason] if f.reason else []) + list(f.warnings))
        rows.append(f"<tr><td>{html.escape(f.name)}</td><td>{state}</td><td>{html.escape(detail)}</td></tr>")
    head = f"<p><b>{len(report.accepted)}</b> pictures accepted, <b>{len(report.rejected)}</b> rejected</p>"
    notes = "".join(f"<p class='charlora-error'>{html.escape(e)}</p>" for e in report.errors) + \
        "".join(f"<p class='charlora-warning'>{html.escape(w)}</p>" for w in report.warnings)
    return head + notes + "<table><tr><th>file</th><th></th><th>notes</th></tr>" + "".join(rows) + "</table>"


def read_pictures(files, folder, resolution):
    """-> (images, report) from the upload list or the folder path."""
    uploads = _file_list(files)
    folder = (folder or "").strip()
    if uploads and folder:
        raise ConfigError("images", "choose either uploaded pictures or a server folder, not both")
    if folder:
        return load_folder(folder, int(resolution))
    if not uploads:
        raise ConfigError("images", "add pictures (or give a folder on the server)")
    return load_uploads([(n, b, None) for n, b in uploads], int(resolution))


def create_tab(service, model_info=lambda: "no checkpoint information", captioners=None):
    """Build the tab's Blocks. ``service``: a ``TrainService``; ``model_info()``: the loaded checkpoint as
    text; ``captioners``: {"BLIP": fn(image) -> str, ...} (the WebUI's interrogators; none = no button)."""
    captioners = dict(captioners or {})
    with gr.Blocks(analytics_enabled=False) as tab:
        job_state = gr.State(None)
        task_box = gr.Textbox(visible=False, elem_id="charlora_task")  # filled by JS with the progress task id
        with gr.Row():
            model_md = gr.Markdown(model_info())
            refresh = gr.Button("Refresh model info", elem_id="charlora_refresh_model")
        with gr.Row():
            name = gr.Textbox(label="Character name (file name)", placeholder="pip_v1", elem_id="charlora_name")
            trigger = gr.Textbox(label="Trigger word", placeholder="pipchr", elem_id="charlora_trigger")
        with gr.Row():
            files = gr.File(label="Pictures (20-50 work best)", file_count="multiple", elem_id="charlora_files")
            folder = gr.Textbox(label="…or a folder on the server", placeholder="/path/to/pictures",
                                elem_id="charlora_folder")
        check = gr.Button("Check pictures", elem_id="charlora_check")
        report_html = gr.HTML(elem_id="charlora_report")
        gallery = gr.Gallery(label="Accepted pictures", columns=6, height=240, elem_id="charlora_gallery")
        captions = gr.Dataframe(headers=["file", "caption"], datatype=["str", "str"], interactive=True,
                                label="Captions (edit in place; empty = template)", elem_id="charlora_captions")
        with gr.Row(visible=bool(captioners)):
            captioner = gr.Dropdown(list(captioners) or ["-"], value=(list(captioners) or ["-"])[0],
                                    label="Interrogator", elem_id="charlora_captioner")
            autocaption = gr.Button("Auto-caption empty captions", elem_id="charlora_autocaption")
        preset = gr.Radio(list(PRESET_LABELS), value="Balanced", label="Preset", elem_id="charlora_preset")
        with gr.Accordion("Advanced", open=False):
            use_advanced = gr.Checkbox(label="Use these values instead of the preset's", value=False)
            adv = []
            with gr.Row():
                for field, label, default, kind in ADVANCED:
                    adv.append(gr.Number(label=label, value=default, precision=0 if kind == "int" else None))
            train_te = gr.Checkbox(label="Train the text encoder", value=True)
        with gr.Row():
            train = gr.Button("Train", variant="primary", elem_id="charlora_train")
            stop_save = gr.Button("Stop and save", elem_id="charlora_stop")
            cancel = gr.Button("Cancel", elem_id="charlora_cancel")
        status = gr.HTML(elem_id="charlora_status")
        loss_plot = gr.LinePlot(x="step", y="loss", title="Loss", height=220, elem_id="charlora_loss",
                                **({} if GRADIO4 else {"width": 480}))  # gradio 4 has no width
        with gr.Row():
            preview = gr.Image(label="Preview", interactive=False, elem_id="charlora_preview")
            result = gr.Textbox(label="LoRA", interactive=False, elem_id="charlora_result")
        send = gr.Button("Use in txt2img", elem_id="charlora_send")
        test = _TestSection(service)

        def on_check(files_, folder_, resolution):
            try:
                images, report = read_pictures(files_, folder_, resolution)
            except (CharLoraError, DatasetError) as e:
                return f"<p class='charlora-error'>{html.escape(str(e))}</p>", [], [["", ""]]
            thumbs = [(im.image.copy(), im.name) for im in images]
            for t, _ in thumbs:
                t.thumbnail((256, 256))
            table = [[im.name, im.caption or ""] for im in images] or [["", ""]]
            return _report_html(report), thumbs, table

        def on_train(task_id, files_, folder_, table, name_, trigger_, preset_, auto_test, use_adv, te, *adv_values):
            body = {"name": (name_ or "").strip(), "preset": PRESET_LABELS.get(preset_, "balanced")}
            if (trigger_ or "").strip():
                body["trigger"] = trigger_.strip()
            if auto_test:  # keep a few checkpoints to compare in the test after training
                body.update(keep_checkpoints=True, checkpoint_count=TEST_CHECKPOINTS)
            try:
                if use_adv:
                    for (field, label, _, kind), value in zip(ADVANCED, adv_values):
                        if value is None:
                            raise ConfigError(field, f"'{label}' is empty")
                        body[field] = int(value) if kind == "int" else float(value)
                    body["train_text_encoder"] = bool(te)
                if (folder_ or "").strip():
                    body["image_dir"] = folder_.strip()
                    job = service.submit(body, task_id=task_id or None)
                else:
                    given = {}
                    for row in _rows(table):
                        if row and row[0]:
                            given[str(row[0])] = (str(row[1]).strip() or None) if len(row) > 1 else None
                    uploads = [(n, b, given.get(n)) for n, b in _file_list(files_)]
                    job = service.submit(body, files=uploads, task_id=task_id or None)
            except (CharLoraError, DatasetError) as e:
                yield None, f"<p class='charlora-error'>{html.escape(str(e))}</p>", None, "", _loss_frame(None)
                return
            while job.status in ("queued", "running"):
                yield job.id, _status_html(job), getattr(job, "preview", None), "", _loss_frame(job)
                time.sleep(0.5)
            picture = None
            if job.lora_path:
                stem = job.lora_path[:-len(".safetensors")]
                picture = stem + ".preview.png" if os.path.exists(stem + ".preview.png") else None
            text = f"<lora:{job.lora_name}:1> {job.spec.config.trigger}" if job.lora_path else ""
            yield job.id, _status_html(job), picture, text, _loss_frame(job)

        def on_autocaption(files_, folder_, table, which, resolution):
            fn = captioners.get(which)
            if fn is None:
                return table, "<p class='charlora-error'>No interrogator is available.</p>"
            try:
                images, _ = read_pictures(files_, folder_, resolution)
            except (CharLoraError, DatasetError) as e:
                return table, f"<p class='charlora-error'>{html.escape(str(e))}</p>"
            given = {str(r[0]): (str(r[1]) if len(r) > 1 and r[1] is not None else "") for r in _rows(table) if r and r[0]}
            rows, filled = [], 0
            for im in images:
                text = given.get(im.name, im.caption or "").strip()
                if not text:
                    text = (fn(im.image) or "").strip()
                    filled += 1
                rows.append([im.name, text])
            return rows or [["", ""]], f"<p>{filled} captions written by {html.escape(which)}; edit them as needed.</p>"

        def on_stop(job_id, save):
            job = service.runner.stop(job_id, save=save) if job_id else None
            return _status_html(job) if job else "<p>No training is running.</p>"

        _click(refresh, lambda: model_info(), [], [model_md])
        _click(check, on_check, [files, folder, adv[5]], [report_html, gallery, captions])
        trained = _click(train, on_train, [task_box, files, folder, captions, name, trigger, preset, test.auto,
                                           use_advanced, train_te, *adv],
                         [job_state, status, preview, result, loss_plot], js="charloraStartTraining")
        trained.then(fn=test.after_training, inputs=[job_state, test.auto, *test.settings], outputs=test.outputs)
        _click(autocaption, on_autocaption, [files, folder, captions, captioner, adv[5]], [captions, status])
        _click(stop_save, lambda j: on_stop(j, True), [job_state], [status])
        _click(cancel, lambda j: on_stop(j, False), [job_state], [status])
        _click(send, None, [result], [], js="charloraSendToTxt2img")
        tab.charlora = {"train": on_train, "check": on_check, "stop": on_stop, "autocaption": on_autocaption,
                        "test": test.run, "after_training": test.after_training, "use": test.use}
    return tab


TEST_CHECKPOINTS = 3  # intermediate checkpoints a training keeps for the test after it
SCORE_HEADERS = ["checkpoint", "step", "strength", "identity", "identity lift", "prompt fidelity", "fidelity change"]


class _TestSection:
    """The "Test" section: grids and scores of a LoRA's checkpoints (an evaluation job), the pick, and
    "Use this checkpoint" / "Send to txt2img"."""

    def __init__(self, service):
        from .engine.evaluate import DEFAULT_PROMPTS
        self.service = service
        settings = service.settings() if callable(getattr(service, "settings", None)) else {}
        with gr.Accordion("Test", open=True):
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
            best = gr.Textbox(label="Recommended", interactive=False, elem_id="charlora_test_best")
            with gr.Row():
                use = gr.Button("Use this checkpoint", elem_id="charlora_test_use")
                send = gr.Button("Send to txt2img", elem_id="charlora_test_send")
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
            yield lora, f"<p class='charlora-error'>{html.escape(str(e))}</p>", [], None, "", None
            return
        while job.status in ("queued", "running"):
            yield lora, _status_html(job), [], None, "", None
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
        yield (lora, _status_html(job) + (f"<p>{html.escape(best.get('reason', ''))}</p>" if best else ""),
               grids, rows or None, text.strip(), {"lora": lora, "best": best, "trigger": trigger})

    def use(self, state):
        best = (state or {}).get("best")
        if not best:
            return "<p class='charlora-error'>Test a LoRA first.</p>", ""
        if best["checkpoint"] == state["lora"] + ".safetensors":
            return ("<p>The recommended checkpoint is already the LoRA's file.</p>",
                    f"<lora:{state['lora']}:{best['strength']:g}> {state['trigger']}".strip())
        try:
            out = self.service.promote({"lora": state["lora"], "checkpoint": best["checkpoint"],
                                        "strength": best["strength"]})
        except CharLoraError as e:
            return f"<p class='charlora-error'>{html.escape(str(e))}</p>", ""
        return (f"<p>{html.escape(out['lora'])} is now the checkpoint of step {html.escape(str(out['ss_steps']))} "
                f"(the former file is kept as {html.escape(out['lora'])}_checkpoints/{html.escape(out['lora'])}"
                f"-final.safetensors).</p>", f"<lora:{out['lora']}:{best['strength']:g}> {state['trigger']}".strip())


def _numbers(text, field, kind):
    try:
        return [kind(x) for x in (text or "").replace(";", ",").split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(field, f"must be numbers separated by commas ({e})") from e


def _loss_frame(job):
    history = list(getattr(job, "loss_history", None) or [])
    return pd.DataFrame({"step": [s for s, _ in history], "loss": [v for _, v in history]})


def _rows(table):
    if table is None:
        return []
    if hasattr(table, "values"):  # pandas DataFrame
        return table.values.tolist()
    return table


def _status_html(job):
    parts = [f"<b>{html.escape(job.status)}</b>", f"step {job.step}/{job.total_steps}"]
    if job.loss is not None:
        parts.append(f"loss {job.loss:.4f}")
    if job.eta_seconds is not None and job.status == "running":
        parts.append(f"ETA {job.eta_seconds:.0f} s")
    out = "<p>" + " · ".join(parts) + "</p>"
    if job.error:
        out += f"<p class='charlora-error'>{html.escape(job.error)}</p>"
    if job.lora_path:
        out += f"<p>Saved {html.escape(job.lora_path)}</p>"
    out += "".join(f"<p class='charlora-warning'>{html.escape(w)}</p>" for w in job.warnings)
    return out
