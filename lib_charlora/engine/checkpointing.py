"""Our own non-reentrant gradient checkpointing, installed per instance and removed on exit.

A1111's patch is ldm-only and reentrant (no gradients when no block input requires grad, which is
the case for UNet-only LoRA); Forge raises NotImplementedError. We wrap the ``forward`` of every
transformer / residual block instance with ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``
and remove the instance attribute afterwards, so the class and the module are untouched.
"""
import contextlib

import torch
from torch.utils.checkpoint import checkpoint

BLOCK_CLASSES = frozenset({
    "BasicTransformerBlock",   # ldm, sgm, diffusers, Forge
    "ResBlock",                # ldm, sgm, Forge
    "ResnetBlock2D",           # diffusers
    "CLIPEncoderLayer",        # transformers
    "ResidualAttentionBlock",  # open_clip
})


def _wrap(module):
    inner = module.forward

    def run(*args, **kwargs):
        # The recompute needs the block's inputs as they were; a block may add into them in place
        # (Forge's transformer block does), so it works on copies.
        return inner(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args], **kwargs)

    def forward(*args, **kwargs):
        return checkpoint(run, *args, use_reentrant=False, **kwargs)
    return forward


@contextlib.contextmanager
def gradient_checkpointing(modules, enabled=True):
    patched = []
    try:
        if enabled:
            for root in modules:
                for m in root.modules():
                    if type(m).__name__ in BLOCK_CLASSES and "forward" not in m.__dict__:
                        m.forward = _wrap(m)
                        patched.append(m)
        yield len(patched)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
