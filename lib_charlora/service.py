"""Training requests -> validated, intake-checked jobs. Shared by the HTTP API and the WebUI tab.

Everything that can be checked is checked *before* a job is queued (fields, name, existing file,
pictures decodable and at least 5), so a bad request gets a clear message at once and nothing is
queued, written or touched.
"""
import base64
import binascii
import os
import threading
import time
from dataclasses import dataclass, field

from .engine import TrainConfig, export
from .engine.config import validate_name
from .engine.dataset import DatasetError, TooManyPictures, load_folder, load_uploads
from .engine.embedders import DEFAULT_CLIP, load_clip, load_face_embedder
from .engine.errors import CharLoraError, ConfigError, UnsupportedModelError
from .engine.evaluate import EvalConfig, Evaluator, find_checkpoints
from .engine.presets import preset
from .engine.trainer import Trainer
from .jobs import JobRunner
from . import limits

# request field -> (TrainConfig field, type check)
_NUMERIC = {"steps": int, "rank": int, "alpha": (int, float), "learning_rate": (int, float),
            "text_encoder_lr": (int, float), "resolution": int, "batch_size": int, "seed": int, "sample_every": int,
            "save_every": int, "checkpoint_count": int}
_BOOL = ("train_text_encoder", "overwrite", "keep_checkpoints")
_FIELDS = {"name", "trigger", "images", "image_dir", "captions", "preset", *_NUMERIC, *_BOOL}
_EVAL_FIELDS = {"lora", "trigger", "checkpoints", "prompts", "seeds", "strengths", "steps", "width", "height",
                "sampler", "images", "image_dir"}
REFERENCE_DIR = "reference"     # <outputs>/<name>/reference/: training pictures kept for the identity score
MAX_REFERENCES = 16


@dataclass
class TrainSpec:
    config: TrainConfig
    images: list
    report: dict
    model: tuple = ()          # (arch, prediction) the request was validated for
    keep_checkpoints: bool = None   # None: the Settings' choice
    resume_from: str = None    # a checkpoint's .state file to continue from (CLI --resume)


@dataclass
class EvalSpec:
    config: EvalConfig
    references: list = field(default_factory=list)   # training pictures (PIL) for the identity score
    model: tuple = ()
    pictures: int = 0


def _b64(value, index):
    if not isinstance(value, str):
        raise ConfigError(f"images[{index}]", "must be a base64 string")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ConfigError(f"images[{index}]", f"is not valid base64 ({e})") from e


class TrainService:
    """``host_factory()`` gives the loaded model's host when a request is checked; ``job_host_factory()``
    (default: the same) when the job runs, under the lock (Forge loads the selected checkpoint then)."""

    def __init__(self, host_factory, lora_dir, lock=None, state=None, latent_cache_dir=None, caption_provider=None,
                 settings=None, tasks=None, job_host_factory=None, total_progress=None, outputs_dir=None,
                 embedder_factory=None, on_preview=None, parallel=None, defaults=None):
        self.defaults = dict(defaults or {})  # over every preset (the standalone demo's small model: small runs)
        self.on_preview = on_preview  # (job, step, picture): the CLI saves every preview
        self.parallel = parallel      # several processes (accelerate): one writes files
        self.host_factory, self.base_lora_dir, self.state = host_factory, lora_dir, state
        self.outputs_dir = outputs_dir or os.path.join(os.path.dirname(os.path.abspath(lora_dir)), "charlora-tests")
        self.embedder_factory = embedder_factory  # () -> (embedder, None) or (None, "unavailable: ...")
        self._clip = None
        self.total_progress = total_progress  # the WebUI's console "Total progress" bar (previews advance it)
        self.job_host_factory = job_host_factory or host_factory
        self.tasks = tasks  # the WebUI's progress module: add_task_to_queue / start_task / finish_task
        self.settings = settings or (lambda: {})
        self.latent_cache_dir, self.caption_provider = latent_cache_dir, caption_provider
        self.runner = JobRunner(self._run, lock, keep=lambda: self.limits()["jobs_kept"])
        self._submitting = threading.Lock()
        folders = [lora_dir]
        try:
            folders.append(self.lora_dir)  # the Settings' sub-folder
        except Exception:  # noqa: BLE001 - a bad sub-folder is refused when a training is sent
            pass
        # a save a killed process left unfinished (one process of a parallel run writes files, and cleans)
        main = parallel is None or parallel.is_main
        self.removed_temporaries = _remove_stale_temporaries(dict.fromkeys(folders)) if main else []

    # -- requests ----------------------------------------------------------------------------------
    def limits(self):
        """What one request may carry (``limits.LIMITS``), from the Settings."""
        return limits.values(self.settings())

    def parse(self, body, files=None, intake=None):
        """JSON body -> TrainSpec, or ConfigError / DatasetError naming the problem.

        ``files`` ([(name, bytes, caption)]) replaces ``images`` / ``image_dir`` (the WebUI tab's uploads);
        ``intake(resolution) -> (images, report dict)`` replaces both (a cast's shared LoRA).
        """
        if not isinstance(body, dict):
            raise ConfigError("body", "must be a JSON object")
        unknown = sorted(set(body) - _FIELDS)
        if unknown:
            raise ConfigError(unknown[0], f"unknown field; known fields: {', '.join(sorted(_FIELDS))}")
        name = validate_name(body.get("name"))
        self._refuse_if_busy(name)
        trigger = body.get("trigger", name)
        if not isinstance(trigger, str) or not trigger.strip():
            raise ConfigError("trigger", "must be a non-empty string")
        for key, kind in _NUMERIC.items():
            if key in body and (isinstance(body[key], bool) or not isinstance(body[key], kind)):
                raise ConfigError(key, f"must be {'an integer' if kind is int else 'a number'}, got {body[key]!r}")
        for key in _BOOL:
            if key in body and not isinstance(body[key], bool):
                raise ConfigError(key, f"must be true or false, got {body[key]!r}")
        host = self.host_factory()
        settings = self.settings()
        values = {**preset(body.get("preset", settings.get("default_preset", "balanced")), host.arch, host.prediction),
                  **self.defaults}
        for key in (*_NUMERIC, *_BOOL):
            if key in body and key not in ("keep_checkpoints", "checkpoint_count"):
                values["preview_every" if key == "sample_every" else key] = body[key]
        count = body.get("checkpoint_count", 0)
        if not 0 <= count <= 20:
            raise ConfigError("checkpoint_count", f"must be from 0 to 20, got {count}")
        if count and not body.get("save_every"):  # evenly spaced checkpoints to test and compare
            values["save_every"] = max(1, -(-values["steps"] // (count + 1)))
        notes = []
        if not host.supports_text_encoder_training and values.get("train_text_encoder"):
            values["train_text_encoder"] = False
            notes.append("the text encoder is not trained in this WebUI's memory mode (--medvram): UNet only")
        cfg = TrainConfig(name=name, trigger=trigger.strip(), **values).validate()
        if os.path.exists(os.path.join(self.lora_dir, name + ".safetensors")) and not cfg.overwrite:
            raise ConfigError("name", f"a LoRA named '{name}' already exists; choose another name or set overwrite")
        if intake is not None:
            images, report = intake(cfg.resolution)
        elif files is not None:
            if body.get("images") is not None or body.get("image_dir") is not None:
                raise ConfigError("images", "give either uploaded pictures or a folder, not both")
            limit = self.limits()
            self._check_count(len(files), limit)
            self._check_captions([c for _, _, c in files], limit)
            images, report = _usable(*load_uploads(files, cfg.resolution,
                                                   max_pixels=limit["max_megapixels"] * 10**6))
        else:
            images, report = self._intake(body, cfg.resolution)
        report["warnings"] = notes + list(report["warnings"])
        return TrainSpec(cfg, images, report, (host.arch, host.prediction), body.get("keep_checkpoints"))

    def _refuse_if_busy(self, name):
        busy = [j for j in self.runner.list() if j.kind == "train" and j.name == name and j.status in ("queued", "running")]
        if busy:  # a second click or request for the same LoRA while the first is under way
            raise ConfigError("name", f"a training of '{name}' is already {busy[0].status}; wait for it to end "
                                      "or stop it first")

    def resolution(self, preset_name=None):
        """The training resolution of a preset on the loaded model (what pictures are checked against)."""
        host = self.host_factory()
        values = preset(preset_name or self.settings().get("default_preset", "balanced"), host.arch, host.prediction)
        return {**values, **self.defaults}["resolution"]

    def _intake(self, body, resolution):
        has_images, has_dir = body.get("images") is not None, body.get("image_dir") is not None
        if has_images == has_dir:
            raise ConfigError("images", "give either 'images' (base64 pictures) or 'image_dir' (a folder on the server)")
        limit = self.limits()
        if has_dir:
            if not isinstance(body["image_dir"], str) or not body["image_dir"] or "\0" in body["image_dir"]:
                raise ConfigError("image_dir", "must be a folder path")
            if body.get("captions") is not None:
                raise ConfigError("captions", "captions go with 'images'; a folder uses .txt sidecar files")
            try:
                images, report = load_folder(body["image_dir"], resolution, max_pixels=limit["max_megapixels"] * 10**6,
                                             max_pictures=limit["max_pictures"])
            except TooManyPictures as e:
                raise limits.over("max_pictures", "image_dir", f"more than {e.limit} pictures in the folder",
                                  e.limit) from e
            except DatasetError as e:
                raise ConfigError("image_dir", str(e)) from e
        else:
            pics = body["images"]
            if not isinstance(pics, list) or not pics:
                raise ConfigError("images", "must be a non-empty list of base64-encoded pictures")
            self._check_count(len(pics), limit)
            caps = body.get("captions")
            if caps is not None and (not isinstance(caps, list) or len(caps) != len(pics)
                                     or not all(c is None or isinstance(c, str) for c in caps)):
                raise ConfigError("captions", f"must be a list of {len(pics)} strings (or nulls), one per picture")
            caps = caps or [None] * len(pics)
            self._check_captions(caps, limit)
            files, total = [], 0
            for i, (p, c) in enumerate(zip(pics, caps)):
                data = _b64(p, i)
                total += len(data)
                if total > limit["max_decoded_mb"] * 2**20:
                    raise limits.over("max_decoded_mb", "images", f"{total / 2**20:.0f} MB of picture data by "
                                      f"picture {i + 1}", limit["max_decoded_mb"], 413)
                _check_pixels(data, i, limit)
                files.append((f"image {i + 1}", data, c))
            images, report = load_uploads(files, resolution, max_pixels=limit["max_megapixels"] * 10**6)
        return _usable(images, report)

    @staticmethod
    def _check_count(count, limit):
        if count > limit["max_pictures"]:
            raise limits.over("max_pictures", "images", f"{count} pictures", limit["max_pictures"])

    @staticmethod
    def _check_captions(captions, limit):
        for i, c in enumerate(captions):
            if c is not None and len(c) > limit["max_caption_chars"]:
                raise limits.over("max_caption_chars", f"captions[{i}]", f"a caption of {len(c)} characters",
                                  limit["max_caption_chars"])

    def submit(self, body, files=None, task_id=None):
        spec = self.parse(body, files)
        output_dir = self.lora_dir
        with self._submitting:  # two clicks checked side by side both passed parse's check: one of them is queued
            self._refuse_if_busy(spec.config.name)
            if task_id and self.tasks is not None:
                self.tasks.add_task_to_queue(task_id)  # the WebUI's progress bar shows it as queued
            job = self.runner.submit(spec.config.name, spec, task_id=task_id, output_dir=output_dir)
        job.total_steps = spec.config.steps
        job.lora_name = spec.config.name
        job.warnings += spec.report["warnings"] + [f"{f['name']}: {w}" for f in spec.report["files"]
                                                   for w in f["warnings"]]
        return job

    def parse_evaluation(self, body):
        """JSON body -> EvalSpec: the LoRA and its checkpoints exist, fit the loaded model's kind, and the
        grid stays under the picture cap; training pictures from the body or kept at training time."""
        if not isinstance(body, dict):
            raise ConfigError("body", "must be a JSON object")
        unknown = sorted(set(body) - _EVAL_FIELDS)
        if unknown:
            raise ConfigError(unknown[0], f"unknown field; known fields: {', '.join(sorted(_EVAL_FIELDS))}")
        cfg = EvalConfig(lora=body.get("lora"), **{k: body[k] for k in _EVAL_FIELDS - {"lora", "images", "image_dir"}
                                                   if k in body})
        host = self.host_factory()
        if body.get("images") is not None or body.get("image_dir") is not None:
            images, _ = self._intake(body, 512)
            references = [im.image for im in images]
        else:
            references = _read_references(self._references_dir(cfg.lora))
        _, _, total, _, _ = Evaluator(host, cfg, self.lora_dir, "").plan()
        return EvalSpec(cfg, references, (host.arch, host.prediction), total)

    def submit_evaluation(self, body, task_id=None):
        spec = self.parse_evaluation(body)
        if task_id and self.tasks is not None:
            self.tasks.add_task_to_queue(task_id)
        job = self.runner.submit(spec.config.lora, spec, kind="evaluate", task_id=task_id, output_dir=self.lora_dir)
        job.total_steps, job.lora_name = spec.pictures, spec.config.lora
        if not spec.references:
            job.warnings.append("no training pictures were kept or given: the identity score is unavailable")
        return job

    def promote(self, body):
        """Make a checkpoint of a LoRA its main file (``{"lora", "checkpoint", "strength"}``) -> metadata."""
        if not isinstance(body, dict):
            raise ConfigError("body", "must be a JSON object")
        unknown = sorted(set(body) - {"lora", "checkpoint", "strength"})
        if unknown:
            raise ConfigError(unknown[0], "unknown field; known fields: checkpoint, lora, strength")
        name = validate_name(body.get("lora"), "lora")
        strength = body.get("strength", 1.0)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 2:
            raise ConfigError("strength", f"must be a number > 0 and <= 2, got {strength!r}")
        checkpoint = body.get("checkpoint")
        by_file = {c.file: c.path for c in find_checkpoints(self.lora_dir, name) if not c.final}
        trained = os.path.join(self.lora_dir, f"{name}_checkpoints", f"{name}-final.safetensors")
        if os.path.isfile(trained):  # the trained file, kept by an earlier promote: promoting it undoes that
            by_file[os.path.basename(trained)] = trained
        if checkpoint not in by_file:
            raise ConfigError("checkpoint", f"{checkpoint!r} is not an intermediate checkpoint of '{name}'; "
                                            f"available: {', '.join(by_file) or 'none'}")
        busy = [j for j in self.runner.list() if j.name == name and j.kind == "train"
                and j.status in ("queued", "running")]
        if busy:
            raise ConfigError("lora", f"a training of '{name}' is {busy[0].status}; promote when it has ended")
        metadata = export.promote(self.lora_dir, name, by_file[checkpoint], strength,
                                  note=f"promoted {checkpoint} at strength {strength:g}")
        notes = []
        try:
            note = getattr(self.host_factory(), "refresh_lora_list", lambda: None)()
            notes += [note] if note else []
        except CharLoraError as e:
            notes.append(f"the Lora list was not refreshed ({e}); press Refresh on the Lora cards")
        return {"lora": name, "path": export.output_path(self.lora_dir, name), "ss_steps": metadata.get("ss_steps"),
                "promoted_from": checkpoint, "preferred_weight": strength, "warnings": notes}

    @property
    def lora_dir(self):
        """The WebUI's Lora folder, or the sub-folder chosen in Settings."""
        sub = (self.settings().get("subfolder") or "").strip().strip("/\\")
        if not sub:
            return self.base_lora_dir
        parts = sub.replace("\\", "/").split("/")
        if any(p in ("", ".", "..") for p in parts) or os.path.isabs(sub):
            raise ConfigError("subfolder", f"the output sub-folder {sub!r} must be a plain relative folder name")
        return os.path.join(self.base_lora_dir, *parts)

    # -- the worker ----------------------------------------------------------------------------------
    def _run(self, job):
        spec = job.spec
        state = self.state
        if state is not None:
            if hasattr(state, "begin"):
                state.begin(job=f"charlora-{job.kind}")
            count = spec.config.steps if job.kind == "train" else spec.pictures
            state.job, state.job_count, state.job_no = f"charlora-{job.kind}", count, 0
        if job.task_id and self.tasks is not None:
            self.tasks.start_task(job.task_id)
        try:
            host = self.job_host_factory()
            if spec.model and (host.arch, host.prediction) != spec.model:
                raise UnsupportedModelError(
                    f"the loaded checkpoint changed since the request was checked ({_kind(*spec.model)} -> "
                    f"{_kind(host.arch, host.prediction)}); its settings may not fit: send the training again")
            return (self._train if job.kind == "train" else self._evaluate)(job, host, state)
        finally:
            if job.task_id and self.tasks is not None:
                self.tasks.finish_task(job.task_id)
            if state is not None and hasattr(state, "end"):
                state.end()
            if self.total_progress is not None:
                self.total_progress.clear()  # as the WebUI's own API does after a job

    def _train(self, job, host, state):
        spec = job.spec

        def progress(p):
            job.step, job.loss, job.eta_seconds, job.peak_memory_mb = p.step, p.loss, p.eta, p.memory_mb
            if p.loss is not None and (not job.loss_history or job.loss_history[-1][1] != p.loss):
                job.loss_history.append((p.step, p.loss))
            if state is not None:
                state.job_no = p.step
                loss = "-" if p.loss is None else f"{p.loss:.4f}"  # no ETA here: the WebUI's bar adds its own
                state.textinfo = f"Character LoRA '{spec.config.name}': step {p.step}/{p.total}, loss {loss}"
                if getattr(state, "interrupted", False):  # the WebUI's Interrupt button: stop and save
                    job.cancel.stop(save=True)

        def preview(step, image):
            job.preview = image
            if self.on_preview is not None:
                self.on_preview(job, step, image)
            if state is not None and hasattr(state, "assign_current_image"):
                state.assign_current_image(image)  # the WebUI's live preview

        trainer = Trainer(host, spec.config, spec.images, job.output_dir, progress=progress, cancel=job.cancel,
                          on_preview=preview,
                          caption_provider=self.caption_provider, latent_cache_dir=self.latent_cache_dir,
                          parallel=self.parallel)
        result = trainer.run(resume_from=spec.resume_from)
        job.peak_memory_mb = result.peak_memory_mb
        if self.parallel is not None and not self.parallel.is_main:
            return result
        keep = spec.keep_checkpoints if spec.keep_checkpoints is not None else self.settings().get("keep_checkpoints")
        if result.status == "done" and not keep:
            _remove_checkpoints(trainer.checkpoint_dir, spec.config.name)
        if result.path:
            _keep_references(self._references_dir(spec.config.name), spec.images)
        job.warnings += [w for w in trainer.warnings + list(getattr(host, "warnings", ())) if w not in job.warnings]
        if result.path:
            try:
                note = getattr(host, "refresh_lora_list", lambda: None)()
            except Exception as e:  # noqa: BLE001 - the file is written: the job keeps it and says what to do
                note = f"the Lora list was not refreshed ({type(e).__name__}: {e}); press Refresh on the Lora cards"
            if note:
                job.warnings.append(note)
        return result


    def _evaluate(self, job, host, state):
        spec, cfg = job.spec, job.spec.config
        identity, text, note = self._embedders(spec.references)

        def progress(done, total):
            job.step, job.total_steps = done, total
            if state is not None:
                state.job_no = done
                state.textinfo = f"Character LoRA: testing '{cfg.lora}', picture {done}/{total}"
                if getattr(state, "interrupted", False):
                    job.cancel.stop(save=False)

        out = os.path.join(self.outputs_dir, cfg.lora, f"test-{time.strftime('%Y%m%d-%H%M%S')}-{job.id.split('-')[0]}")
        return Evaluator(host, cfg, self.lora_dir, out, spec.references, (identity, text), note, job.cancel,
                         progress).run()

    def _references_dir(self, name):
        return os.path.join(self.outputs_dir, name, REFERENCE_DIR)

    def _embedders(self, references):
        """(identity embedder, text embedder, note): CLIP for both, loaded once; a face embedder for
        identity when one is installed and finds faces in most training pictures."""
        if self._clip is None or self._clip[0] is None:
            factory = self.embedder_factory or (
                lambda: load_clip(self.settings().get("clip_model") or DEFAULT_CLIP))
            self._clip = factory()
        clip, note = self._clip
        if clip is None:
            return None, None, note
        face = load_face_embedder() if references else None
        if face is not None:
            face.images(references)
            if sum(face.found) * 2 > len(references):
                return face, clip, None
        return clip, clip, None


def _keep_references(directory, images):
    """A few training pictures (small) beside the checkpoints, for the identity score of later tests."""
    import shutil
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory, exist_ok=True)
    for i, im in enumerate(images[:MAX_REFERENCES]):
        picture = im.image.copy()
        picture.thumbnail((384, 384))
        picture.convert("RGB").save(os.path.join(directory, f"{i:02d}.png"))


def _read_references(directory):
    from PIL import Image
    if not os.path.isdir(directory):
        return []
    out = []
    for f in sorted(os.listdir(directory)):
        if f.endswith(".png"):
            with Image.open(os.path.join(directory, f)) as im:
                out.append(im.convert("RGB"))
    return out


def _check_pixels(data, index, limit):
    """A picture over the pixel limit is refused from its header, before it is decoded."""
    import io
    import warnings

    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError:
        raise limits.over("max_megapixels", f"images[{index}]", "a picture", limit["max_megapixels"]) from None
    except Exception:
        return  # not a picture: the intake report says so
    if w * h > limit["max_megapixels"] * 10**6:
        raise limits.over("max_megapixels", f"images[{index}]", f"{w}x{h} = {w * h / 1e6:.0f} megapixels",
                          limit["max_megapixels"])


def _kind(arch, prediction):
    return {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}[arch] + (" v-prediction" if prediction == "v" else "")


def _usable(images, report):
    if report.errors:
        raise DatasetError("; ".join(report.errors), report)
    return images, report.to_dict()


TEMPORARY_SUFFIXES = (".safetensors.tmp", ".preview.png.tmp", ".json.tmp", ".state.tmp")


def _remove_stale_temporaries(folders):
    """Our own temporary files (``<x>.safetensors.tmp``, ``<x>.preview.png.tmp``, ``<x>.json.tmp``,
    ``<x>.state.tmp``) that a process killed while saving left in the Lora folders and their
    ``<name>_checkpoints`` folders; nothing else is touched. -> the removed paths."""
    removed = []

    def files(folder):
        try:
            with os.scandir(folder) as it:
                return list(it)
        except OSError:
            return []
    for folder in folders:
        entries = files(folder)
        entries += [e for d in entries if d.name.endswith("_checkpoints") and d.is_dir(follow_symlinks=False)
                    for e in files(d.path)]
        for e in entries:
            suffix = next((s for s in TEMPORARY_SUFFIXES if e.name.endswith(s)), None)
            if suffix and len(e.name) > len(suffix) and e.is_file(follow_symlinks=False):
                try:
                    os.remove(e.path)
                    removed.append(e.path)
                except OSError:
                    pass
    if removed:
        print(f"Character LoRA: removed {len(removed)} unfinished file(s) an interrupted save left: "
              + ", ".join(removed), flush=True)
    return removed


def _remove_checkpoints(directory, name):
    """Intermediate checkpoints of a finished run (inside the Lora folder they would show as cards)."""
    if not os.path.isdir(directory):
        return
    for f in os.listdir(directory):
        if f.startswith(name + "-step") and f.endswith((".safetensors", ".state")):
            os.remove(os.path.join(directory, f))
    if not os.listdir(directory):
        os.rmdir(directory)
