"""Glue to a running A1111 / reForge: one TrainService over the loaded model, the API and the tab.

Imported only inside the WebUI (``scripts/charlora.py``); everything WebUI-specific is read here.
"""
import os

_service = None


def lora_dir():
    from modules import shared
    path = getattr(shared.cmd_opts, "lora_dir", None)
    if not path:
        from modules import paths
        path = os.path.join(paths.models_path, "Lora")
    return path


def service():
    """The one service (and job queue) shared by the tab and the API."""
    global _service
    if _service is None:
        from modules import call_queue, progress, shared
        from .hosts.a1111 import A1111Host
        from .service import TrainService
        _service = TrainService(A1111Host.from_webui, lora_dir(), lock=call_queue.queue_lock, state=shared.state,
                                settings=settings, tasks=progress)
    return _service


def model_info():
    from modules import shared
    m = shared.sd_model
    if m is None:
        return "**No checkpoint loaded.**"
    info = getattr(m, "sd_checkpoint_info", None)
    arch = "SDXL" if getattr(m, "is_sdxl", False) else "SD2" if getattr(m, "is_sd2", False) else "SD1"
    pred = " (v-prediction)" if getattr(m, "parameterization", "eps") == "v" else ""
    return f"Training on the loaded checkpoint: **{getattr(info, 'name', '?')}** — {arch}{pred}"


def on_app_started(_demo, app):
    from modules import shared
    from . import api
    api.register(app, service(), getattr(shared.cmd_opts, "api_auth", None))


def captioners():
    """The WebUI's own interrogators, run under its queue lock (they use the GPU)."""
    from modules import call_queue, shared

    def blip(image):
        it = shared.interrogator
        import torch
        with call_queue.queue_lock, torch.no_grad():
            it.load()
            try:
                return it.generate_caption(image.convert("RGB"))
            finally:
                getattr(it, "unload", lambda: None)()  # honours "keep models in memory"

    def deepbooru_tags(image):
        from modules import deepbooru
        with call_queue.queue_lock:
            deepbooru.model.start()
            try:  # no "(tag:0.93)" ranks: in a caption they would act as emphasis
                return deepbooru.model.tag_multi(image.convert("RGB"), force_disable_ranks=True)
            finally:
                deepbooru.model.stop()

    found = {}
    if getattr(shared, "interrogator", None) is not None:
        found["BLIP"] = blip
    try:
        from modules import deepbooru  # noqa: F401
        found["DeepBooru"] = deepbooru_tags
    except ImportError:
        pass
    return found


def on_ui_tabs():
    from . import ui
    tab = ui.create_tab(service(), model_info, captioners())
    return [(tab, "Character LoRA", "charlora")]


SECTION = ("charlora", "Character LoRA")


def settings():
    from modules import shared
    o = shared.opts
    return {"default_preset": {"Fast": "fast", "Quality": "quality"}.get(getattr(o, "charlora_default_preset", ""),
                                                                         "balanced"),
            "subfolder": getattr(o, "charlora_subfolder", ""),
            "keep_checkpoints": bool(getattr(o, "charlora_keep_checkpoints", False))}


def on_ui_settings():
    import gradio as gr
    from modules import shared
    add = shared.opts.add_option
    add("charlora_default_preset", shared.OptionInfo("Balanced", "Default preset", gr.Radio,
                                                     {"choices": ["Fast", "Balanced", "Quality"]}, section=SECTION))
    add("charlora_subfolder", shared.OptionInfo("", "Save trained LoRAs in this sub-folder of the Lora folder "
                                                    "(empty: the Lora folder itself)", section=SECTION))
    add("charlora_keep_checkpoints", shared.OptionInfo(False, "Keep intermediate checkpoints after a finished "
                                                              "training (they show as extra Lora cards)",
                                                       section=SECTION))
