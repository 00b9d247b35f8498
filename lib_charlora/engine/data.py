"""Minimal image preparation for the engine: RGB, resize + centre crop to a square, [-1, 1].

Dataset intake (decoding every real-world format, buckets, captions) builds on this and hands the
engine ``TrainImage`` objects.
"""
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass
class TrainImage:
    image: Image.Image
    caption: str


def to_square_tensor(image, resolution):
    """PIL image -> ([3,R,R] float tensor in [-1,1], (orig_h, orig_w, crop_top, crop_left, R, R))."""
    img = image.convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    return pixels, (h, w, top, left, resolution, resolution)
