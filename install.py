"""Run by the WebUI on every start (A1111 / reForge / Forge: ``launch.run_extension_installer``).

Character LoRA installs, upgrades and downgrades nothing: inside the WebUI it needs only what the
WebUI already ships (torch, safetensors, gradio, Pillow, numpy). This script only reports which
optional extras are importable. It does not import them (fast, no side effects).
"""
import importlib.util

OPTIONAL = {
    "prodigyopt": "optimizer 'prodigy'",
    "bitsandbytes": "optimizer 'adamw8bit'",
}


def report():
    missing = [f"{pkg} ({what})" for pkg, what in OPTIONAL.items() if importlib.util.find_spec(pkg) is None]
    if missing:
        return ("[Character LoRA] optional, not installed: " + ", ".join(missing)
                + ". The default optimizer (AdamW) needs nothing extra.")
    return None


if __name__ == "__main__":
    line = report()
    if line:
        print(line)
