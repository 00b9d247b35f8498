"""Command line: ``python -m lib_charlora demo | train | evaluate | cast``.

``train`` and ``evaluate`` load a checkpoint file (or a diffusers folder) and go through the same
service as the WebUI's HTTP API: the same option names, validation, presets and per-arch defaults.
Exit codes: 0 done (also when stopped with Ctrl-C and saved), 2 bad input (the message names the
flag), 1 failure.
"""
import argparse
import dataclasses
import json
import os
import signal
import sys
import time

from .engine.errors import CharLoraError, ConfigError

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
EVAL_LISTS = {"prompts": str, "seeds": int, "strengths": float}


def flag(field):
    return {"image_dir": "--images", "resume_from": "--resume", "sample_every": "--sample-every"}.get(
        field, "--" + field.replace("_", "-"))


def _bad_input(e):
    if isinstance(e, ConfigError):
        return f"{flag(e.field)}: {str(e).split(': ', 1)[1]}"
    return str(e)


def _add_model_args(p, required=True):
    p.add_argument("--checkpoint", required=required,
                   help="a single-file SD1.x / SD2.x / SDXL checkpoint (.safetensors) or a diffusers folder")
    p.add_argument("--config", help="the checkpoint's original .yaml (default: <checkpoint>.yaml when present)")
    p.add_argument("--prediction", choices=("eps", "v"), help="override the detected prediction type")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"),
                   help="weights of the loaded model (default: fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--allow-pickle", action="store_true", help="load a pickled .ckpt (can run code: trusted files only)")
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
        train.add_argument(flag(field), type=kind, help=text)
    for field in TRAIN_FLAGS:
        train.add_argument(flag(field), action=argparse.BooleanOptionalAction, default=None)
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
        ev.add_argument(flag(field), type=int)
    ev.add_argument("--sampler", help="Euler a (default), Euler, DPM++ 2M or DDIM")
    ev.add_argument("--trigger", help="default: the LoRA's own trigger phrase")
    ev.add_argument("--images", help="training pictures for the identity score (default: those kept at training)")
    ev.add_argument("--clip-model", default="openai/clip-vit-large-patch14",
                    help="CLIP model for the scores (Hugging Face name or folder; default: %(default)s)")

    cast = sub.add_parser("cast", help="train (and test) every character of a cast file, one after another")
    cast.add_argument("cast", help="the cast file (TOML)")
    _add_model_args(cast, required=False)
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
        return {"train": train, "evaluate": evaluate, "cast": cast_command}[args.command](args)
    except CharLoraError as e:
        if not quiet:
            print(f"error: {_bad_input(e)}", file=sys.stderr)
        return 2


# -- shared ---------------------------------------------------------------------------------------------
def _quiet(args):
    return args.parallel is not None and not args.parallel.is_main


def _reporter(args):
    return Reporter(args.json, open(os.devnull, "w") if _quiet(args) else None)


def load_host(args):
    import torch
    from .hosts.checkpoint_file import load_host as load
    default = str(args.parallel.device) if args.parallel is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    device = args.device or default
    try:
        torch.device(device)
    except RuntimeError as e:
        raise ConfigError("device", str(e)) from e
    precision = args.precision or ("fp16" if device.startswith("cuda") else "fp32")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if not args.json and not _quiet(args):
        print(f"Loading {args.checkpoint} ...", file=sys.stderr, flush=True)
    host = load(args.checkpoint, config=args.config, prediction=args.prediction, device=device, dtype=dtype,
                allow_pickle=args.allow_pickle)
    if not args.json and not _quiet(args):
        kind = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}[host.arch] + (" v-prediction" if host.prediction == "v" else "")
        where = f", {args.parallel.world} processes" if args.parallel is not None else ""
        print(f"Loaded a {kind} model on {device} ({precision}{where})", file=sys.stderr, flush=True)
    return host


class Reporter:
    """A progress bar on a terminal, plain lines otherwise, JSON lines with ``--json``."""

    def __init__(self, as_json, stream=None):
        self.as_json, self.stream = as_json, stream or (sys.stdout if as_json else sys.stderr)
        self.tty = not as_json and self.stream.isatty()
        self.last = (None, 0.0)

    def emit(self, **event):
        if self.as_json:
            print(json.dumps(event), file=self.stream, flush=True)

    def progress(self, what, step, total, loss=None, eta=None):
        if (step, loss) == self.last[0] or (not self.tty and time.time() - self.last[1] < 5 and step < total):
            return
        self.last = ((step, loss), time.time())
        if self.as_json:
            return self.emit(event="progress", kind=what, step=step, total=total, loss=loss, eta_seconds=eta)
        text = f"{what} {step}/{total}" + ("" if loss is None else f"  loss {loss:.4f}") + \
            ("" if eta is None else f"  ETA {eta:.0f} s")
        if self.tty:
            done = int(30 * step / max(total, 1))
            self.stream.write(f"\r[{'#' * done}{'.' * (30 - done)}] {text}   ")
            if step >= total:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def line(self, text, **event):
        if self.as_json:
            self.emit(event="message", text=text, **event)
        else:
            if self.tty:
                self.stream.write("\n")
            print(text, file=self.stream, flush=True)


def run_job(service, job, reporter, what):
    """Waits for ``job`` with progress; Ctrl-C stops and saves, a second Ctrl-C discards."""
    presses = []

    def on_sigint(signum, frame):
        presses.append(time.time())
        save = len(presses) == 1
        service.runner.stop(job.id, save=save)
        reporter.line("Stopping: saving what is trained (Ctrl-C again to discard) ..." if save and what == "step"
                      else "Stopping: discarding ...")

    previous = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    finishing = False
    try:
        while not service.runner.wait(job.id, timeout=0.5):
            if job.status == "running":
                reporter.progress(what, job.step, job.total_steps, job.loss, job.eta_seconds)
                if what == "step" and job.total_steps and job.step >= job.total_steps and not finishing:
                    finishing = True  # the card's preview is drawn with the full sampler: minutes on a CPU
                    reporter.line("Training done: drawing the preview picture and writing the file ...")
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    reporter.progress(what, job.step, job.total_steps, job.loss, job.eta_seconds)
    return len(presses)


def _main_thread():
    import threading
    return threading.current_thread() is threading.main_thread()


# -- train ----------------------------------------------------------------------------------------------
def train(args):
    from .engine.dataset import DatasetError
    from .service import TrainService
    reporter = _reporter(args)
    if not os.path.isdir(args.images):
        raise ConfigError("image_dir", f"no such folder: {args.images}")
    if args.resume and not os.path.isfile(args.resume):
        raise ConfigError("resume", f"no such file: {args.resume}")
    _writable(args.out)
    host = load_host(args)
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
                           **_parallel_options(args, args.out))
    try:
        spec = service.parse(body)
    except DatasetError as e:
        raise ConfigError("image_dir", str(e)) from e
    _check_batch(args, spec.config)
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
    run_job(service, job, reporter, "step")
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
    if job.status == "done" and _quiet(args):
        return 0
    if job.lora_path:
        stem = os.path.splitext(job.lora_path)[0]
        reporter.line(f"Saved {job.lora_path} (+ {os.path.basename(stem)}.preview.png, .json) at step {job.step}.\n"
                      f"Use it as:  <lora:{cfg.name}:1> {cfg.trigger}")
        reporter.emit(event="end", status="done", path=job.lora_path, step=job.step)
        return 0
    reporter.line("Stopped: nothing saved.")
    reporter.emit(event="end", status="cancelled")
    return 1


# -- evaluate -------------------------------------------------------------------------------------------
def evaluate(args):
    from .service import TrainService
    reporter = _reporter(args)
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
    host = load_host(args)
    service = TrainService(lambda: host, args.loras, outputs_dir=args.out,
                           settings=lambda: {"clip_model": args.clip_model})
    job = service.submit_evaluation(body)
    reporter.line(f"Testing '{args.lora}': {job.total_steps} pictures")
    run_job(service, job, reporter, "picture")
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


# -- cast -----------------------------------------------------------------------------------------------
def cast_command(args):
    """Exit code: 0 every character done, 1 some failed or the cast was stopped, 2 bad input."""
    from . import cast as casts
    from .service import TrainService
    try:
        cast = casts.read_cast(args.cast, args.checkpoint)
    except ConfigError as e:
        if e.field != "cast":
            raise
        raise CharLoraError(f"{args.cast}: {str(e).split(': ', 1)[1]}") from e
    reporter = _reporter(args)
    main = not _quiet(args)
    args.checkpoint = cast.checkpoint
    _writable(cast.out)
    host = load_host(args)

    def save_preview(job, step, image):
        folder = os.path.join(cast.out, f"{job.name}_samples")
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"{job.name}-step{step:06d}.png"))

    service = TrainService(lambda: host, cast.out, on_preview=save_preview, settings=lambda: {"keep_checkpoints": True},
                           **_parallel_options(args, cast.out))

    def save():
        if main:
            casts.write_state(cast, state)

    if cast.test and args.parallel is not None:
        reporter.line("the cast's tests are skipped under accelerate launch: run evaluate afterwards")
    units = [(c.name, [c]) for c in cast.characters] if cast.mode == "separate" else [(cast.name, cast.characters)]
    bodies = {}
    for name, members in units:  # every character's options checked before anything is trained
        body = {**cast.defaults, **members[0].options} if cast.mode == "separate" else dict(cast.defaults)
        body.update(name=name, trigger=members[0].trigger if cast.mode == "separate" else name)
        if cast.test and not body.get("save_every") and "checkpoint_count" not in body:
            body["checkpoint_count"] = 3  # checkpoints for the test to compare
        try:
            service.parse({**body, "overwrite": True}, intake=lambda r: ([], {"warnings": []}))
        except ConfigError as e:
            raise CharLoraError(f"{args.cast}: {name}: {e}") from e
        bodies[name] = body
    state = casts.read_state(cast)
    if args.parallel is not None:
        args.parallel.barrier()  # every process has read the state before the first one writes it
    state.update(cast=os.path.basename(cast.path), mode=cast.mode, checkpoint=cast.checkpoint)
    failed, stopped = 0, False
    for name, members in units:
        rec = state["characters"].get(name) or {}
        body = dict(bodies[name])
        final = os.path.join(cast.out, name + ".safetensors")
        if rec.get("status") == "done" and os.path.isfile(final) and not body.get("overwrite"):
            reporter.line(f"{name}: done earlier ({rec.get('finished', '')}), skipped")
            continue
        if os.path.isfile(final) and not body.get("overwrite") and rec.get("status") not in ("running", "stopped"):
            rec = {"status": "failed", "error": f"{final} exists and was not made by this cast: delete it or set "
                                                "overwrite = true"}
            state["characters"][name] = rec
            save()
            reporter.line(f"{name}: {rec['error']}")
            failed += 1
            continue
        resume = casts.latest_state_file(cast.out, name) if rec.get("status") in ("running", "stopped", "failed") else None
        if resume and os.path.isfile(final):
            body["overwrite"] = True  # the partial file of the interrupted run is replaced
        reporter.line(f"== {name}" + (f": resuming from {os.path.basename(resume)}" if resume else ""), character=name)
        state["characters"][name] = rec = {"status": "running", "started": casts.now()}
        save()
        try:
            intake = casts.shared_intake(members) if cast.mode == "shared" else None
            if intake is None:
                body["image_dir"] = members[0].images
            spec = service.parse(body, intake=intake)
            _check_batch(args, spec.config)
        except CharLoraError as e:
            rec.update(status="failed", error=_bad_input(e))
            save()
            reporter.line(f"{name}: failed: {rec['error']}")
            failed += 1
            continue
        if cast.mode == "shared":
            triggers = {c.name: c.trigger for c in members}
            spec.config = dataclasses.replace(spec.config, trigger="", extra_metadata={
                **spec.config.extra_metadata, "modelspec.trigger_phrase": ", ".join(triggers.values()),
                "charlora_cast_triggers": json.dumps(triggers)}).validate()
        spec.resume_from = resume
        job = service.runner.submit(name, spec, output_dir=service.lora_dir)
        job.total_steps = spec.config.steps
        presses = run_job(service, job, reporter, "step")
        warnings = [w for w in job.warnings if not (cast.mode == "shared" and w.startswith("no trigger word"))]
        for w in warnings:
            reporter.line(f"{name}: warning: {w}")
        if job.status != "done" or not (job.lora_path or not main):
            rec.update(status="failed" if job.status == "failed" else "stopped", error=job.error)
            save()
            reporter.line(f"{name}: {rec['status']}" + (f": {job.error}" if job.error else ""))
            if presses:
                stopped = True
                break
            failed += 1
            continue
        rec.update(status="stopped" if presses else "done", path=job.lora_path, steps=job.step,
                   loss=job.loss, finished=casts.now(), warnings=warnings)
        save()
        if presses:
            stopped = True
            reporter.line(f"{name}: stopped at step {job.step} and saved; run the cast again to resume it")
            break
        reporter.line(f"{name}: saved {job.lora_path}")
        if cast.test and args.parallel is None and not _test_unit(service, cast, name, members, state, reporter):
            stopped = True
            break
    state["summary"] = casts.summary_table(cast, state)
    save()
    reporter.line("\n" + state["summary"])
    reporter.emit(event="end", status="stopped" if stopped else ("failed" if failed else "done"),
                  state=cast.state_path)
    if stopped:
        reporter.line("Stopped. Run the cast again to continue where it stopped.")
    return 1 if failed or stopped else 0


def _test_unit(service, cast, name, members, state, reporter):
    """Evaluate a finished LoRA (per character in a shared LoRA); False when stopped with Ctrl-C."""
    from . import cast as casts
    for c in members:
        key = name if cast.mode == "separate" else f"{name}:{c.name}"
        body = {"lora": name, **cast.test}
        if cast.mode == "shared":
            body.update(trigger=c.trigger, image_dir=c.images)
        rec = state["characters"].setdefault(key, {})
        try:
            job = service.submit_evaluation(body)
        except CharLoraError as e:
            rec["test_error"] = str(e)
            reporter.line(f"{key}: test not run: {e}")
            continue
        reporter.line(f"{key}: testing {job.total_steps} pictures")
        presses = run_job(service, job, reporter, "picture")
        if presses:
            return False
        result = job.result or {}
        best = result.get("best")
        if best:
            row = next((r for r in result.get("scores", []) if r["checkpoint"] == best["checkpoint"]
                        and r["strength"] == best["strength"]), {})
            best = {**best, "identity_lift": row.get("identity_lift"), "prompt_fidelity_delta":
                    row.get("prompt_fidelity_delta")}
        rec.update(grids=result.get("grid_paths", []), report=result.get("report_path"), best=best,
                   embedder=result.get("embedder"), test_error=job.error)
        casts.write_state(cast, state)
    return True


def _writable(folder):
    """The output folder exists (created) and takes files — checked before a model is loaded."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".charlora-write-test-{os.getpid()}")
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError("out", f"cannot write to {folder} ({e.strerror or e})") from e


def _parallel_options(args, out):
    """Under accelerate launch: the trainer's data-parallel interface and a disk latent cache, so one
    process per machine encodes the pictures and the others read them."""
    if args.parallel is None:
        return {}
    return {"parallel": args.parallel, "latent_cache_dir": os.path.join(out, ".charlora-latents")}


def _check_batch(args, cfg):
    if args.parallel is not None and cfg.batch_size < args.parallel.world:
        raise ConfigError("batch_size", f"is the global batch, shared by the {args.parallel.world} processes: "
                                        f"it must be at least {args.parallel.world}, got {cfg.batch_size}")
