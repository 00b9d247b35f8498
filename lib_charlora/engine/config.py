"""Training settings and their validation.

``TrainConfig.validate()`` checks every field before anything is loaded or written and raises
``ConfigError`` naming the field.
"""
import dataclasses
import math
import re
from dataclasses import dataclass, field

from .errors import ConfigError
from .lora import TARGET_RULES

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
SCHEDULERS = ("constant", "cosine", "cosine_with_restarts")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
SAVE_DTYPES = ("fp16", "fp32")

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def validate_name(name, field_name="name"):
    """A LoRA name becomes a file stem: 1-64 of A-Z a-z 0-9 _ - . , portable on every OS."""
    if name is not None and not isinstance(name, str):
        raise ConfigError(field_name, f"must be text, got {name!r}")
    if not name:
        raise ConfigError(field_name, "a name is required")
    if "/" in name or "\\" in name:
        raise ConfigError(field_name, f"{name!r} contains a path separator; use only letters, digits, _ - .")
    if ".." in name:
        raise ConfigError(field_name, f"{name!r} contains '..'")
    if not _NAME_RE.match(name):
        bad = sorted({c for c in name if not re.match(r"[A-Za-z0-9_.-]", c)})
        if len(name) > 64:
            raise ConfigError(field_name, f"is {len(name)} characters long; at most 64 are allowed")
        raise ConfigError(field_name, f"{name!r} contains characters that are not portable in file names "
                                      f"({''.join(bad)!r}); use only letters, digits, _ - .")
    if name.startswith(".") or name.endswith("."):
        raise ConfigError(field_name, f"{name!r} must not start or end with '.'")
    if name.split(".")[0].lower() in _RESERVED:
        raise ConfigError(field_name, f"{name!r} is a reserved device name on Windows")
    return name


def _num(field_name, value, lo, hi, integer=False, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(field_name, f"must be {kind}, got {value!r}")
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        raise ConfigError(field_name, f"must be {'>' if lo_open else '>='} {lo} and <= {hi}, got {value!r}")


@dataclass
class TrainConfig:
    name: str
    trigger: str = ""
    steps: int = 1000
    rank: int = 16
    alpha: float = 8.0
    dropout: float = 0.0
    targets: str = "kohya"
    learning_rate: float = 1e-4          # UNet
    text_encoder_lr: float = 5e-5
    train_text_encoder: bool = False
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    scheduler: str = "constant"
    warmup_steps: int = 0
    num_cycles: int = 1
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0           # 0 = no clipping
    min_snr_gamma: float = 5.0           # 0 = off
    noise_offset: float = 0.0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    resolution: int = 512
    buckets: bool = True                 # aspect-ratio buckets (kohya's rule); False = square crops
    min_bucket_reso: int = 0             # 0 = resolution / 2 (at least 64)
    max_bucket_reso: int = 0             # 0 = 2 x resolution
    bucket_no_upscale: bool = False
    random_crop: bool = False            # a new crop every step (latents are then not cached)
    flip: bool = False
    caption_template: str = "photo of {trigger}"   # for pictures without any caption
    caption_prefix: str = ""
    caption_suffix: str = ""
    shuffle_tags: bool = False
    keep_tokens: int = 1
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0
    seed: int = 0
    save_every: int = 0                  # checkpoint (LoRA + state) every N steps; 0 = off
    preview_every: int = 0               # a sample picture with the in-training LoRA every N steps; 0 = off
    log_every: int = 10                  # loss is read back from the device every N steps
    save_dtype: str = "fp16"
    overwrite: bool = False
    comment: str = ""
    extra_metadata: dict = field(default_factory=dict)

    def validate(self):
        validate_name(self.name)
        if not isinstance(self.trigger, str) or len(self.trigger) > 200 or "\n" in self.trigger:
            raise ConfigError("trigger", "must be a single line of at most 200 characters")
        _num("steps", self.steps, 1, 1_000_000, integer=True)
        _num("rank", self.rank, 1, 1024, integer=True)
        _num("alpha", self.alpha, 0, 1024, lo_open=True)
        _num("dropout", self.dropout, 0, 0.9)
        if self.targets not in TARGET_RULES:
            raise ConfigError("targets", f"unknown target rule {self.targets!r}; choose one of {', '.join(TARGET_RULES)}")
        _num("learning_rate", self.learning_rate, 0, 10, lo_open=True)
        _num("text_encoder_lr", self.text_encoder_lr, 0, 10, lo_open=self.train_text_encoder)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError("optimizer", f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        _num("weight_decay", self.weight_decay, 0, 1)
        if self.scheduler not in SCHEDULERS:
            raise ConfigError("scheduler", f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        _num("warmup_steps", self.warmup_steps, 0, self.steps - 1, integer=True)
        _num("num_cycles", self.num_cycles, 1, 1000, integer=True)
        _num("batch_size", self.batch_size, 1, 64, integer=True)
        _num("grad_accum", self.grad_accum, 1, 256, integer=True)
        _num("max_grad_norm", self.max_grad_norm, 0, 1e6)
        _num("min_snr_gamma", self.min_snr_gamma, 0, 1000)
        _num("noise_offset", self.noise_offset, 0, 1)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError("mixed_precision", f"must be one of {', '.join(MIXED_PRECISION)}")
        _num("resolution", self.resolution, 64, 2048, integer=True)
        if self.resolution % 64:
            raise ConfigError("resolution", f"must be a multiple of 64, got {self.resolution}")
        for key in ("min_bucket_reso", "max_bucket_reso"):
            value = getattr(self, key)
            _num(key, value, 0, 4096, integer=True)
            if value % 64:
                raise ConfigError(key, f"must be a multiple of 64 (or 0 for automatic), got {value}")
        if self.min_bucket_reso > self.resolution:
            raise ConfigError("min_bucket_reso", f"must not exceed the resolution {self.resolution}")
        if self.max_bucket_reso and self.max_bucket_reso < self.resolution:
            raise ConfigError("max_bucket_reso", f"must be at least the resolution {self.resolution}")
        for key in ("caption_template", "caption_prefix", "caption_suffix"):
            if not isinstance(getattr(self, key), str) or len(getattr(self, key)) > 500:
                raise ConfigError(key, "must be text of at most 500 characters")
        _num("seed", self.seed, 0, 2**63 - 1, integer=True)
        _num("save_every", self.save_every, 0, 1_000_000, integer=True)
        _num("preview_every", self.preview_every, 0, 1_000_000, integer=True)
        _num("log_every", self.log_every, 1, 1_000_000, integer=True)
        if self.save_dtype not in SAVE_DTYPES:
            raise ConfigError("save_dtype", f"must be one of {', '.join(SAVE_DTYPES)}")
        for key in ("train_text_encoder", "gradient_checkpointing", "flip", "overwrite", "buckets",
                    "bucket_no_upscale", "random_crop", "shuffle_tags"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(key, f"must be true or false, got {getattr(self, key)!r}")
        from .trainset import caption_options
        caption_options(self).validate()
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    def fingerprint(self):
        """The settings that must not change between a checkpoint and its resume."""
        keep = ("steps", "rank", "alpha", "dropout", "targets", "learning_rate", "text_encoder_lr",
                "train_text_encoder", "optimizer", "weight_decay", "scheduler", "warmup_steps", "num_cycles",
                "batch_size", "grad_accum", "max_grad_norm", "min_snr_gamma", "noise_offset", "resolution",
                "buckets", "min_bucket_reso", "max_bucket_reso", "bucket_no_upscale", "random_crop", "flip",
                "caption_template", "caption_prefix", "caption_suffix", "shuffle_tags", "keep_tokens",
                "tag_dropout", "caption_dropout", "seed")
        return {k: getattr(self, k) for k in keep}
