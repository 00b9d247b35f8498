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
from . import console
from .engine.errors import CharLoraError, ConfigError

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


# -- running a cast -------------------------------------------------------------------------------------
def run(args):
    """Exit code: 0 every character done, 1 some failed or the cast was stopped, 2 bad input."""
    from .service import TrainService
    try:
        cast = read_cast(args.cast, args.checkpoint)
    except ConfigError as e:
        if e.field != "cast":
            raise
        raise CharLoraError(f"{args.cast}: {str(e).split(': ', 1)[1]}") from e
    reporter = console.reporter_for(args)
    main = not console.quiet(args)
    args.checkpoint = cast.checkpoint
    console.writable(cast.out)
    host = console.load_host(args)

    def save_preview(job, step, image):
        folder = os.path.join(cast.out, f"{job.name}_samples")
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"{job.name}-step{step:06d}.png"))

    service = TrainService(lambda: host, cast.out, on_preview=save_preview, settings=lambda: {"keep_checkpoints": True},
                           **console.parallel_options(args, cast.out))

    def save():
        if main:
            write_state(cast, state)

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
    state = read_state(cast)
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
        resume = latest_state_file(cast.out, name) if rec.get("status") in ("running", "stopped", "failed") else None
        if resume and os.path.isfile(final):
            body["overwrite"] = True  # the partial file of the interrupted run is replaced
        reporter.line(f"== {name}" + (f": resuming from {os.path.basename(resume)}" if resume else ""), character=name)
        state["characters"][name] = rec = {"status": "running", "started": now()}
        save()
        try:
            intake = shared_intake(members) if cast.mode == "shared" else None
            if intake is None:
                body["image_dir"] = members[0].images
            spec = service.parse(body, intake=intake)
            console.check_batch(args, spec.config)
        except CharLoraError as e:
            rec.update(status="failed", error=console.bad_input(e))
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
        presses = console.run_job(service, job, reporter, "step")
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
                   loss=job.loss, peak_memory_mb=job.to_dict()["peak_memory_mb"], finished=now(), warnings=warnings)
        save()
        if presses:
            stopped = True
            reporter.line(f"{name}: stopped at step {job.step} and saved; run the cast again to resume it")
            break
        reporter.line(f"{name}: saved {job.lora_path}")
        if cast.test and args.parallel is None and not _test_unit(service, cast, name, members, state, reporter):
            stopped = True
            break
    state["summary"] = summary_table(cast, state)
    save()
    reporter.line("\n" + state["summary"])
    reporter.emit(event="end", status="stopped" if stopped else ("failed" if failed else "done"),
                  state=cast.state_path)
    if stopped:
        reporter.line("Stopped. Run the cast again to continue where it stopped.")
    return 1 if failed or stopped else 0


def _test_unit(service, cast, name, members, state, reporter):
    """Evaluate a finished LoRA (per character in a shared LoRA); False when stopped with Ctrl-C."""
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
        presses = console.run_job(service, job, reporter, "picture")
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
        write_state(cast, state)
    return True
