"""Aspect-ratio buckets with kohya sd-scripts' rule, so our buckets equal kohya's for the same settings.

The bucket list: the square ``floor(sqrt(area)/step)*step``, and for every width ``w`` from
``min_size`` to ``max_size`` in ``step`` increments the pair ``(w, h)`` / ``(h, w)`` with
``h = min(max_size, floor(area / w / step) * step)`` when ``h >= min_size``; area = resolution².
A picture goes to the bucket whose aspect ratio is closest to its own, is scaled so it covers the
bucket and is cropped to it. With ``no_upscale`` the bucket is instead derived from the picture's
own size (shrunk to the area if larger, rounded down to ``step``), so small pictures are never enlarged.
"""
import math

from PIL import Image

from .errors import ConfigError


def bucket_resolutions(resolution, min_size=256, max_size=1024, step=64):
    if min_size > max_size:
        raise ConfigError("min_bucket_reso", f"{min_size} is larger than max_bucket_reso {max_size}")
    if max_size < resolution:
        raise ConfigError("max_bucket_reso", f"must be at least the resolution ({resolution}), got {max_size}")
    area = resolution * resolution
    resos = {(int(math.sqrt(area) // step) * step,) * 2}
    w = min_size
    while w <= max_size:
        h = min(max_size, int((area // w) // step) * step)
        if h >= min_size:
            resos.add((w, h))
            resos.add((h, w))
        w += step
    return sorted(resos)


def _round_to_step(x, step):
    x = int(x + 0.5)
    return x - x % step


def select_bucket(width, height, buckets, resolution, step=64, no_upscale=False):
    """-> (bucket (w, h), resized size (w, h) before cropping, aspect-ratio error)."""
    ar = width / height
    if not no_upscale:
        if (width, height) in buckets:
            reso = (width, height)
        else:
            reso = min(buckets, key=lambda b: abs(b[0] / b[1] - ar))
        scale = reso[1] / height if ar > reso[0] / reso[1] else reso[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    else:
        area = resolution * resolution
        if width * height > area:
            rw = math.sqrt(area * ar)
            rh = area / rw
            bw = _round_to_step(rw, step)
            bh_w = _round_to_step(bw / ar, step)
            bh = _round_to_step(rh, step)
            bw_h = _round_to_step(bh * ar, step)
            if abs(bw / bh_w - ar) < abs(bw_h / bh - ar):
                resized = (bw, int(bw / ar + 0.5))
            else:
                resized = (int(bh * ar + 0.5), bh)
        else:
            resized = (width, height)
        reso = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    return reso, resized, reso[0] / reso[1] - ar


def resize_and_crop(image, bucket, resized, random_crop=False, generator=None):
    """Scale ``image`` to ``resized`` and crop ``bucket`` out of it (centre, or random with ``generator``).

    Returns (image of size ``bucket``, (crop_top, crop_left)) — the crop goes into SDXL's conditioning.
    """
    import torch
    if image.size != resized:
        image = image.resize(resized, Image.LANCZOS)
    dx, dy = resized[0] - bucket[0], resized[1] - bucket[1]
    if random_crop:
        left = int(torch.randint(0, dx + 1, (1,), generator=generator)) if dx > 0 else 0
        top = int(torch.randint(0, dy + 1, (1,), generator=generator)) if dy > 0 else 0
    else:
        left, top = dx // 2, dy // 2
    return image.crop((left, top, left + bucket[0], top + bucket[1])), (top, left)

