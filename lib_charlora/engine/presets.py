"""Fast / Balanced / Quality presets per architecture (values from shared/reference/peers.md §4:
kohya docs, kohya_ss presets, traintrain, EasyPhoto; SDXL UNet-only as sd-scripts recommends)."""
from .errors import ConfigError

PRESETS = ("fast", "balanced", "quality")

_COMMON = dict(optimizer="adamw", scheduler="cosine", min_snr_gamma=5.0, learning_rate=1e-4, text_encoder_lr=5e-5,
               batch_size=1, keep_tokens=1)
_TABLE = {
    "sd": {"fast": dict(steps=800, rank=8, alpha=4, train_text_encoder=False),
           "balanced": dict(steps=1500, rank=16, alpha=8, train_text_encoder=True),
           "quality": dict(steps=2500, rank=32, alpha=16, train_text_encoder=True, batch_size=2)},
    "sdxl": {"fast": dict(steps=800, rank=8, alpha=4),
             "balanced": dict(steps=1500, rank=16, alpha=8),
             "quality": dict(steps=2500, rank=32, alpha=16)},
}


def preset(name, arch, prediction="eps"):
    """Settings for ``TrainConfig`` (override any of them after)."""
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = dict(_COMMON)
    if arch == "sdxl":
        values.update(_TABLE["sdxl"][name], resolution=1024, train_text_encoder=False, gradient_checkpointing=True)
    else:
        values.update(_TABLE["sd"][name], resolution=768 if arch == "sd2" and prediction == "v" else 512)
    return values
