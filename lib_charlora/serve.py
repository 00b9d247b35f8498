"""``python -m lib_charlora ui``: the same tab (``ui.py``) served by gradio on its own, over the standalone
host, for users without a WebUI (ComfyUI users, headless boxes). The HTTP API (``/charlora/v1``) is served
beside it, as in the WebUIs."""
import os
import signal
import sys
import threading

DEMO_DEFAULTS = {"resolution": 128, "steps": 100, "batch_size": 2}   # what the tiny demo model trains in minutes


def assets():
    """(css, js) for a page of its own: the style sheet and the tab's script, which the WebUIs load from the
    extension's folder themselves. The script runs as the page's load function."""
    from . import ui
    with open(ui.CSS_FILE, encoding="utf-8") as f:
        css = f.read()
    with open(ui.JS_FILE, encoding="utf-8") as f:
        js = "() => {\n" + f.read() + "\n}"
    return css, js


def on_load_js(blocks, js):
    """Run ``js`` when the page loads (gradio 3 calls the argument ``_js``, gradio 4 ``js``)."""
    from . import ui
    blocks.load(None, None, None, **{"js" if ui.GRADIO4 else "_js": js})


def queue(page, workers=16):
    """Events run side by side (a training is followed by a long-running event; Stop must not wait behind it),
    as the WebUIs set their queues up."""
    from . import ui
    return page.queue(**({"default_concurrency_limit": workers} if ui.GRADIO4 else {"concurrency_count": workers}))


def build_page(service, model_info, title="Character LoRA"):
    import gradio as gr
    from . import ui
    css, js = assets()
    with gr.Blocks(title=title, css=css, analytics_enabled=False) as page:
        ui.create_tab(service, model_info, standalone=True)
        on_load_js(page, js)
    return page


def demo_service(out):
    """The embedded tiny random-weight SD1.5-layout model (no files, no downloads) and a service over it."""
    from .service import TrainService
    from .tiny import tiny_host
    host = tiny_host("diffusers", "sd1", model_name="tiny-random-sd15")
    note = "not computed for the demo model (random weights)"
    service = TrainService(lambda: host, out, defaults=DEMO_DEFAULTS, embedder_factory=lambda: (None, note),
                           settings=lambda: {"test_after_training": False})
    info = ("Training on the embedded demo model: **tiny random-weight SD1.5 layout** — it runs the whole "
            f"trainer in minutes on a CPU but learns nothing worth looking at (defaults: {DEMO_DEFAULTS['steps']} "
            f"steps at {DEMO_DEFAULTS['resolution']} px). Start with `--checkpoint FILE` to train for real.")
    return service, info


def run(args):
    from . import api, console
    from .engine.errors import ConfigError
    from .service import TrainService
    if bool(args.demo) == bool(args.checkpoint):
        raise ConfigError("checkpoint", "give a checkpoint file with --checkpoint, or --demo for the embedded model")
    if args.auth and ":" not in args.auth:
        raise ConfigError("auth", "must be user:password (several: user1:pass1,user2:pass2)")
    console.writable(args.out)
    if args.demo:
        service, info = demo_service(args.out)
    else:
        host = console.load_host(args)
        service = TrainService(lambda: host, args.out, settings=lambda: {"clip_model": args.clip_model})
        kind = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}[host.arch] + (" v-prediction" if host.prediction == "v" else "")
        info = f"Training on **{os.path.basename(args.checkpoint.rstrip('/'))}** — {kind}, {host.device}"
    page = build_page(service, lambda: info)
    queue(page)
    auth = [tuple(pair.split(":", 1)) for pair in args.auth.split(",")] if args.auth else None
    host_name = "0.0.0.0" if args.listen else "127.0.0.1"
    app, _, _ = page.launch(server_name=host_name, server_port=args.port, auth=auth, prevent_thread_lock=True,
                inbrowser=False, show_api=False, allowed_paths=[os.path.abspath(args.out)])
    api.register(app, service, args.auth)  # the served app (gradio 3's page.app is another one)
    print(f"Character LoRA on http://{'localhost' if not args.listen else host_name}:{page.server_port} "
          f"(LoRAs are written to {os.path.abspath(args.out)}); Ctrl-C stops it.", file=sys.stderr, flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    running = [j for j in service.runner.list() if j.status in ("queued", "running")]
    if running:
        print("Stopping: saving the training in progress …", file=sys.stderr, flush=True)
    for job in running:  # a training in progress keeps what it has trained
        service.runner.stop(job.id, save=True)
    service.runner.idle(timeout=600)
    closer = threading.Thread(target=page.close, daemon=True)  # gradio waits for open pages to go: not forever
    closer.start()
    closer.join(10)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(0)
