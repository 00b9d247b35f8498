"""Command line: ``python -m lib_charlora demo | train | evaluate | cast | ui``.

``train`` and ``evaluate`` load a checkpoint file (or a diffusers folder) and go through the same
service as the WebUI's HTTP API: the same option names, validation, presets and per-arch defaults.
Exit codes: 0 done (also when stopped with Ctrl-C and saved), 2 bad input (the message names the
flag), 1 failure.
"""
import argparse
import os
import sys

from . import console
from .engine.errors import CharLoraError, ConfigError
from .engine.memory import memory_text

# API field -> (flag type, help)
TRAIN_OPTIONS = {
    "steps": (int, "training steps (default: the preset's)"),
    "rank": (int, "LoRA rank"),
    "alpha": (float, "LoRA alpha"),
    "learning_rate": (float, "UNet learning rate"),
    "text_encoder_lr": (float, "text encoder learning rate"),
    "resolution": (int, "training resolution (default: 512 SD1/SD2, 768 SD2-v, 1024 SDXL)"),
    "batch_size": (int, "batch size"),
    "seed": (int, "random seed"),
    "save_every": (int, "a checkpoint (LoRA + resumable state) every N steps"),
    "sample_every": (int, "a preview picture every N steps (saved in <out>/<name>_samples/)"),
    "checkpoint_count": (int, "N evenly spaced checkpoints to compare afterwards (0-20)"),
}
TRAIN_FLAGS = ("train_text_encoder", "overwrite", "keep_checkpoints")


def _add_model_args(p, required=True, json=True):
    p.add_argument("--checkpoint", required=required,
                   help="a single-file SD1.x / SD2.x / SDXL checkpoint (.safetensors) or a diffusers folder")
    p.add_argument("--config", help="the checkpoint's original .yaml (default: <checkpoint>.yaml when present)")
    p.add_argument("--prediction", choices=("eps", "v"), help="override the detected prediction type")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"),
                   help="weights of the loaded model (default: fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--allow-pickle", action="store_true", help="load a pickled .ckpt (can run code: trusted files only)")
    if json:
        p.add_argument("--json", action="store_true", help="JSON lines on stdout instead of a progress bar")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m lib_charlora", description="Character LoRA trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train on a tiny embedded model and generated pictures (no downloads)")
    demo.add_argument("--out", default="charlora_demo", help="output folder (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default: %(default)s)")
    demo.add_argument("--images", type=int, default=12, help="generated pictures (default: %(default)s)")

    train = sub.add_parser("train", help="train a character LoRA on a checkpoint file")
    _add_model_args(train)
    train.add_argument("--images", required=True,
                       help="folder of pictures (N_name sub-folders = N repeats, .txt files = captions)")
    train.add_argument("--name", required=True, help="the LoRA's name (file name)")
    train.add_argument("--trigger", help="trigger word (default: the name)")
    train.add_argument("--preset", choices=("fast", "balanced", "quality"), default="balanced")
    for field, (kind, text) in TRAIN_OPTIONS.items():
        train.add_argument(console.flag(field), type=kind, help=text)
    for field in TRAIN_FLAGS:
        train.add_argument(console.flag(field), action=argparse.BooleanOptionalAction, default=None)
    train.add_argument("--out", default="loras", help="folder for the LoRA (default: %(default)s)")
    train.add_argument("--resume", metavar="STATE", help="continue from a checkpoint's .state file")

    ev = sub.add_parser("evaluate", help="grids and scores for a LoRA and its checkpoints")
    _add_model_args(ev)
    ev.add_argument("--lora", required=True, help="the LoRA's name in --loras")
    ev.add_argument("--loras", default="loras", help="folder holding the LoRA (default: %(default)s)")
    ev.add_argument("--out", help="folder for grids and reports (default: charlora-tests beside --loras)")
    ev.add_argument("--checkpoints", default="all", help='"all", "final" or comma-separated checkpoint file names')
    ev.add_argument("--prompts", nargs="+", help="prompts ({trigger} = the trigger word)")
    ev.add_argument("--seeds", nargs="+", type=int)
    ev.add_argument("--strengths", nargs="+", type=float)
    for field in ("steps", "width", "height"):
        ev.add_argument(console.flag(field), type=int)
    ev.add_argument("--sampler", help="Euler a (default), Euler, DPM++ 2M or DDIM")
    ev.add_argument("--trigger", help="default: the LoRA's own trigger phrase")
    ev.add_argument("--images", help="training pictures for the identity score (default: those kept at training)")
    ev.add_argument("--clip-model", default="openai/clip-vit-large-patch14",
                    help="CLIP model for the scores (Hugging Face name or folder; default: %(default)s)")

    cast = sub.add_parser("cast", help="train (and test) every character of a cast file, one after another")
    cast.add_argument("cast", help="the cast file (TOML)")
    _add_model_args(cast, required=False)

    serve = sub.add_parser("ui", help="the Character LoRA tab in a browser, without a WebUI")
    _add_model_args(serve, required=False, json=False)
    serve.add_argument("--demo", action="store_true", help="train on the embedded tiny model (no checkpoint needed)")
    serve.add_argument("--out", default="loras", help="folder for the LoRAs (default: %(default)s)")
    serve.add_argument("--listen", action="store_true", help="serve on every network interface, not only this machine")
    serve.add_argument("--port", type=int, default=7870, help="port (default: %(default)s)")
    serve.add_argument("--auth", help="user:password (several: user1:pass1,user2:pass2) for the page and the API")
    serve.add_argument("--clip-model", default="openai/clip-vit-large-patch14",
                       help="CLIP model for the test scores (default: %(default)s)")
    return parser


def main(argv=None):
    from .distributed import AccelerateParallel, launched
    args = build_parser().parse_args(argv)
    args.parallel = AccelerateParallel() if args.command in ("train", "cast", "evaluate") and launched() else None
    quiet = args.parallel is not None and not args.parallel.is_main  # one process prints
    try:
        if args.command == "demo":
            from .demo import run_demo
            run_demo(args.out, steps=args.steps, images=args.images)
            return 0
        if args.command == "evaluate" and args.parallel is not None:
            raise CharLoraError("evaluate runs in one process: start it without accelerate launch")
        if args.command == "cast":
            from .cast import run
            return run(args)
        if args.command == "ui":
            from .serve import run
            args.json = False
            return run(args)
        return {"train": train, "evaluate": evaluate}[args.command](args)
    except CharLoraError as e:
        if not quiet:
            print(f"error: {console.bad_input(e)}", file=sys.stderr)
        return 2


# -- train ----------------------------------------------------------------------------------------------
def train(args):
    from .engine.dataset import DatasetError
    from .service import TrainService
    reporter = console.reporter_for(args)
    if not os.path.isdir(args.images):
        raise ConfigError("image_dir", f"no such folder: {args.images}")
    if args.resume and not os.path.isfile(args.resume):
        raise ConfigError("resume", f"no such file: {args.resume}")
    console.writable(args.out)
    host = console.load_host(args)
    body = {"name": args.name, "image_dir": args.images, "preset": args.preset}
    if args.trigger is not None:
        body["trigger"] = args.trigger
    for field in (*TRAIN_OPTIONS, *TRAIN_FLAGS):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    samples = os.path.join(args.out, f"{args.name}_samples")

    def save_preview(job, step, image):
        os.makedirs(samples, exist_ok=True)
        image.save(os.path.join(samples, f"{args.name}-step{step:06d}.png"))
        reporter.line(f"preview at step {step}: {samples}", step=step)

    service = TrainService(lambda: host, args.out, on_preview=save_preview, settings=lambda: {"keep_checkpoints": True},
                           **console.parallel_options(args, args.out))
    try:
        spec = service.parse(body)
    except DatasetError as e:
        raise ConfigError("image_dir", str(e)) from e
    console.check_batch(args, spec.config)
    spec.resume_from = args.resume
    if args.resume and not spec.config.overwrite and os.path.exists(os.path.join(args.out, args.name + ".safetensors")):
        raise ConfigError("resume", f"{args.name}.safetensors exists already")
    for w in spec.report["warnings"]:
        reporter.line(f"warning: {w}")
    cfg = spec.config
    reporter.line(f"Training '{cfg.name}' (trigger '{cfg.trigger}') on {len(spec.images)} pictures: {cfg.steps} steps, "
                  f"rank {cfg.rank}, resolution {cfg.resolution}, text encoder {'on' if cfg.train_text_encoder else 'off'}")
    job = service.runner.submit(cfg.name, spec, output_dir=service.lora_dir)
    job.total_steps = cfg.steps
    console.run_job(service, job, reporter, "step")
    for w in job.warnings:
        reporter.line(f"warning: {w}")
    if job.status == "failed" and (job.error or "").startswith("resume_from: "):  # checked when the run starts
        print(f"error: --resume: {job.error.split(': ', 1)[1]}", file=sys.stderr)
        reporter.emit(event="end", status="failed", error=job.error)
        return 2
    if job.status == "failed":
        reporter.line(f"error: {job.error}")
        reporter.emit(event="end", status="failed", error=job.error)
        return 1
    if job.status == "done" and console.quiet(args):
        return 0
    if job.lora_path:
        stem = os.path.splitext(job.lora_path)[0]
        memory = "" if job.peak_memory_mb is None else f" Peak memory beyond the model: {memory_text(job.peak_memory_mb)}."
        reporter.line(f"Saved {job.lora_path} (+ {os.path.basename(stem)}.preview.png, .json) at step {job.step}."
                      f"{memory}\nUse it as:  <lora:{cfg.name}:1> {cfg.trigger}")
        reporter.emit(event="end", status="done", path=job.lora_path, step=job.step,
                      peak_memory_mb=job.to_dict()["peak_memory_mb"])
        return 0
    reporter.line("Stopped: nothing saved.")
    reporter.emit(event="end", status="cancelled")
    return 1


# -- evaluate -------------------------------------------------------------------------------------------
def evaluate(args):
    from .service import TrainService
    reporter = console.reporter_for(args)
    body = {"lora": args.lora}
    if args.checkpoints not in ("all", "final"):
        body["checkpoints"] = [c.strip() for c in args.checkpoints.split(",") if c.strip()]
    else:
        body["checkpoints"] = args.checkpoints
    for field in ("prompts", "seeds", "strengths", "steps", "width", "height", "sampler", "trigger"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    if args.images is not None:
        body["image_dir"] = args.images
    if not os.path.isfile(os.path.join(args.loras, args.lora + ".safetensors")) and \
            not os.path.isdir(os.path.join(args.loras, args.lora + "_checkpoints")):
        raise ConfigError("lora", f"no LoRA '{args.lora}' in {args.loras}")
    host = console.load_host(args)
    service = TrainService(lambda: host, args.loras, outputs_dir=args.out,
                           settings=lambda: {"clip_model": args.clip_model})
    job = service.submit_evaluation(body)
    reporter.line(f"Testing '{args.lora}': {job.total_steps} pictures")
    console.run_job(service, job, reporter, "picture")
    for w in job.warnings:
        reporter.line(f"warning: {w}")
    if job.status != "done":
        reporter.line(f"error: {job.error or job.status}")
        reporter.emit(event="end", status=job.status, error=job.error)
        return 1
    result = job.result or {}
    reporter.emit(event="end", status="done", result=result)
    if not args.json:
        for path in result.get("grid_paths", []):
            reporter.line(f"grid: {path}")
        rows = result.get("scores") or []
        if rows:
            reporter.line(f"{'checkpoint':40} {'step':>6} {'strength':>8} {'identity':>9} {'lift':>7} {'fidelity':>9} {'delta':>7}")
            for r in rows:
                reporter.line(f"{r['checkpoint']:40} {r['step'] if r['step'] is not None else '':>6} {r['strength']:>8g} "
                              f"{_num(r['identity']):>9} {_num(r['identity_lift']):>7} {_num(r['prompt_fidelity']):>9} "
                              f"{_num(r['prompt_fidelity_delta']):>7}")
        best = result.get("best")
        if best:
            reporter.line(f"best: {best['checkpoint']} at strength {best['strength']:g} ({best.get('reason', '')})")
        reporter.line(f"report: {result.get('report_path')}")
    return 0


def _num(value):
    return "-" if value is None else f"{value:.3f}"
