"""Training speed and memory of our trainer against kohya sd-scripts' ``train_network.py``, side by side.

Both train a UNet-only LoRA on the same random-weight full-size SD1.5 checkpoint (the keys and shapes of
a real v1-5 file, written once), the same pictures and the same settings: rank 16 / alpha 8 on kohya's
targets, AdamW (lr 1e-4, weight decay 0.01), constant schedule, min-SNR gamma 5, gradient clipping 1.0,
cached latents, SDPA attention, seed 0, batch 1, mixed precision fp16 on CUDA (``--precision``) and
fp32 on the CPU. kohya runs as a separate process in its own Python environment; its steps are timed
from its progress bar as the lines arrive (tqdm set to print every step), ours from the trainer's
progress callback; the first step of each is not timed. Printed: ms per step (median, min, max),
steps/s, the ratio kohya / ours (our speed-up; targets on a GPU: >= 1.3x SD1.5 at 512 px) and peak
memory (CUDA: peak allocated including the model, and beyond what was loaded when training began;
CPU: resident-memory growth during training). A side that runs out of memory is a result ("does not
fit at batch N").

kohya is fetched at a pinned commit into a scratch folder (``--scratch``, default
``~/.cache/charlora-bench``; never into this repository) and gets a venv there with the same torch
version as this one (``--kohya-torch`` names another torch / torchvision pair: a CPU build of torch
needs the CPU torchvision) plus the packages its ``requirements.txt`` pins that ``train_network.py``
imports. Fetching needs git and the network; ``--kohya-dir`` gives an existing checkout instead, and
``--kohya-python`` a Python that already has kohya's requirements. On a GPU machine:

    python benchmarks/vs_kohya.py --setup-only                      # fetch, venv, checkpoint: once
    python benchmarks/vs_kohya.py --steps 50 --json vs_kohya.json   # SD1.5, 512 px, fp16
    python benchmarks/vs_kohya.py --kohya-python ~/envs/kohya/bin/python   # an env with CUDA torch

Without CUDA it says so and measures on the CPU (minutes per step at 512 px):

    .venv/bin/python benchmarks/vs_kohya.py --resolution 256 --steps 4
"""
import argparse
import gc
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import torch  # noqa: E402

import train_speed  # noqa: E402  (puts the repository root on sys.path; run_engine times with its Clock)
from train_speed import measure, summary  # noqa: E402

KOHYA_REPO = "https://github.com/kohya-ss/sd-scripts"
KOHYA_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"
# kohya's requirements.txt lines that train_network.py needs (the optimizers, bitsandbytes, tensorboard,
# wandb, captioning and SD3/FLUX tokenizers are imported only when asked for); opencv as its headless
# build (the same cv2 without libGL)
KOHYA_PACKAGES = ("accelerate", "transformers", "diffusers", "ftfy", "opencv-python", "einops", "safetensors",
                  "toml", "voluptuous", "huggingface-hub", "imagesize", "numpy")
KOHYA_IMPORTS = {"torch": "torch", "torchvision": "torchvision", "accelerate": "accelerate",
                 "transformers": "transformers", "diffusers": "diffusers", "cv2": "opencv-python-headless",
                 "einops": "einops", "safetensors": "safetensors", "toml": "toml", "voluptuous": "voluptuous",
                 "huggingface_hub": "huggingface-hub", "imagesize": "imagesize", "tqdm": "tqdm"}
CHECKPOINT = "sd15-full-random-v1"   # bump when the writer changes
TOKENIZER = "openai_clip-vit-large-patch14"   # kohya's cache name for the hub id openai/clip-vit-large-patch14
MB = 2 ** 20

# Runs inside kohya's Python: tqdm prints every update (its default prints at most every 0.1 s, fewer than
# the steps of a fast GPU); memory at the start of the step loop and the peaks are printed at exit.
WRAPPER = r"""
import atexit, json, os, runpy, sys, threading
import torch, tqdm
try:
    import resource
except ImportError:  # Windows
    resource = None
mem = {}
def rss():
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def sample(stop):
    while not stop.wait(0.02):
        mem["rss_peak"] = max(mem["rss_peak"], rss())
init = tqdm.tqdm.__init__
def every_step(self, *a, **k):
    k.setdefault("mininterval", 0)
    k.setdefault("miniters", 1)
    init(self, *a, **k)
    if k.get("desc") == "steps" and "rss_base" not in mem:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            mem["cuda_base"] = torch.cuda.memory_allocated()
        try:
            mem["rss_base"] = mem["rss_peak"] = rss()
            threading.Thread(target=sample, args=(threading.Event(),), daemon=True).start()
        except (OSError, ValueError):
            pass
tqdm.tqdm.__init__ = every_step
def report():
    out = {"rss_max_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024} if resource else {}
    if "rss_base" in mem:
        out["rss_growth_mb"] = max(mem["rss_peak"], rss()) / 2**20 - mem["rss_base"] / 2**20
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if "cuda_base" in mem:
            out["cuda_base_mb"] = mem["cuda_base"] / 2**20
    print("CHARLORA_MEMORY " + json.dumps(out), flush=True)
atexit.register(report)
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""
STEP_RE = re.compile(r"steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")
LOAD_RE = re.compile(r"loading (u-net|vae|text encoder): (.*)")


class Refusal(Exception):
    """A missing prerequisite: printed as one message, exit status 2."""


def run_quiet(cmd, timeout=600, **kw):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except FileNotFoundError as e:
        raise Refusal(f"{cmd[0]} was not found ({e})") from e
    except subprocess.TimeoutExpired as e:
        raise Refusal(f"{' '.join(cmd[:3])} ... did not finish in {timeout} s") from e


def last_lines(text, n=5):
    return "\n  ".join(line for line in text.strip().splitlines()[-n:])


# -- kohya: checkout, Python ---------------------------------------------------------------------------
def git_commit(folder):
    if not os.path.isdir(os.path.join(folder, ".git")) or not shutil.which("git"):
        return None
    r = run_quiet(["git", "-C", folder, "rev-parse", "HEAD"], timeout=30)
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def kohya_checkout(args, notes):
    """(folder, commit or None): --kohya-dir as it is, or the pinned commit fetched into the scratch folder."""
    if args.kohya_dir:
        folder = os.path.abspath(os.path.expanduser(args.kohya_dir))
        if not os.path.isdir(folder):
            raise Refusal(f"--kohya-dir {folder}: no such folder")
        missing = [f for f in (args.script, "networks/lora.py", "library/train_util.py")
                   if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise Refusal(f"--kohya-dir {folder} has no {', '.join(missing)} (not a checkout of kohya-ss/sd-scripts?)")
        commit = git_commit(folder)
        if commit is None:
            notes.append(f"kohya's commit is unknown ({folder} is not a git checkout); pinned: {KOHYA_COMMIT}")
        elif commit != KOHYA_COMMIT:
            notes.append(f"kohya at {commit}, not at the pinned {KOHYA_COMMIT}")
        return folder, commit
    folder = os.path.join(args.scratch, "sd-scripts")
    if git_commit(folder) == KOHYA_COMMIT:
        return folder, KOHYA_COMMIT
    if not shutil.which("git"):
        raise Refusal("git is not installed: install git, or give a checkout of kohya-ss/sd-scripts with --kohya-dir")
    print(f"Fetching kohya sd-scripts {KOHYA_COMMIT[:10]} into {folder} ...", flush=True)
    os.makedirs(folder, exist_ok=True)
    for cmd in (["git", "init", "-q", folder],
                ["git", "-C", folder, "fetch", "-q", "--depth", "1", KOHYA_REPO, KOHYA_COMMIT],
                ["git", "-C", folder, "checkout", "-q", "--detach", "FETCH_HEAD"]):
        r = run_quiet(cmd)
        if r.returncode:
            raise Refusal(f"could not fetch {KOHYA_REPO} at {KOHYA_COMMIT} (`{' '.join(cmd[:4])} ...` failed; "
                          f"no network?):\n  {last_lines(r.stderr)}\nor give a checkout with --kohya-dir")
    return folder, KOHYA_COMMIT


def kohya_requirements(folder, torch_spec=None):
    """torch / torchvision (``torch_spec``, default: this process's torch version and its torchvision), and
    kohya's own pins of what train_network.py imports."""
    version = torch.__version__.split("+")[0]
    major, minor = (int(x) for x in version.split(".")[:2])
    reqs = torch_spec.split() if torch_spec else [f"torch=={version}"] + (
        [f"torchvision==0.{minor + 15}.*"] if major == 2 else ["torchvision"])
    try:
        with open(os.path.join(folder, "requirements.txt"), encoding="utf-8") as f:
            lines = [line.split("#")[0].strip() for line in f]
    except OSError as e:
        raise Refusal(f"{folder} has no readable requirements.txt ({e})") from e
    for line in lines:
        name = re.split(r"[\[<>=!~; ]", line, maxsplit=1)[0].lower()
        if name in KOHYA_PACKAGES:
            line = re.sub(r"\[[^\]]*\]", "", line)  # diffusers[torch]: torch is pinned above
            reqs.append(line.replace("opencv-python", "opencv-python-headless", 1))
    return reqs


def venv_python(venv):
    return os.path.join(venv, "Scripts", "python.exe") if os.name == "nt" else os.path.join(venv, "bin", "python")


def kohya_python(args, folder):
    """A Python with kohya's requirements: --kohya-python, or a venv in the scratch folder (made once)."""
    if args.kohya_python:
        python = os.path.expanduser(args.kohya_python)
        if not os.path.isfile(python):
            raise Refusal(f"--kohya-python {python}: no such file")
    else:
        venv = os.path.join(args.scratch, "kohya-venv")
        python = venv_python(venv)
        stamp = os.path.join(venv, "charlora-requirements.txt")  # what was installed last
        before = open(stamp, encoding="utf-8").read().split("\n") if os.path.isfile(stamp) else []
        kept_torch = " ".join(r for r in before if re.match(r"torch(vision)?\b", r))  # kept unless asked
        reqs = kohya_requirements(folder, args.kohya_torch or kept_torch or None)
        done = before == reqs
        if not done:
            if not os.path.isfile(python):
                print(f"Creating kohya's venv {venv} ...", flush=True)
                r = run_quiet([sys.executable, "-m", "venv", venv])
                if r.returncode:
                    raise Refusal(f"`{sys.executable} -m venv` failed (on Debian/Ubuntu: apt-get install "
                                  f"python3-venv):\n  {last_lines(r.stderr or r.stdout)}")
            print(f"Installing into it: {' '.join(reqs)} (minutes) ...", flush=True)
            log = os.path.join(args.scratch, "kohya-venv-pip.log")
            with open(log, "w", encoding="utf-8") as f:
                r = subprocess.run([python, "-m", "pip", "install", *reqs], stdout=f, stderr=subprocess.STDOUT)
            if r.returncode:
                with open(log, encoding="utf-8") as f:
                    tail = last_lines(f.read(), 8)
                raise Refusal(f"pip could not install kohya's requirements into {venv} (no network, or no "
                              f"{reqs[0]} for this platform?):\n  {tail}\nfull log: {log}; or give "
                              "--kohya-python of an environment that has them")
            with open(stamp, "w", encoding="utf-8") as f:
                f.write("\n".join(reqs))
    probe = ("import importlib, json, sys\nmissing, info = {}, {'torch': None, 'cuda': False}\n"
             "for m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n"
             "    except ModuleNotFoundError as e:\n        missing[m] = 'not installed'\n"
             "    except Exception as e:\n        missing[m] = f'fails to import: {type(e).__name__}: {e}'[:160]\n"
             "if 'torch' not in missing:\n    import torch\n"
             "    info = {'torch': torch.__version__, 'cuda': torch.cuda.is_available()}\n"
             "print(json.dumps({'missing': missing, **info}))")
    r = run_quiet([python, "-c", probe, *KOHYA_IMPORTS], timeout=300)
    try:
        info = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise Refusal(f"{python} does not run:\n  {last_lines(r.stderr or r.stdout)}") from None
    if info["missing"]:
        names = "\n  ".join(f"{m if m == KOHYA_IMPORTS[m] else f'{m} (pip: {KOHYA_IMPORTS[m]})'}: {why}"
                            for m, why in info["missing"].items())
        hint = (" (torchvision must be the build of the same torch: a CPU torch needs the CPU torchvision; "
                "--kohya-torch chooses the pair)" if "torchvision" in info["missing"] else "")
        raise Refusal(f"kohya's Python {python} cannot import:\n  {names}\ninstall kohya's requirements.txt "
                      f"into it{hint}")
    return python, info


# -- the shared inputs ---------------------------------------------------------------------------------
def ensure_checkpoint(scratch):
    """The random full-size SD1.5 checkpoint (fp16, 2.1 GB), written once into the scratch folder."""
    path = os.path.join(scratch, CHECKPOINT + ".safetensors")
    if os.path.isfile(path):
        return path
    from tests.checkpoint_files import write_checkpoint
    print(f"Writing a random full-size SD1.5 checkpoint to {path} (once, about a minute) ...", flush=True)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        written, modules = write_checkpoint(tmp, "sd1", name=CHECKPOINT, dtype=torch.float16, size="full")
        del modules
        gc.collect()
        for ext in (".yaml", ".safetensors"):  # the .safetensors last: its presence means complete
            os.replace(written[:-len(".safetensors")] + ext, os.path.join(scratch, CHECKPOINT + ext))
    train_speed.trim_heap()
    return path


def tokenizer_cache(scratch):
    """kohya's --tokenizer_cache_dir with CLIP ViT-L's tokenizer in it (kohya would fetch it from the hub)."""
    from lib_charlora.hosts.checkpoint_file import write_clip_tokenizer
    folder = os.path.join(scratch, "tokenizers")
    if not os.path.isfile(os.path.join(folder, TOKENIZER, "merges.txt")):
        write_clip_tokenizer(os.path.join(folder, TOKENIZER), "<|endoftext|>")
    return folder


def write_dataset(folder, images):
    """kohya's layout: ``<repeats>_<name>/`` with a ``.txt`` caption beside each picture."""
    sub = os.path.join(folder, "1_benchchr")
    os.makedirs(sub)
    for i, im in enumerate(images):
        im.image.save(os.path.join(sub, f"{i:02d}.png"))
        with open(os.path.join(sub, f"{i:02d}.txt"), "w", encoding="utf-8") as f:
            f.write(im.caption)
    return folder


# -- the two sides -------------------------------------------------------------------------------------
def kohya_args(args, checkpoint, tokenizers, data, out):
    cmd = ["--pretrained_model_name_or_path", checkpoint, "--tokenizer_cache_dir", tokenizers,
           "--train_data_dir", data, "--caption_extension", ".txt", "--output_dir", out, "--output_name", "bench",
           "--save_model_as", "safetensors", "--resolution", str(args.resolution),
           "--train_batch_size", str(args.batch_size), "--max_train_steps", str(args.steps),
           "--network_module", "networks.lora", "--network_dim", str(args.rank), "--network_alpha", str(args.rank / 2),
           "--network_train_unet_only", "--learning_rate", "1e-4", "--optimizer_type", "AdamW",
           "--optimizer_args", "weight_decay=0.01", "--lr_scheduler", "constant", "--min_snr_gamma", "5",
           "--max_grad_norm", "1.0", "--cache_latents", "--sdpa", "--seed", "0",
           "--mixed_precision", args.precision, "--max_data_loader_n_workers", "0"]
    return cmd + (["--gradient_checkpointing"] if args.gradient_checkpointing else [])


def run_kohya(python, folder, argv, log_path, timeout):
    """Runs kohya's script; returns (step -> arrival time, memory dict, load lines, exit status, log tail)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    stamps, memory, loads, last_shown = {}, {}, {}, 0
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([python, "-c", WRAPPER, *argv], cwd=folder, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        pending = b""
        try:
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                now = time.perf_counter()
                if not chunk:
                    break
                log.write(chunk)
                parts = re.split(rb"[\r\n]", pending + chunk)
                pending = parts.pop()
                for raw in parts:
                    line = raw.decode("utf-8", "replace")
                    m = STEP_RE.search(line)
                    if m and int(m.group(1)) > 0:  # 0/N: the bar drawn before the first step
                        n = int(m.group(1))
                        stamps.setdefault(n, now)
                        if n > last_shown and (n - last_shown >= max(1, int(m.group(2)) // 10)
                                               or n == int(m.group(2))):
                            print(f"  kohya step {n}/{m.group(2)}  ({now - t0:.0f} s since start)", flush=True)
                            last_shown = n
                    elif line.startswith("CHARLORA_MEMORY "):
                        memory = json.loads(line.split(" ", 1)[1])
                    elif LOAD_RE.search(line):
                        what, info = LOAD_RE.search(line).groups()
                        loads[what] = info.strip()
                if timeout and now - t0 > timeout:
                    raise TimeoutError
            code = proc.wait()
        except (KeyboardInterrupt, TimeoutError) as e:
            os.killpg(proc.pid, signal.SIGTERM)  # kohya and anything it started
            proc.wait()
            if isinstance(e, KeyboardInterrupt):
                raise
            code = "timeout"
    with open(log_path, encoding="utf-8", errors="replace") as f:
        tail = f.read()[-20000:]
    return stamps, memory, loads, code, tail


def lora_modules(out):
    """How many modules the LoRA file written into ``out`` trains (a check that both sides train the same)."""
    from safetensors import safe_open
    files = [f for f in os.listdir(out) if f.endswith(".safetensors")] if os.path.isdir(out) else []
    if not files:
        return None
    with safe_open(os.path.join(out, files[0]), framework="pt") as f:
        return sum(k.endswith("lora_down.weight") for k in f.keys())


def kohya_seconds(stamps):
    """Seconds of each step after the first, from the arrival times of the progress lines."""
    out, ns = [], sorted(stamps)
    for a, b in zip(ns, ns[1:]):
        out += [(stamps[b] - stamps[a]) / (b - a)] * (b - a)  # a skipped line: its time shared out
    return out


def kohya_side(args, python, folder, checkpoint, tokenizers, data, out):
    log_path = os.path.join(args.scratch, "kohya-last.log")
    print(f"kohya: {args.script} (log: {log_path}) ...", flush=True)
    stamps, memory, loads, code, tail = run_kohya(python, folder, [args.script, *kohya_args(
        args, checkpoint, tokenizers, data, out)], log_path, args.timeout)
    if code != 0:
        if re.search(r"out of memory|OutOfMemoryError", tail, re.I):
            error = f"does not fit at batch {args.batch_size}"
        elif code == "timeout":
            error = f"did not finish in {args.timeout} s"
        else:
            lines = [ln for ln in re.split(r"[\r\n]", tail) if ln.strip()]
            error = f"train_network failed (exit {code}): {lines[-1][:200] if lines else ''} (see {log_path})"
        res = summary([], None, error, args.batch_size)
    else:
        res = summary(kohya_seconds(stamps), None, None, args.batch_size)
    res["load"] = loads
    res["memory"] = {k: round(v, 1) for k, v in memory.items()}
    return res


def our_side(args, checkpoint, device, images, out):
    from lib_charlora.hosts.checkpoint_file import load_host, read_shapes
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    print("ours: loading the checkpoint with our loader ...", flush=True)
    t0 = time.perf_counter()
    try:
        host = load_host(checkpoint, device=str(device), dtype=dtype)
    except torch.cuda.OutOfMemoryError:
        return {"error": f"does not fit at batch {args.batch_size} (the model does not load)"}
    host.sample = lambda *a, **k: None  # no preview pictures (kohya draws none): the card is a training picture
    pipe = host.pipeline
    loaded = sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    shapes = read_shapes(checkpoint)
    in_file = sum(v.numel() for v in shapes.values())
    load = {"tensors": len(shapes), "file_parameters": in_file, "loaded_parameters": loaded,
            "all_matched": loaded == in_file, "seconds": round(time.perf_counter() - t0, 1)}
    del shapes
    print(f"ours: {'all' if load['all_matched'] else 'NOT all'} {load['tensors']} tensors loaded "
          f"({loaded / 1e6:.1f} M of {in_file / 1e6:.1f} M parameters) in {load['seconds']:.0f} s; training ...",
          flush=True)
    steps, mem, error = measure(lambda: train_speed.run_engine(host, args, args.precision, images, out), device)
    res = summary(steps, None if mem is None else [mem], error and f"{error} at batch {args.batch_size}",
                  args.batch_size)
    res["load"] = load
    if device.type == "cuda" and not error:
        res["memory"] = {"cuda_peak_mb": round(torch.cuda.max_memory_allocated(device) / MB, 1),
                         "beyond_model_mb": round(mem, 1)}
    elif not error:
        res["memory"] = {"rss_growth_mb": None if mem is None else round(mem, 1)}
    return res  # the model goes with this frame


# -- report ---------------------------------------------------------------------------------------------
def memory_cells(res, cuda):
    m = res.get("memory") or {}
    if cuda:
        peak = m.get("cuda_peak_mb")
        base = m.get("cuda_base_mb")
        beyond = m.get("beyond_model_mb", None if peak is None or base is None else peak - base)
        return [peak, beyond]
    return [m.get("rss_growth_mb")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30, help="steps per side (the first is not timed)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16, help="alpha is rank / 2")
    ap.add_argument("--precision", choices=("fp16", "bf16", "no"), default=None,
                    help="mixed precision (and the model's dtype): default fp16 on CUDA, no (fp32) on the CPU")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--sides", default="kohya,ours", help="kohya, ours or both (default)")
    ap.add_argument("--scratch", default="~/.cache/charlora-bench",
                    help="folder for kohya's checkout and venv, the checkpoint and logs (outside this repository)")
    ap.add_argument("--kohya-dir", help="an existing kohya sd-scripts checkout (default: fetch the pinned commit)")
    ap.add_argument("--kohya-python", help="a Python with kohya's requirements (default: a venv in --scratch)")
    ap.add_argument("--kohya-torch", metavar="SPECS",
                    help="pip specs of torch and torchvision for kohya's venv, e.g. 'torch==2.14.1 "
                         "torchvision==0.29.1' (default: this torch's version and its torchvision; kept afterwards)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds kohya may run (default: no limit)")
    ap.add_argument("--setup-only", action="store_true", help="prepare kohya, its venv and the checkpoint; run nothing")
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = ap.parse_args(argv)
    args.script = "train_network.py"
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or any(s not in ("kohya", "ours") for s in sides):
        ap.error(f"--sides: {args.sides!r}; give kohya, ours or kohya,ours")
    if args.steps < 2:
        ap.error("--steps must be 2 or more (the first step of each side is not timed)")
    if args.resolution % 64 or not 64 <= args.resolution <= 2048:
        ap.error("--resolution must be a multiple of 64 from 64 to 2048")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args.precision = args.precision or ("fp16" if cuda else "no")
    if args.precision == "fp16" and not cuda:
        ap.error("--precision fp16 needs CUDA; use bf16 or no on the CPU")
    args.scratch = os.path.abspath(os.path.expanduser(args.scratch))
    if os.path.commonpath([args.scratch, train_speed.ROOT]) == train_speed.ROOT:
        ap.error(f"--scratch {args.scratch} is inside this repository; kohya's files must stay outside it")
    if not cuda:
        print("No CUDA device here: measuring on the CPU (these are CPU figures).", flush=True)

    notes, kohya_info = [], {}
    try:
        os.makedirs(args.scratch, exist_ok=True)
        if "kohya" in sides or args.setup_only:
            folder, commit = kohya_checkout(args, notes)
            python, info = kohya_python(args, folder)
            kohya_info = {"commit": commit, "pinned_commit": KOHYA_COMMIT, "python": python, "torch": info["torch"]}
            if info["torch"].split("+")[0] != torch.__version__.split("+")[0]:
                notes.append(f"kohya runs torch {info['torch']}, ours {torch.__version__}")
            if info["cuda"] != cuda:
                raise Refusal(f"kohya's Python {python} has torch {info['torch']} "
                              f"{'with' if info['cuda'] else 'without'} CUDA, this one {torch.__version__} "
                              f"{'with' if cuda else 'without'}: both sides must run on the same device "
                              "(give --kohya-python of an environment with CUDA torch)")
            tokenizers = tokenizer_cache(args.scratch)
        checkpoint = ensure_checkpoint(args.scratch)
    except Refusal as e:
        print(f"vs_kohya: {e}", file=sys.stderr)
        return 2
    if args.setup_only:
        print(f"Ready: kohya {folder} ({commit or 'commit unknown'}), its Python {python}, checkpoint {checkpoint}")
        return 0

    images = train_speed.pictures(8, args.resolution)  # captioned "photo of benchchr"
    results = {}
    with tempfile.TemporaryDirectory(prefix="run-", dir=args.scratch) as run:
        data = write_dataset(os.path.join(run, "data"), images)
        for side in sides:  # one at a time: each side holds its own copy of the model
            out = os.path.join(run, f"out-{side}")
            os.makedirs(out)
            if side == "kohya":
                results["kohya"] = kohya_side(args, python, folder, checkpoint, tokenizers, data, out)
            else:
                results["ours"] = our_side(args, checkpoint, device, images, out)
                gc.collect()
                train_speed.trim_heap()
            results[side]["lora_modules"] = lora_modules(out)

    modules = {s: r.get("lora_modules") for s, r in results.items()}
    if len(set(modules.values())) > 1:
        notes.append(f"the sides trained different numbers of LoRA modules: {modules}")
    ms = {s: r["ms_per_step"]["median"] for s, r in results.items() if "ms_per_step" in r}
    speedup = round(ms["kohya"] / ms["ours"], 3) if len(ms) == 2 else None
    target = 1.3
    report = {
        "arch": "sd15", "resolution": args.resolution, "batch_size": args.batch_size, "rank": args.rank,
        "alpha": args.rank / 2, "steps": args.steps, "precision": args.precision, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "gradient_checkpointing": args.gradient_checkpointing, "commit": train_speed._commit(),
        "kohya": {**kohya_info, **results.get("kohya", {})}, "ours": results.get("ours"),
        "speedup_kohya_over_ours": speedup, "target_speedup": target,
        "memory_kind": ("CUDA allocated: peak incl. the model, and beyond what was loaded when training began"
                        if cuda else "resident memory growth during training (kohya: its step loop; ours: "
                                     "caching + steps)"), "notes": notes,
    }
    head = ["peak MB", "beyond model"] if cuda else ["RSS growth MB"]
    where = "CUDA" if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nSD1.5 {args.resolution} px, batch {args.batch_size}, rank {args.rank}, {args.precision} on "
          f"{report['device_name']} ({where})")
    print(f"{'side':6s} {'ms/step median':>15s} {'min':>9s} {'max':>9s} {'steps/s':>9s} "
          + " ".join(f"{h:>13s}" for h in head))
    for side, res in results.items():
        if "error" in res:
            print(f"{side:6s} {res['error']}")
            continue
        m = res["ms_per_step"]
        cells = " ".join(f"{'-' if v is None else f'{v:.0f}':>13s}" for v in memory_cells(res, cuda))
        print(f"{side:6s} {m['median']:15.1f} {m['min']:9.1f} {m['max']:9.1f} {res['steps_per_s']:9.3f} {cells}")
    if speedup is not None:
        print(f"speed-up, kohya ms/step / ours: {speedup:.2f}x  (target on a GPU: >= {target}x at SD1.5 512 px)")
    for side, res in results.items():
        if res.get("load"):
            print(f"{side} loaded: {res['load']}; LoRA modules trained: {res.get('lora_modules')}")
    for n in notes:
        print("note:", n)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return 0 if all("error" not in r or r["error"].startswith("does not fit") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
