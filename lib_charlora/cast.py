"""Casts: several characters trained one after another on one loaded model (``python -m lib_charlora cast``).

A cast file (TOML) lists the characters; ``[defaults]`` hold options for all of them (the API's training
options), each ``[[character]]`` may override any. Every character goes through the same service as
``train``; after it, its checkpoints are tested as ``evaluate`` does (``[test]``; on by default). A state
file beside the outputs (``<out>/<cast>.cast.json``) records each character's outcome, so running the
cast again skips the finished ones, resumes an interrupted one from its last checkpoint and retries a
failed one. ``mode = "shared"``: one LoRA for the whole cast, one trigger word per character.
"""
import dataclasses
import json
import os
import time

from .engine.captions import DEFAULT_TEMPLATE, with_trigger_first
from .engine.config import validate_name
from .engine.dataset import DatasetError, load_folder
from .engine.errors import ConfigError

TRAIN_KEYS = {"preset", "steps", "rank", "alpha", "learning_rate", "text_encoder_lr", "train_text_encoder",
              "resolution", "batch_size", "seed", "save_every", "sample_every", "checkpoint_count", "overwrite"}
TEST_KEYS = {"enabled", "prompts", "seeds", "strengths", "steps", "width", "height", "sampler", "checkpoints"}
TOP_KEYS = {"checkpoint", "out", "mode", "name", "defaults", "test", "character"}
CHARACTER_KEYS = {"name", "trigger", "images", *TRAIN_KEYS}


@dataclasses.dataclass
class Character:
    name: str
    trigger: str
    images: str                 # folder (absolute)
    options: dict               # training options (API names)


@dataclasses.dataclass
class Cast:
    path: str
    checkpoint: str
    out: str
    mode: str                   # "separate" or "shared"
    name: str                   # shared mode: the LoRA's name; else the cast file's stem
    characters: list
    defaults: dict
    test: dict                  # evaluation options (API names) or {} when off

    @property
    def state_path(self):
        return os.path.join(self.out, f"{os.path.splitext(os.path.basename(self.path))[0]}.cast.json")


def _load_toml(path):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError("cast", f"cannot read {path} ({e.strerror or e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("cast", f"{path} is not valid TOML ({e})") from e


def _unknown(where, table, known):
    extra = sorted(set(table) - known)
    if extra:
        raise ConfigError("cast", f"{where}: unknown option '{extra[0]}'; known: {', '.join(sorted(known))}")


def read_cast(path, checkpoint=None):
    """Parse and check a cast file before anything is loaded: names, folders, option names."""
    data = _load_toml(path)
    base = os.path.dirname(os.path.abspath(path))
    _unknown("the cast file", data, TOP_KEYS)
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError("cast", "[defaults] must be a table of options")
    _unknown("[defaults]", defaults, TRAIN_KEYS)
    test = data.get("test") or {}
    if not isinstance(test, dict):
        raise ConfigError("cast", "[test] must be a table of options")
    _unknown("[test]", test, TEST_KEYS)
    test = {} if test.get("enabled", True) is False else {k: v for k, v in test.items() if k != "enabled"}
    mode = data.get("mode", "separate")
    if mode not in ("separate", "shared"):
        raise ConfigError("cast", f"mode must be \"separate\" or \"shared\", got {mode!r}")
    rows = data.get("character")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ConfigError("cast", "no characters: add [[character]] tables with name, trigger and images")
    characters, seen = [], {}
    for i, row in enumerate(rows, 1):
        where = f"character {i}" + (f" ({row['name']})" if isinstance(row.get("name"), str) else "")
        _unknown(where, row, CHARACTER_KEYS)
        try:
            name = validate_name(row.get("name"))
        except ConfigError as e:
            raise ConfigError("cast", f"{where}: name: {str(e).split(': ', 1)[1]}") from e
        if name.lower() in seen:
            raise ConfigError("cast", f"{where}: the name '{name}' is used twice (also character {seen[name.lower()]})")
        seen[name.lower()] = i
        trigger = row.get("trigger", name)
        if not isinstance(trigger, str) or not trigger.strip() or "," in trigger:
            raise ConfigError("cast", f"{where}: trigger must be one non-empty tag (no commas)")
        images = row.get("images")
        if not isinstance(images, str):
            raise ConfigError("cast", f"{where}: images must be the folder of its pictures")
        images = os.path.join(base, images)
        if not os.path.isdir(images):
            raise ConfigError("cast", f"{where}: no such folder: {images}")
        characters.append(Character(name, trigger.strip(), images, {k: v for k, v in row.items()
                                                                    if k not in ("name", "trigger", "images")}))
    if mode == "shared":
        name = validate_name(data.get("name"), "name") if data.get("name") is not None else None
        if name is None:
            raise ConfigError("cast", "mode = \"shared\" needs name = \"...\" (the cast LoRA's file name)")
        triggers = [c.trigger.lower() for c in characters]
        if len(set(triggers)) != len(triggers):
            raise ConfigError("cast", "in a shared LoRA every character needs its own trigger word")
        if any(set(c.options) - {"preset"} for c in characters):
            raise ConfigError("cast", "in a shared LoRA the training options go in [defaults], not per character")
    else:
        name = os.path.splitext(os.path.basename(path))[0]
    ckpt = checkpoint or data.get("checkpoint")
    if not ckpt:
        raise ConfigError("checkpoint", "give --checkpoint or checkpoint = \"...\" in the cast file")
    if checkpoint is None:
        ckpt = os.path.join(base, ckpt)
    out = data.get("out", "loras")
    return Cast(os.path.abspath(path), ckpt, os.path.join(base, out), mode, name, characters, defaults, test)


# -- state ----------------------------------------------------------------------------------------------
def read_state(cast):
    try:
        with open(cast.state_path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) and isinstance(data.get("characters"), dict) else {"characters": {}}
    except (OSError, ValueError):
        return {"characters": {}}


def write_state(cast, state):
    os.makedirs(cast.out, exist_ok=True)
    tmp = cast.state_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, cast.state_path)


def latest_state_file(lora_dir, name):
    """The newest ``<name>-stepN.state`` of an interrupted run, or None."""
    folder = os.path.join(lora_dir, f"{name}_checkpoints")
    if not os.path.isdir(folder):
        return None
    states = [f for f in os.listdir(folder) if f.startswith(f"{name}-step") and f.endswith(".state")]
    if not states:
        return None
    return os.path.join(folder, max(states, key=lambda f: int(f[len(name) + 5:-len(".state")])))


# -- shared LoRA: one trigger per character -------------------------------------------------------------
def shared_intake(characters, template=DEFAULT_TEMPLATE):
    """``intake(resolution)`` for the service: every character's folder, each caption led by that
    character's trigger (kohya's per-folder captions), one merged report."""
    def intake(resolution):
        images, report = [], {"accepted": 0, "rejected": 0, "errors": [], "warnings": [], "files": []}
        for c in characters:
            try:
                pics, rep = load_folder(c.images, resolution)
            except DatasetError as e:
                raise ConfigError("cast", f"{c.name}: {e}") from e
            rep = rep.to_dict()
            if rep["errors"]:
                raise ConfigError("cast", f"{c.name}: " + "; ".join(rep["errors"]))
            for im in pics:
                caption = with_trigger_first(im.caption or template.format(trigger=c.trigger), c.trigger)
                images.append(dataclasses.replace(im, name=f"{c.name}/{im.name}", caption=caption,
                                                  caption_source="given"))  # final: the trainer keeps it
            report["accepted"] += rep["accepted"]
            report["rejected"] += rep["rejected"]
            report["warnings"] += [f"{c.name}: {w}" for w in rep["warnings"]]
            report["files"] += [{**f, "name": f"{c.name}/{f['name']}"} for f in rep["files"]]
        return images, report
    return intake


def summary_table(cast, state):
    rows = [("character", "trigger", "status", "steps", "file", "best", "identity lift")]
    for c in cast.characters:
        s = state["characters"].get(c.name if cast.mode == "separate" else f"{cast.name}:{c.name}") or {}
        if cast.mode == "shared":
            s = {**(state["characters"].get(cast.name) or {}), **s}
        best = s.get("best") or {}
        lift = best.get("identity_lift")
        rows.append((c.name, c.trigger, s.get("status", "not run"), str(s.get("steps", "")),
                     os.path.basename(s.get("path") or "") or "-",
                     f"{best['checkpoint']} @ {best['strength']:g}" if best.get("checkpoint") else "-",
                     "-" if lift is None else f"{lift:+.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    for key, s in state["characters"].items():
        for what in ("error", "test_error"):
            if s.get(what):
                lines.append(f"{key}: {'test failed: ' if what == 'test_error' else ''}{s[what]}")
    return "\n".join(lines)


def now():
    return time.strftime("%Y-%m-%d %H:%M:%S")
