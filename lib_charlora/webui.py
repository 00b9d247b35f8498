"""Glue to a running WebUI: one TrainService over the loaded model, the API and the tab.

Imported only inside the WebUI (``scripts/charlora.py``); everything WebUI-specific is read here. The
host adapter is picked once, by what the running WebUI is: Forge's 2024 backend (``hosts/forge.py``),
reForge (``hosts/reforge.py``) or A1111 (``hosts/a1111.py``); nothing else asks which WebUI it runs in.
"""
import os

_service = None


def adapter():
    """The adapter module for the running WebUI."""
    import importlib.util
    from modules import sd_models
    if hasattr(sd_models, "forge_model_reload"):  # Forge: the model is a ForgeDiffusionEngine, loaded lazily
        from .hosts import forge
        return forge
    if importlib.util.find_spec("ldm_patched") is not None:  # reForge: A1111's model over a ComfyUI-style backend
        from .hosts import reforge
        return reforge
    from .hosts import a1111
    return a1111


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
        from .service import TrainService
        hosts = adapter()
        lock = call_queue.queue_lock
        from modules import paths
        _service = TrainService(lambda: hosts.request_host(lock), lora_dir(), lock=lock, state=shared.state,
                                settings=settings, tasks=progress, job_host_factory=hosts.job_host,
                                total_progress=getattr(shared, "total_tqdm", None),
                                outputs_dir=os.path.join(paths.data_path, "outputs", "charlora"))
    return _service


def model_info():
    return adapter().model_info()


def non_local():
    """Whether the WebUI is reachable from the network (A1111's own test for extension installs)."""
    from modules import shared
    o = shared.cmd_opts
    flag = getattr(o, "webui_is_non_local", None)
    if flag is None:  # older WebUIs compute only disable_extension_access
        flag = any(getattr(o, k, None) for k in ("share", "listen", "ngrok", "server_name"))
    return bool(flag)


def folder_refusal(channel):
    """None, or why a server folder may not be read through ``channel`` ("api" or "tab")."""
    from modules import shared
    from .limits import folder_refusal as refusal
    auth = getattr(shared.cmd_opts, "api_auth" if channel == "api" else "gradio_auth", None)
    return refusal(non_local(), bool(auth), bool(getattr(shared.opts, "charlora_allow_server_folders", False)),
                   channel)


def on_app_started(_demo, app):
    from modules import shared
    from . import api
    api.register(app, service(), getattr(shared.cmd_opts, "api_auth", None), lambda: folder_refusal("api"))


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
    tab = ui.create_tab(service(), model_info, captioners(), folder_refusal=lambda: folder_refusal("tab"))
    return [(tab, "Character LoRA", "charlora")]


SECTION = ("charlora", "Character LoRA")


def settings():
    from modules import shared
    from .limits import LIMITS
    o = shared.opts
    return {"default_preset": {"Fast": "fast", "Quality": "quality"}.get(getattr(o, "charlora_default_preset", ""),
                                                                         "balanced"),
            "subfolder": getattr(o, "charlora_subfolder", ""),
            "keep_checkpoints": bool(getattr(o, "charlora_keep_checkpoints", False)),
            "clip_model": (getattr(o, "charlora_clip_model", "") or "").strip(),
            "test_after_training": bool(getattr(o, "charlora_test_after_training", True)),
            **{limit.key: getattr(o, "charlora_" + limit.key, limit.default) for limit in LIMITS}}


def on_ui_settings():
    import gradio as gr
    from modules import shared
    from .limits import LIMITS
    add = shared.opts.add_option
    add("charlora_default_preset", shared.OptionInfo("Balanced", "Default preset", gr.Radio,
                                                     {"choices": ["Fast", "Balanced", "Quality"]}, section=SECTION))
    add("charlora_subfolder", shared.OptionInfo("", "Save trained LoRAs in this sub-folder of the Lora folder "
                                                    "(empty: the Lora folder itself)", section=SECTION))
    add("charlora_keep_checkpoints", shared.OptionInfo(False, "Keep intermediate checkpoints after a finished "
                                                              "training (they show as extra Lora cards)",
                                                       section=SECTION))
    add("charlora_test_after_training", shared.OptionInfo(True, "Test a LoRA after training in the tab (grid and "
                                                                "scores of its checkpoints)", section=SECTION))
    add("charlora_clip_model", shared.OptionInfo("openai/clip-vit-large-patch14", "CLIP model for the identity and "
                                                 "prompt-fidelity scores (downloaded once on first use)",
                                                 section=SECTION))
    add("charlora_allow_server_folders", shared.OptionInfo(
        False, "Allow training from server folders on a networked WebUI without credentials (--listen, --share or "
               "--server-name without --api-auth / --gradio-auth: anyone who reaches it can read the server's "
               "pictures)", section=SECTION))
    for limit in LIMITS:
        add("charlora_" + limit.key, shared.OptionInfo(limit.default, limit.label, gr.Number,
                                                        {"minimum": limit.low, "maximum": limit.high, "precision": 0},
                                                        section=SECTION))
