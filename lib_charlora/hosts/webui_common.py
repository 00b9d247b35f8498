"""What the A1111-family WebUIs (A1111, reForge, Forge) share and both adapters use."""

_COND_CACHES = ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")


def clear_prompt_cache(processing):
    """Forget the text conditioning the WebUI keeps across generations. Its key holds the prompt and
    the LoRA names, not the files: after a LoRA (with a text-encoder part) is rewritten under the same
    name, the next generation would reuse conditioning made with the old file."""
    for cls_name in ("StableDiffusionProcessing", "StableDiffusionProcessingTxt2Img"):
        cls = getattr(processing, cls_name, None)
        for attr in _COND_CACHES:
            cache = cls.__dict__.get(attr) if isinstance(cls, type) else None
            if isinstance(cache, list):
                setattr(cls, attr, [None] * len(cache))
