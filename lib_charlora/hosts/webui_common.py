"""What the A1111-family WebUIs share and more than one adapter uses: A1111, reForge and Forge have the
same ``processing`` caches; reForge and Forge (ComfyUI-style backends) build and merge weights under
``torch.inference_mode()``, cache LoRA files by name and keep models loaded through a memory manager."""
import os

import torch

_COND_CACHES = ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")


def clear_prompt_cache(processing):
    """Forget the text conditioning the WebUI keeps across generations. Its key holds the prompt and
    the LoRA names, not the files: after a LoRA (with a text-encoder part) is rewritten under the same
    name, or after a preview made with the in-training LoRA, the next generation would reuse it."""
    for cls_name in ("StableDiffusionProcessing", "StableDiffusionProcessingTxt2Img"):
        cls = getattr(processing, cls_name, None)
        for attr in _COND_CACHES:
            cache = cls.__dict__.get(attr) if isinstance(cls, type) else None
            if isinstance(cache, list):
                setattr(cls, attr, [None] * len(cache))


def txt2img(processing, sd_model, prompt, seed, width, height, steps, sampler, scripts=None):
    """One picture through the WebUI's own txt2img processing (nothing saved). ``scripts``: the
    WebUI's scripts module, for an empty script runner (no other extension's always-on scripts; reForge
    reads the runner unchecked)."""
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=sd_model, prompt=prompt, negative_prompt="", seed=seed, steps=steps, width=width, height=height,
        cfg_scale=7.0, sampler_name=sampler, scheduler="Automatic", batch_size=1, n_iter=1,
        do_not_save_samples=True, do_not_save_grid=True)
    if scripts is not None:
        p.scripts, p.script_args = scripts.ScriptRunner(), []
    try:
        processed = processing.process_images(p)
    finally:
        close = getattr(p, "close", None)
        if close:
            close()
    images = getattr(processed, "images", None) or []
    return images[0] if images else None


def lora_prompt(prompt, lora):
    """``prompt`` with ``<lora:<file stem>:<strength>>`` in front: how a user loads a LoRA file in
    the WebUIs (which find it by name anywhere under their Lora folder)."""
    if lora is None:
        return prompt
    path, strength = lora
    stem = os.path.basename(path)[:-len(".safetensors")] if path.endswith(".safetensors") else os.path.basename(path)
    return f"<lora:{stem}:{strength:g}> {prompt}"


def forget_cached_loras(sd_model, networks):
    """The built-in LoRA extension of Forge / reForge caches state dicts by file name and skips an
    unchanged LoRA list (``current_lora_hash``): the next generation must read the files anew."""
    if hasattr(sd_model, "current_lora_hash"):
        sd_model.current_lora_hash = str([])
    cached = getattr(networks, "load_lora_state_dict", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


def unload(memory_management, patcher):
    """Take one model off the device through the memory manager's own bookkeeping (moving it behind
    the manager's back would make its next user run on the wrong device)."""
    loaded = memory_management.current_loaded_models
    for i in range(len(loaded) - 1, -1, -1):
        if loaded[i].model is patcher:
            loaded.pop(i).model_unload()


@torch.no_grad()
def make_autograd_safe(module):
    """Replace inference-mode parameters and buffers by normal tensors with the same values.

    Forge and reForge create them under ``torch.inference_mode()`` (loading, LoRA merges, moves during
    sampling), and autograd cannot save them for backward. Replaced one at a time, so memory stays
    flat; never through ``p.data = ...``, which corrupts an inference parameter. The session restores
    the ``requires_grad`` flags by name when it ends.
    """
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_inference():
                sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)  # frozen
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()
