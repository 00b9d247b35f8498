"""Request and response models of the /charlora/v1 API, for pydantic 1.10 (A1111, reForge) and 2.8 (Forge).

A request is checked against its model first (unknown fields, ranges, list sizes: what ``/docs`` shows),
then by the service (types strictly, names, files, pictures) with the same error shape. Ranges here are
the ones ``TrainConfig.validate`` / ``EvalConfig.validate`` enforce; tests/test_api_schema.py checks that
every documented bound is accepted and every value just past it refused.
"""
import copy
from typing import List, Literal, Optional, Union

import pydantic
from pydantic import BaseModel, Field, StrictBool, StrictStr, confloat, conint, conlist, constr

from .engine.config import validate_name
from .engine.errors import ConfigError
from .engine.presets import PRESETS, preset

V2 = pydantic.VERSION.startswith("2")
NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")


def _field(default=None, description=""):
    return Field(default, description=description)


def Int(lo, hi, multiple_of=None):
    return conint(strict=True, ge=lo, le=hi, multiple_of=multiple_of)


def Num(hi, gt=None, ge=None):
    return confloat(gt=gt, ge=ge, le=hi)


def Text(max_length=None, min_length=None, pattern=None):
    extra = {"pattern" if V2 else "regex": pattern} if pattern else {}
    return constr(strict=True, min_length=min_length, max_length=max_length, **extra)


def Items(item, lo=None, hi=None):
    return conlist(item, **{"min_length" if V2 else "min_items": lo, "max_length" if V2 else "max_items": hi})


def _preset_default(key):
    """A field's default on SD1.x per preset, for the description."""
    values = {name: preset(name, "sd1")[key] for name in PRESETS}
    return "Default: the preset's value (SD1.x: " + ", ".join(f"{n} {v}" for n, v in values.items()) + ")."


class _Request(BaseModel):
    if V2:
        model_config = {"extra": "forbid"}
    else:
        class Config:
            extra = "forbid"


class _Response(BaseModel):
    pass


_PICTURES = ("Pictures as base64 strings (a data: URL prefix is allowed); PNG, JPEG, WebP, BMP, TIFF or GIF. "
             "Give either this or image_dir. At most 'Most pictures in one training request' pictures "
             "(Settings, default 1000), each at most 'Largest picture (megapixels)' (default 100).")
_FOLDER = ("A folder on the server with the pictures and .txt caption files (kohya 'N_name' sub-folders read as "
           "N repeats; links out of the folder are not followed). Refused (403) on a WebUI reachable from the "
           "network without --api-auth unless allowed in Settings.")


class TrainRequest(_Request):
    """POST /charlora/v1/train: train a LoRA of one character on the loaded checkpoint."""
    name: Text(pattern=NAME_PATTERN) = _field(..., "The LoRA's name: its file is <Lora folder>/<name>.safetensors. "
                                                   "1-64 of A-Z a-z 0-9 _ - . (not starting or ending with '.').")
    trigger: Text(200) = _field(None, "The word that calls the character in a prompt (one line). Default: the name.")
    images: Items(StrictStr, 1) = _field(None, _PICTURES)
    image_dir: Text(4096, 1) = _field(None, _FOLDER)
    captions: List[Optional[StrictStr]] = _field(
        None, "One caption per picture of 'images' (null: the default caption 'photo of <trigger>'); at most "
              "'Longest caption (characters)' (Settings, default 2000) each.")
    preset: Literal[PRESETS] = _field(None, "Fast, balanced or quality settings for the loaded model's kind. "
                                            "Default: Settings' default preset (balanced).")
    steps: Int(1, 1_000_000) = _field(None, "Training steps. " + _preset_default("steps"))
    rank: Int(1, 1024) = _field(None, "LoRA rank. " + _preset_default("rank"))
    alpha: Num(1024, gt=0) = _field(None, "LoRA alpha (scale alpha/rank). " + _preset_default("alpha"))
    learning_rate: Num(10, gt=0) = _field(None, "UNet learning rate. Default 1e-4.")
    text_encoder_lr: Num(10, ge=0) = _field(None, "Text encoder learning rate (> 0 when the text encoder is "
                                                  "trained). Default 5e-5.")
    train_text_encoder: StrictBool = _field(None, "Train the text encoder too (SD1/SD2). "
                                            + _preset_default("train_text_encoder"))
    resolution: Int(64, 2048, 64) = _field(None, "Training resolution in pixels, a multiple of 64. Default: 512 on "
                                                 "SD1.x and SD2, 768 on SD2 v-prediction, 1024 on SDXL.")
    batch_size: Int(1, 64) = _field(None, "Pictures per step. " + _preset_default("batch_size"))
    seed: Int(0, 2**63 - 1) = _field(None, "Random seed. Default 0.")
    sample_every: Int(0, 1_000_000) = _field(None, "A preview picture every N steps (0: none). Default 0.")
    save_every: Int(0, 1_000_000) = _field(None, "A checkpoint every N steps (0: none). Default 0, or evenly "
                                                 "spaced when checkpoint_count is given.")
    checkpoint_count: Int(0, 20) = _field(None, "This many evenly spaced checkpoints to test and compare. Default 0.")
    keep_checkpoints: StrictBool = _field(None, "Keep the checkpoints after training. Default: Settings' choice.")
    overwrite: StrictBool = _field(None, "Replace an existing LoRA of this name (only once the new one is "
                                         "written whole). Default false.")


class EvaluateRequest(_Request):
    """POST /charlora/v1/evaluate: sample grids, identity and prompt scores of a LoRA's checkpoints."""
    lora: Text(pattern=NAME_PATTERN) = _field(..., "The LoRA's name (its file in the Lora folder).")
    trigger: Text(200) = _field(None, "Default: the trigger word stored in the file.")
    checkpoints: Union[Literal["all", "final"], Items(Text(200), 1, 100)] = _field(
        None, "\"all\" (default), \"final\" or a list of checkpoint file names.")
    prompts: Items(Text(500, 1), 1, 20) = _field(None, "1-20 prompts of at most 500 characters. "
                                                       "Default: 5 varied prompts.")
    seeds: Items(Int(0, 2**32 - 1), 1, 8) = _field(None, "1-8 seeds. Default [1, 2].")
    strengths: Items(Num(2, gt=0), 1, 6) = _field(None, "1-6 LoRA strengths. Default [1.0].")
    steps: Int(1, 150) = _field(None, "Sampling steps. Default 20.")
    width: Int(0, 2048, 64) = _field(None, "0 (the model's native size, default) or a multiple of 64 up to 2048.")
    height: Int(0, 2048, 64) = _field(None, "As width.")
    sampler: Text(100, 1) = _field(None, "A sampler of the WebUI. Default \"Euler a\".")
    images: Items(StrictStr, 1) = _field(None, "Reference pictures (base64) for the identity score. Default: the "
                                               "pictures kept from the training.")
    image_dir: Text(4096, 1) = _field(None, "A server folder of reference pictures (see train).")


class PromoteRequest(_Request):
    """POST /charlora/v1/promote: make an intermediate checkpoint the LoRA's main file."""
    lora: Text(pattern=NAME_PATTERN) = _field(..., "The LoRA's name.")
    checkpoint: Text(200) = _field(..., "A checkpoint file name, e.g. <name>-step000400.safetensors.")
    strength: Num(2, gt=0) = _field(1.0, "The strength written as the card's preferred weight.")


class StopRequest(_Request):
    """POST /charlora/v1/jobs/{job_id}/stop (the body is optional)."""
    save: StrictBool = _field(True, "true: stop and save the LoRA as trained so far; false: cancel, write nothing.")


class TrainAccepted(_Response):
    job_id: str = _field(..., "Poll GET /charlora/v1/jobs/{job_id}.")
    warnings: List[str] = _field([], "Notes on the pictures and settings.")


class EvaluateAccepted(TrainAccepted):
    pictures: int = _field(..., "How many pictures the test will make.")


class PromoteAnswer(_Response):
    lora: str
    path: str
    ss_steps: Optional[str] = None
    promoted_from: str
    preferred_weight: float
    warnings: List[str] = []


class JobAnswer(_Response):
    job_id: str
    kind: Literal["train", "evaluate"]
    status: Literal[JOB_STATUSES] = _field(..., "queued, running, done, failed or cancelled.")
    step: int
    total_steps: int
    loss: Optional[float] = None
    eta_seconds: Optional[float] = None
    peak_memory_mb: Optional[float] = _field(None, "Training memory beyond the loaded model (MB).")
    lora_name: Optional[str] = None
    lora_path: Optional[str] = None
    warnings: List[str] = []
    error: Optional[str] = _field(None, "Why the job failed.")
    result: Optional[dict] = _field(None, "An evaluation's grids, scores and recommended checkpoint.")


class JobList(_Response):
    jobs: List[JobAnswer]


class ErrorAnswer(_Response):
    detail: str = _field(..., "What is wrong and what to change.")
    field: Optional[str] = _field(None, "The request field at fault.")
    report: Optional[dict] = _field(None, "Picture intake report (per file: accepted or why not).")


def schema(model, openapi="3.1.0"):
    """The model's JSON schema for an OpenAPI document of version ``openapi``, without pydantic's
    'default: null' for fields whose default the service picks."""
    out = copy.deepcopy(model.model_json_schema() if V2 else model.schema())  # v1 caches its dict
    for prop in out.get("properties", {}).values():
        if "default" in prop and prop["default"] is None:
            del prop["default"]
    if openapi.startswith("3.0"):
        _exclusive_as_flags(out)
    return out


def _exclusive_as_flags(node):
    """OpenAPI 3.0 (FastAPI < 0.99, A1111) has only ``exclusiveMinimum: true`` beside ``minimum``, which
    FastAPI 0.94's document model cannot hold (it types the key as a number): the bound is kept as
    ``minimum`` and the description says it is exclusive."""
    if isinstance(node, dict):
        for key, bound, sign in (("exclusiveMinimum", "minimum", ">"), ("exclusiveMaximum", "maximum", "<")):
            if key in node and not isinstance(node[key], bool):
                node[bound] = node.pop(key)
                node["description"] = (node.get("description", "") + f" Must be {sign} {node[bound]:g}.").strip()
        for value in node.values():
            _exclusive_as_flags(value)
    elif isinstance(node, list):
        for value in node:
            _exclusive_as_flags(value)


def check(model, body):
    """Validate ``body`` against ``model``; a failure becomes a ConfigError naming the field, worded alike
    on pydantic 1 and 2."""
    if not isinstance(body, dict):
        raise ConfigError("body", "must be a JSON object")
    fields = model.model_fields if V2 else model.__fields__
    for key in ("name", "lora"):  # the name rules' own messages say which character is wrong
        if key in body and key in fields:
            validate_name(body[key], key)
    try:
        return model.model_validate(body) if V2 else model.parse_obj(body)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
    loc = [p for p in err.get("loc", ()) if p != "__root__"]
    if V2 and len(loc) > 1 and not isinstance(loc[-1], int) and "[" in str(loc[-1]):
        loc = loc[:-1]  # v2 names the union member tried last (e.g. "list[constrained-str]")
    field = str(loc[0]) if loc else "body"
    for part in loc[1:]:
        field += f"[{part}]" if isinstance(part, int) else f".{part}"
    raise ConfigError(field, _message(err, _value(body, loc), sorted(fields))) from None


def _value(body, loc):
    value = body
    for part in loc:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return None
    return value


_KINDS = (("int", "an integer"), ("float", "a number"), ("bool", "true or false"), ("strictbool", "true or false"),
          ("str", "text"),
          ("string", "text"), ("list", "a list"))


def _message(err, value, known):
    kind, ctx = err.get("type", ""), err.get("ctx") or {}
    bound = next((ctx[k] for k in ("limit_value", "ge", "gt", "le", "lt", "multiple_of", "max_length",
                                   "min_length") if k in ctx), None)
    if isinstance(bound, float) and bound.is_integer():
        bound = int(bound)
    got = f", got {value!r}" if not isinstance(value, (str, list, dict)) or len(repr(value)) < 80 else ""
    if kind in ("value_error.extra", "extra_forbidden"):
        return f"unknown field; known fields: {', '.join(known)}"
    if kind in ("value_error.missing", "missing"):
        return "is required"
    for names, text in ((("not_ge", "greater_than_equal"), ">="), (("not_gt", "greater_than"), ">"),
                        (("not_le", "less_than_equal"), "<="), (("not_lt", "less_than"), "<")):
        if kind.endswith(names):
            return f"must be {text} {bound}{got}"
    if kind.endswith(("not_multiple", "multiple_of")):
        return f"must be a multiple of {bound}{got}"
    if kind in ("value_error.const", "literal_error", "type_error.enum"):
        allowed = ctx.get("permitted") or ctx.get("expected") or ""
        if isinstance(allowed, (list, tuple)):
            allowed = ", ".join(repr(a) for a in allowed)
        return f"unknown value {value!r}; choose one of {allowed}"
    if kind in ("value_error.any_str.max_length", "string_too_long"):
        return f"is {len(value) if isinstance(value, str) else '?'} characters long; at most {bound} are allowed"
    if kind in ("value_error.any_str.min_length", "string_too_short"):
        return "must not be empty"
    if kind in ("value_error.list.min_items", "too_short"):
        return f"must have at least {bound} item{'s' if bound != 1 else ''}"
    if kind in ("value_error.list.max_items", "too_long"):
        return f"must have at most {bound} items, got {len(value) if isinstance(value, list) else '?'}"
    for name, text in _KINDS:
        if kind.startswith((f"type_error.{name}", f"{name}_")) or kind == f"value_error.{name}":
            return f"must be {text}{got}"
    return err.get("msg", "is not valid")
