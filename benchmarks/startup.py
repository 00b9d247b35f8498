"""What Character LoRA adds to a WebUI's start-up, measured in a fresh process that has first imported what
the WebUI has imported by then (torch, gradio, numpy, Pillow): loading ``scripts/charlora.py`` (the WebUI
imports every extension's scripts), then building the tab (the WebUI's ``on_ui_tabs`` callbacks), and which
modules each step brings in. Target: the two together <= 0.3 s. Medians of several fresh processes.

    .venv/bin/python benchmarks/startup.py [--runs 5]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("diffusers", "transformers", "peft", "accelerate", "safetensors.torch", "open_clip", "clip")

CHILD = r"""
import importlib.util, json, sys, time, types
import torch, gradio, numpy, PIL.Image  # the WebUI has these before it loads extensions
root = sys.argv[1]
fake = types.ModuleType("modules")
hooks = {}
fake.script_callbacks = types.SimpleNamespace(**{f"on_{k}": (lambda k: lambda f: hooks.setdefault(k, f))(k)
                                                 for k in ("ui_tabs", "app_started", "ui_settings")})
sys.modules["modules"], sys.modules["modules.script_callbacks"] = fake, fake.script_callbacks
sys.path.insert(0, root)
before = set(sys.modules)
t0 = time.perf_counter()
spec = importlib.util.spec_from_file_location("charlora.py", root + "/scripts/charlora.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))
t1 = time.perf_counter()
script_modules = set(sys.modules) - before
from lib_charlora import ui
from lib_charlora.service import TrainService
service = TrainService(lambda: types.SimpleNamespace(arch="sd1", prediction="eps"), "/nonexistent/Lora")
with gradio.Blocks():
    ui.create_tab(service, lambda: "model")
t2 = time.perf_counter()
tab_modules = set(sys.modules) - before - script_modules
print(json.dumps({"script": t1 - t0, "tab": t2 - t1, "script_modules": sorted(script_modules),
                  "tab_modules": sorted(tab_modules)}))
"""


def measure(python=sys.executable):
    out = subprocess.run([python, "-c", CHILD, ROOT], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    runs = [measure() for _ in range(args.runs)]
    script = statistics.median(r["script"] for r in runs)
    tab = statistics.median(r["tab"] for r in runs)
    heavy = sorted({m for r in runs for m in r["script_modules"] + r["tab_modules"] if m.split(".")[0] in HEAVY})
    print(f"scripts/charlora.py import: {script * 1000:.1f} ms (median of {args.runs} fresh processes)")
    print(f"building the tab:           {tab * 1000:.1f} ms")
    print(f"added start-up:             {(script + tab) * 1000:.1f} ms (target <= 300 ms): "
          f"{'within' if script + tab <= 0.3 else 'OVER'}")
    print(f"modules the script brings in: {len(runs[0]['script_modules'])}; the tab: {len(runs[0]['tab_modules'])}; "
          f"heavy ones among them: {', '.join(heavy) or 'none'}")


if __name__ == "__main__":
    main()
