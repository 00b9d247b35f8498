"""Test and refine: pictures of a LoRA's checkpoints through the host's own sampler, scored, the best picked.

For every checkpoint (the intermediate ``<name>_checkpoints/<name>-stepNNNNNN.safetensors`` files and the
final ``<name>.safetensors``), every strength, prompt and seed, the host generates a picture **loading the
file the way users will** (``<lora:file:strength>`` in the WebUIs; diffusers' loader standalone), so what
is tested is the file, not the trainer's hooks. The baseline — the same prompts and seeds without any
LoRA — is generated once. Each checkpoint gets a grid (first row: the baseline; then one row per
strength; one column per prompt x seed) and the scores:

* identity: mean cosine similarity of the pictures' embeddings to the training pictures' (CLIP-I, or a
  face embedder's where it finds faces), and its lift over the baseline;
* prompt fidelity: cosine similarity of each picture to its prompt without the trigger (CLIP-T), and its
  change from the baseline — it falls when the LoRA overfits (every prompt gives the training picture).

``pick_best`` marks the recommended checkpoint and strength (rule in its docstring).
"""
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from .config import validate_name
from .errors import ConfigError, UnsupportedModelError
from .grid import make_grid

DEFAULT_PROMPTS = (
    "close-up portrait photo of {trigger}",
    "full body photo of {trigger} standing",
    "side profile of {trigger}",
    "{trigger} wearing a red raincoat",
    "{trigger} in a busy city street at night",
    "watercolor painting of {trigger}",
)
DEFAULT_STRENGTHS = (0.6, 0.8, 1.0)
DEFAULT_SEEDS = (1, 2)
MAX_PICTURES = 200
FIDELITY_MARGIN = 0.02   # how much prompt fidelity may fall below the baseline before a pick counts as overfit
_STEP = re.compile(r"-step(\d+)\.safetensors$")
ARCH_OF_VERSION = {"sdxl": "sdxl", "sd_v2": "sd2", "sd_v1": "sd1"}
SIZE_OF_ARCH = {"sd1": 512, "sd2": 768, "sdxl": 1024}


@dataclass
class EvalConfig:
    lora: str                                      # the LoRA's name (file stem in the Lora folder)
    trigger: str = ""                              # default: the file's modelspec.trigger_phrase
    checkpoints: object = "all"                    # "all", "final" or a list of file names
    prompts: list = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    seeds: list = field(default_factory=lambda: list(DEFAULT_SEEDS))
    strengths: list = field(default_factory=lambda: list(DEFAULT_STRENGTHS))
    width: int = 0                                 # 0: the loaded model's native size
    height: int = 0
    steps: int = 20
    sampler: str = "Euler a"

    def validate(self):
        validate_name(self.lora, "lora")
        if not isinstance(self.trigger, str) or len(self.trigger) > 200 or "\n" in self.trigger:
            raise ConfigError("trigger", "must be a single line of at most 200 characters")
        if self.checkpoints not in ("all", "final"):
            if not isinstance(self.checkpoints, list) or not self.checkpoints:
                raise ConfigError("checkpoints", "must be \"all\", \"final\" or a non-empty list of file names")
            for c in self.checkpoints:
                if not isinstance(c, str) or not c.endswith(".safetensors"):
                    raise ConfigError("checkpoints", f"{c!r} is not a .safetensors file name")
                validate_name(c[:-len(".safetensors")], "checkpoints")
        _list("prompts", self.prompts, str, 1, 20)
        for p in self.prompts:
            if not p.strip() or len(p) > 500:
                raise ConfigError("prompts", "every prompt must be non-empty text of at most 500 characters")
        _list("seeds", self.seeds, int, 1, 8)
        if any(s < 0 or s >= 2**32 for s in self.seeds):
            raise ConfigError("seeds", "seeds must be between 0 and 2**32 - 1")
        _list("strengths", self.strengths, (int, float), 1, 6)
        if any(not math.isfinite(s) or s <= 0 or s > 2 for s in self.strengths):
            raise ConfigError("strengths", "strengths must be > 0 and <= 2")
        for key in ("width", "height"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or (v and (v < 64 or v > 2048 or v % 64)):
                raise ConfigError(key, f"must be 0 (the model's size) or a multiple of 64 from 64 to 2048, got {v!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= 150:
            raise ConfigError("steps", f"must be an integer from 1 to 150, got {self.steps!r}")
        if not isinstance(self.sampler, str) or not self.sampler.strip():
            raise ConfigError("sampler", "must be a sampler name")
        return self


def _list(name, value, kind, lo, hi):
    if not isinstance(value, list) or not lo <= len(value) <= hi:
        raise ConfigError(name, f"must be a list of {lo} to {hi} items")
    if any(isinstance(v, bool) or not isinstance(v, kind) for v in value):
        raise ConfigError(name, f"every item must be {'text' if kind is str else 'a number'}")


@dataclass
class Checkpoint:
    file: str          # file name
    path: str
    step: int
    final: bool = False


def read_metadata(path):
    """The ``__metadata__`` of a safetensors file (header only; no tensor is read)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ConfigError("checkpoints", f"{os.path.basename(path)} is not a readable safetensors file ({e})") from e
    return header.get("__metadata__", {}) or {}


def lora_arch(metadata):
    version = metadata.get("ss_base_model_version", "")
    for prefix, arch in ARCH_OF_VERSION.items():
        if version.startswith(prefix):
            return arch
    return None


def find_checkpoints(lora_dir, name):
    """Intermediate checkpoints ordered by step, then the final file. Nothing outside ``lora_dir``."""
    validate_name(name, "lora")
    found = []
    folder = os.path.join(lora_dir, f"{name}_checkpoints")
    if os.path.isdir(folder):
        for f in os.listdir(folder):
            m = _STEP.search(f)
            if f.startswith(name + "-step") and m and os.path.isfile(os.path.join(folder, f)):
                found.append(Checkpoint(f, os.path.join(folder, f), int(m.group(1))))
    found.sort(key=lambda c: c.step)
    final = os.path.join(lora_dir, f"{name}.safetensors")
    if os.path.isfile(final):
        steps = read_metadata(final).get("ss_steps", "")
        found.append(Checkpoint(f"{name}.safetensors", final, int(steps) if steps.isdigit() else 0, final=True))
    return found


def select_checkpoints(cfg, lora_dir, host_arch):
    available = find_checkpoints(lora_dir, cfg.lora)
    if not available:
        raise ConfigError("lora", f"no LoRA named '{cfg.lora}' in the Lora folder")
    if cfg.checkpoints == "all":
        files = {c.file for c in available}  # a final file promoted from a checkpoint would be tested twice
        chosen = [c for c in available if not (c.final and read_metadata(c.path).get("charlora_promoted_from") in files)]
    elif cfg.checkpoints == "final":
        chosen = [c for c in available if c.final]
        if not chosen:
            raise ConfigError("checkpoints", f"'{cfg.lora}' has only intermediate checkpoints, no final file")
    else:
        by_file = {c.file: c for c in available}
        missing = [f for f in cfg.checkpoints if f not in by_file]
        if missing:
            raise ConfigError("checkpoints", f"not checkpoints of '{cfg.lora}': {', '.join(missing)}; "
                                             f"available: {', '.join(by_file)}")
        chosen = [by_file[f] for f in dict.fromkeys(cfg.checkpoints)]
    for c in chosen:
        md = read_metadata(c.path)
        if md.get("ss_output_name", cfg.lora) != cfg.lora:
            raise ConfigError("checkpoints", f"{c.file} belongs to the LoRA '{md['ss_output_name']}', not '{cfg.lora}'")
        arch = lora_arch(md)
        if arch and arch != host_arch:
            raise UnsupportedModelError(f"{c.file} was trained for {arch.upper()}; the loaded checkpoint is "
                                        f"{host_arch.upper()} — load a {arch.upper()} checkpoint to test it")
    return chosen


def prompt_text(prompt, trigger):
    """The prompt as generated (``{trigger}`` filled in; the trigger put first when it is absent)."""
    if "{trigger}" in prompt:
        return prompt.replace("{trigger}", trigger)
    return f"{trigger}, {prompt}" if trigger and trigger not in prompt else prompt


def without_trigger(prompt, trigger):
    """What the picture should show apart from the character (for prompt fidelity)."""
    text = prompt.replace("{trigger}", "a character")
    if trigger:
        text = re.sub(rf"(?<!\w){re.escape(trigger)}(?!\w)", "a character", text)
    return re.sub(r"\s+", " ", text).strip(" ,")


@dataclass
class EvalResult:
    status: str                                   # "done" or "cancelled"
    grid_paths: list = field(default_factory=list)
    scores: list = field(default_factory=list)    # dicts: checkpoint, step, strength, identity, ...
    best: Optional[dict] = None
    embedder: str = ""
    report_path: Optional[str] = None
    warnings: list = field(default_factory=list)
    trigger: str = ""

    def to_dict(self):
        return {"status": self.status, "grid_paths": list(self.grid_paths), "scores": list(self.scores),
                "best": self.best, "embedder": self.embedder, "report_path": self.report_path,
                "trigger": self.trigger, "warnings": list(self.warnings)}


def pick_best(scores, margin=FIDELITY_MARGIN):
    """The recommended (checkpoint, strength).

    Rule: among the rows whose prompt fidelity stays within ``margin`` of the baseline
    (``prompt_fidelity_delta >= -margin``), the highest identity lift; ties go to fewer steps, then the
    lower strength (less is less likely to overfit). When every row falls below the margin ("all
    overfit"), the row that keeps the most prompt fidelity, ties again to fewer steps and lower
    strength, with a note. Without scores: the final file at strength 1.0 (or the last checkpoint).
    """
    rows = [s for s in scores if s.get("identity_lift") is not None and s.get("prompt_fidelity_delta") is not None]
    if not rows:
        if not scores:
            return None
        last = max(scores, key=lambda s: (s.get("final", False), s["step"], -abs(s["strength"] - 1.0)))
        return {"checkpoint": last["checkpoint"], "strength": last["strength"],
                "reason": "no scores (the embedder was unavailable): the final file at full strength"}
    fine = [s for s in rows if s["prompt_fidelity_delta"] >= -margin]
    if fine:
        best = max(fine, key=lambda s: (round(s["identity_lift"], 6), -s["step"], -s["strength"]))
        reason = (f"highest identity lift ({best['identity_lift']:+.3f}) while prompt fidelity stays within "
                  f"{margin} of the baseline")
    else:
        best = max(rows, key=lambda s: (round(s["prompt_fidelity_delta"], 6), -s["step"], -s["strength"]))
        reason = ("every checkpoint loses prompt fidelity (overfit): the least overfit one is suggested — "
                  "train fewer steps or with a lower learning rate")
    return {"checkpoint": best["checkpoint"], "strength": best["strength"], "reason": reason}


def _mean_cos(a, b):
    return float((a @ b.T).mean())


class Evaluator:
    """Runs one evaluation. ``host.generate(prompt, seed, width, height, steps, sampler, lora)`` gives a
    PIL picture, ``lora`` = (checkpoint path, strength) or None. ``embedders`` = (identity, text) embedders
    or None; ``training_pictures`` = PIL pictures of the character."""

    def __init__(self, host, cfg, lora_dir, out_dir, training_pictures=(), embedders=None, embedder_note="",
                 cancel=None, progress=None):
        self.host, self.cfg, self.lora_dir, self.out_dir = host, cfg, lora_dir, out_dir
        self.training_pictures = list(training_pictures)
        self.identity_embedder, self.text_embedder = embedders or (None, None)
        self.embedder_note = embedder_note
        self.cancel, self.progress = cancel, progress

    def plan(self):
        cfg = self.cfg.validate()
        checkpoints = select_checkpoints(cfg, self.lora_dir, self.host.arch)
        columns = [(p, s) for p in cfg.prompts for s in cfg.seeds]
        total = len(columns) * (1 + len(checkpoints) * len(cfg.strengths))
        if total > MAX_PICTURES:
            raise ConfigError("prompts", f"this evaluation would make {total} pictures; at most {MAX_PICTURES} — "
                                         "use fewer checkpoints, prompts, seeds or strengths")
        trigger = cfg.trigger or read_metadata(checkpoints[-1].path).get("modelspec.trigger_phrase", cfg.lora)
        size = SIZE_OF_ARCH[self.host.arch]
        return checkpoints, columns, total, trigger, (cfg.width or size, cfg.height or size)

    def run(self):
        checkpoints, columns, total, trigger, (width, height) = self.plan()
        cfg, done = self.cfg, [0]  # nothing is written before every picture is made (a cancel leaves nothing)

        def picture(prompt, seed, lora):
            if self.cancel is not None and self.cancel.requested:
                raise _Cancelled()
            image = self.host.generate(prompt_text(prompt, trigger), seed, width, height, cfg.steps, cfg.sampler, lora)
            done[0] += 1
            if self.progress:
                self.progress(done[0], total)
            return image

        try:
            baseline = [picture(p, s, None) for p, s in columns]
            rows = {}
            for c in checkpoints:
                rows[c.file] = [(strength, [picture(p, s, (c.path, strength)) for p, s in columns])
                                for strength in cfg.strengths]
        except _Cancelled:
            return EvalResult("cancelled")
        finally:
            getattr(self.host, "release", lambda: None)()
        result = EvalResult("done", trigger=trigger)
        labels = [f"{prompt_text(p, trigger)} · seed {s}" for p, s in columns]
        cell = (width, height) if max(width, height) <= 256 else (256, round(256 * height / width))
        for c in checkpoints:
            grid = make_grid([("without LoRA", baseline)] + [(f"{c.file[:-len('.safetensors')]} @ {st:g}", ims)
                                                            for st, ims in rows[c.file]], labels, cell)
            path = _save_png(grid, os.path.join(self.out_dir, f"{c.file[:-len('.safetensors')]}-grid.png"))
            result.grid_paths.append(path)
            for st, ims in rows[c.file]:
                for (p, s), im in zip(columns, ims):
                    _save_png(im, os.path.join(self.out_dir, "images", f"{c.file[:-len('.safetensors')]}-{st:g}-"
                                                                       f"{_slug(p)}-{s}.png"))
        for (p, s), im in zip(columns, baseline):
            _save_png(im, os.path.join(self.out_dir, "images", f"baseline-{_slug(p)}-{s}.png"))
        result.embedder, result.scores = self._scores(checkpoints, columns, baseline, rows, trigger)
        if result.embedder.startswith("unavailable"):
            result.warnings.append(f"scores {result.embedder}")
        result.best = pick_best(result.scores)
        result.report_path = os.path.join(self.out_dir, "report.json")
        _write_json(result.report_path, {"lora": cfg.lora, "trigger": trigger, "width": width, "height": height,
                                         "steps": cfg.steps, "sampler": cfg.sampler, "prompts": cfg.prompts,
                                         "seeds": cfg.seeds, "strengths": cfg.strengths,
                                         "checkpoints": [{"file": c.file, "step": c.step, "final": c.final}
                                                         for c in checkpoints],
                                         "grid_rows": ["without LoRA"] + [f"{s:g}" for s in cfg.strengths],
                                         "grid_columns": labels, **result.to_dict()})
        return result

    def _scores(self, checkpoints, columns, baseline, rows, trigger):
        empty = [{"checkpoint": c.file, "step": c.step, "final": c.final, "strength": st, "identity": None,
                  "identity_lift": None, "prompt_fidelity": None, "prompt_fidelity_delta": None}
                 for c in checkpoints for st, _ in rows[c.file]]
        ident, text = self.identity_embedder, self.text_embedder
        if ident is None or text is None:
            return self.embedder_note or "unavailable: no embedder", empty
        if not self.training_pictures:
            return "unavailable: the training pictures are not available for the identity score", empty
        reference = ident.images(self.training_pictures)
        prompts = text.texts([without_trigger(p, trigger) for p, _ in columns])

        def score(images):
            emb_id = ident.images(images)
            emb_t = emb_id if text is ident else text.images(images)
            fidelity = float((emb_t * prompts).sum(dim=1).mean())
            return _mean_cos(emb_id, reference), fidelity

        base_id, base_fid = score(baseline)
        out = []
        for c in checkpoints:
            for st, ims in rows[c.file]:
                identity, fidelity = score(ims)
                out.append({"checkpoint": c.file, "step": c.step, "final": c.final, "strength": st,
                            "identity": round(identity, 6), "identity_lift": round(identity - base_id, 6),
                            "prompt_fidelity": round(fidelity, 6), "prompt_fidelity_delta": round(fidelity - base_fid, 6)})
        return getattr(ident, "name", "embedder"), out


class _Cancelled(Exception):
    pass


def _slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "prompt"


def _save_png(image, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _write_json(path, data):
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
