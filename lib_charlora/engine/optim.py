"""Optimizers, learning-rate schedules and mixed precision, chosen from the config and device."""
import contextlib
import importlib
import math

import torch

from .errors import ConfigError, MissingPackageError


def make_optimizer(name, param_groups, weight_decay, device):
    if name == "adamw":
        # the fused kernel (CUDA; the CPU too since torch 2.4), else the multi-tensor path: torch's default off
        # CUDA is a Python loop over the ~400 LoRA tensors (4x slower than fused on a CPU, 15% of a tiny
        # model's step: benchmarks/train_speed.py)
        try:
            return torch.optim.AdamW(param_groups, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError):  # fused not available for this device / torch version
            return torch.optim.AdamW(param_groups, weight_decay=weight_decay, foreach=True)
    if name == "prodigy":
        module = _optional(_OPTIONAL[name], f"optimizer {name!r}")
        return module.Prodigy(param_groups, weight_decay=weight_decay)
    if name == "adamw8bit":
        module = _optional(_OPTIONAL[name], f"optimizer {name!r}")
        return module.optim.AdamW8bit(param_groups, weight_decay=weight_decay)
    raise ConfigError("optimizer", f"unknown optimizer {name!r}")


_OPTIONAL = {"prodigy": "prodigyopt", "adamw8bit": "bitsandbytes"}


def require_optimizer(name):
    """Fail before any work when the optimizer's package is missing."""
    if name in _OPTIONAL:
        _optional(_OPTIONAL[name], f"optimizer {name!r}")


def _optional(package, what):
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise MissingPackageError(
            f"{what} needs the Python package '{package}', which is not installed "
            f"({e}); install it or choose the optimizer 'adamw'") from e


def lr_lambda(kind, total_steps, warmup_steps=0, num_cycles=1):
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    def f(step):
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))
        raise ConfigError("scheduler", f"unknown scheduler {kind!r}")
    return f


def make_scheduler(optimizer, kind, total_steps, warmup_steps, num_cycles):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, total_steps, warmup_steps, num_cycles))


class Precision:
    """How the forward pass runs: autocast dtype (or none) and whether a GradScaler is needed."""

    def __init__(self, mode, device):
        self.mode, self.device = mode, device
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mode)
        self.use_scaler = mode == "fp16"

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def make_scaler(self):
        if not self.use_scaler:
            return None
        if hasattr(torch.amp, "GradScaler"):
            return torch.amp.GradScaler(self.device.type)
        return torch.cuda.amp.GradScaler()  # torch < 2.3

    def __repr__(self):
        return f"Precision({self.mode})"


def choose_precision(requested, device, base_dtype):
    """'auto': fp32 on CPU; on an accelerator bf16 autocast for a bf16 base, fp16 autocast +
    GradScaler for an fp16 base, and for an fp32 base bf16 where supported, else fp16."""
    if requested == "auto":
        if device.type == "cpu":
            mode = "no"
        elif base_dtype == torch.bfloat16:
            mode = "bf16"
        elif base_dtype == torch.float16:
            mode = "fp16"
        else:
            bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
            mode = "bf16" if bf16_ok else "fp16"
    else:
        mode = requested
    if mode == "fp16" and device.type == "cpu":
        raise ConfigError("mixed_precision", "fp16 mixed precision needs a GPU; use 'bf16' or 'no' on the CPU")
    return Precision(mode, device)
