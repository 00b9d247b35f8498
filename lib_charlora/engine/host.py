"""The host interface: what the engine needs from a model that is already loaded (DESIGN.md §1).

A host adapter (A1111, Forge, diffusers, ldm) subclasses ``Host`` and supplies the pieces; the
engine never imports a host. ``session()`` prepares the live model for training and restores its
exact prior state on exit, whatever the outcome.
"""
import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError

ARCHS = ("sd1", "sd2", "sdxl")
PREDICTIONS = ("eps", "v")
TRAINABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Component:
    """One trainable module of the model and how kohya names its LoRA keys."""
    name: str          # "unet", "te", "te1", "te2"
    module: nn.Module
    prefix: str        # "lora_unet", "lora_te", "lora_te1", "lora_te2"
    scheme: str        # naming scheme: "ldm_unet", "diffusers_unet", "hf_clip", "open_clip"
    arch: str          # "sd1", "sd2", "sdxl"


class Host:
    """Base class of host adapters. Subclasses set the attributes and implement the methods."""

    arch = "sd1"
    prediction = "eps"
    alphas_cumprod = None          # fp32 tensor [1000]
    device = torch.device("cpu")
    unet: Component = None
    text_encoders: list = ()
    latent_channels = 4
    vae_scale = 8                  # pixels per latent cell
    model_name = None              # shown in metadata (ss_sd_model_name)
    model_hash = None              # legacy 8-hex hash (ss_sd_model_hash)
    model_sha256 = None            # full sha256 (ss_new_sd_model_hash)
    clip_skip = 1
    supports_text_encoder_training = True
    known_names = ()               # embedding / LoRA names the host knows (trigger-word clash check)

    # -- what the engine calls ----------------------------------------------------------------
    def encode_images(self, pixels):
        """``pixels`` [B,3,H,W] in [-1, 1] -> scaled latents [B,C,H/8,W/8] (no grad)."""
        raise NotImplementedError

    def encode_text(self, captions, sizes):
        """Captions + per-image ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``
        -> dict of tensors with batch dimension 0. Grad-enabled when a text encoder is trained."""
        raise NotImplementedError

    def predict(self, noisy, timesteps, cond):
        """The UNet's raw output (eps or v) for integer timesteps in [0, 1000)."""
        raise NotImplementedError

    def sample(self, prompt, seed, width, height, steps=20):  # pragma: no cover - optional
        """Optional: an image from the host's own sampler with the attached LoRA active."""
        return None

    def generate(self, prompt, seed, width, height, steps=20, sampler="Euler a", lora=None):
        """A picture from the host's own sampler for evaluation, with the LoRA file ``lora`` =
        ``(path, strength)`` loaded the way users load it (not the trainer's hooks); None: no LoRA."""
        raise NotImplementedError(f"{type(self).__name__} cannot generate pictures")

    def release(self):
        """Called when an evaluation ends: unload whatever ``generate`` kept loaded between pictures."""

    def latents_cached(self):
        """Called once every latent is cached (the VAE is not needed for training any more)."""

    def extra_modules(self):
        """Modules other than the UNet and text encoders (VAE, ...) the session must freeze."""
        return []

    @property
    def base_dtype(self):
        return next(self.unet.module.parameters()).dtype

    def check_supported(self):
        """Raise ``UnsupportedModelError`` for a model this engine cannot train."""
        if self.arch not in ARCHS:
            raise UnsupportedModelError(f"unsupported architecture {self.arch!r}; supported: SD1.x, SD2.x, SDXL")
        if self.prediction not in PREDICTIONS:
            raise UnsupportedModelError(f"unsupported prediction type {self.prediction!r}")
        for comp in [self.unet, *self.text_encoders]:
            for name, p in comp.module.named_parameters():
                if p.dtype not in TRAINABLE_DTYPES:
                    raise UnsupportedModelError(
                        f"the {comp.name} has {p.dtype} weights ({name}); LoRA training needs fp16, bf16 or fp32 "
                        "base weights — switch off fp8 / low-bit (nf4, gguf) weight storage and reload the model")
        ac = self.alphas_cumprod
        if ac is None or tuple(ac.shape) != (1000,):
            raise UnsupportedModelError("the model has no 1000-step noise schedule (alphas_cumprod)")

    # -- session ----------------------------------------------------------------------------
    def all_modules(self):
        return [self.unet.module, *(c.module for c in self.text_encoders), *self.extra_modules()]

    @contextlib.contextmanager
    def session(self, train_text_encoder=False):
        """Freeze everything for training; restore requires_grad and train/eval flags on exit.

        Flags are restored by parameter name, on whatever tensor the module holds then (a host may
        swap parameter objects during the session), and inference tensors are set inside inference
        mode (the only place their ``requires_grad`` may be switched on)."""
        modules = self.all_modules()
        grads = [(sub, name, p.requires_grad) for m in modules for sub in m.modules()
                 for name, p in sub._parameters.items() if p is not None]
        modes = [(sub, sub.training) for m in modules for sub in m.modules()]
        try:
            for m in modules:
                m.requires_grad_(False)
            yield self
        finally:
            for sub, name, flag in grads:
                p = sub._parameters.get(name)
                if p is not None and p.requires_grad != flag:
                    with torch.inference_mode(p.is_inference()):
                        p.requires_grad_(flag)
            for sub, flag in modes:
                sub.training = flag
