"""What the command line shows and shares: progress (a bar on a terminal, plain lines otherwise, JSON
lines with ``--json``), waiting for a job with Ctrl-C handling, loading the checkpoint, and the checks
every command makes before a model is loaded."""
import json
import os
import signal
import sys
import time

from .engine.errors import ConfigError


def flag(field):
    return {"image_dir": "--images", "resume_from": "--resume", "sample_every": "--sample-every"}.get(
        field, "--" + field.replace("_", "-"))


def bad_input(e):
    if isinstance(e, ConfigError):
        return f"{flag(e.field)}: {str(e).split(': ', 1)[1]}"
    return str(e)


def quiet(args):
    return args.parallel is not None and not args.parallel.is_main


def reporter_for(args):
    return Reporter(args.json, open(os.devnull, "w") if quiet(args) else None)


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
    if not args.json and not quiet(args):
        print(f"Loading {args.checkpoint} ...", file=sys.stderr, flush=True)
    host = load(args.checkpoint, config=args.config, prediction=args.prediction, device=device, dtype=dtype,
                allow_pickle=args.allow_pickle)
    if not args.json and not quiet(args):
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


def writable(folder):
    """The output folder exists (created) and takes files — checked before a model is loaded."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".charlora-write-test-{os.getpid()}")
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError("out", f"cannot write to {folder} ({e.strerror or e})") from e


def parallel_options(args, out):
    """Under accelerate launch: the trainer's data-parallel interface and a disk latent cache, so one
    process per machine encodes the pictures and the others read them."""
    if args.parallel is None:
        return {}
    return {"parallel": args.parallel, "latent_cache_dir": os.path.join(out, ".charlora-latents")}


def check_batch(args, cfg):
    if args.parallel is not None and cfg.batch_size < args.parallel.world:
        raise ConfigError("batch_size", f"is the global batch, shared by the {args.parallel.world} processes: "
                                        f"it must be at least {args.parallel.world}, got {cfg.batch_size}")
