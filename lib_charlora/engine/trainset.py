"""From accepted pictures to training batches: captions, buckets, repeats, latent cache, sampling.

Every picture gets its base caption (trigger first), its bucket and its resize; an epoch holds
each picture ``repeats`` times; batches are drawn from one bucket at a time (so latents stack),
shuffled with the run's generator (deterministic under the seed, restorable from a checkpoint).
"""
import hashlib
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from . import buckets as bk
from . import captions as cap
from .data import TrainImage
from .dataset import DatasetImage
from .errors import ConfigError


@dataclass
class Sample:
    name: str
    image: Image.Image
    original_size: tuple       # (w, h)
    caption: str               # base caption, trigger first
    caption_source: str
    repeats: int
    bucket: tuple              # (w, h)
    resized: tuple             # (w, h) before the crop


def caption_options(cfg):
    return cap.CaptionOptions(trigger=cfg.trigger, template=cfg.caption_template, prefix=cfg.caption_prefix,
                              suffix=cfg.caption_suffix, shuffle_tags=cfg.shuffle_tags,
                              keep_tokens=cfg.keep_tokens, tag_dropout=cfg.tag_dropout,
                              caption_dropout=cfg.caption_dropout)


def bucket_limits(cfg):
    lo = cfg.min_bucket_reso or max(64, cfg.resolution // 2 // 64 * 64)
    hi = cfg.max_bucket_reso or cfg.resolution * 2
    return lo, hi


def build_samples(images, cfg, provider=None):
    """``images``: ``DatasetImage`` (intake) or ``TrainImage`` (picture + caption) items."""
    opts = caption_options(cfg).validate()
    if cfg.buckets:
        lo, hi = bucket_limits(cfg)
        table = bk.bucket_resolutions(cfg.resolution, lo, hi, 64)
    samples = []
    for i, im in enumerate(images):
        if isinstance(im, TrainImage):
            name, picture, orig, repeats = f"image {i + 1}", im.image.convert("RGB"), im.image.size, 1
            given, sidecar = im.caption, None
        elif isinstance(im, DatasetImage):
            name, picture, orig, repeats = im.name, im.image, im.original_size, im.repeats
            given = im.caption if im.caption_source == "given" else None
            sidecar = im.caption if im.caption_source == "sidecar" else None
        else:
            raise ConfigError("images", f"item {i} is neither a TrainImage nor a DatasetImage")
        caption, source = cap.base_caption(given, sidecar, picture, opts, provider)
        w, h = picture.size
        if cfg.buckets:
            bucket, resized, _ = bk.select_bucket(w, h, table, cfg.resolution, 64, cfg.bucket_no_upscale)
        else:
            r = cfg.resolution
            scale = max(r / w, r / h)
            bucket, resized = (r, r), (max(r, int(w * scale + 0.5)), max(r, int(h * scale + 0.5)))
        samples.append(Sample(name, picture, tuple(orig), caption, source, repeats, bucket, resized))
    return samples


def bucket_counts(samples):
    counts = {}
    for s in samples:
        counts[s.bucket] = counts.get(s.bucket, 0) + s.repeats
    return counts


def steps_for_epochs(epochs, batches_per_epoch, grad_accum=1):
    """Optimizer steps for ``epochs`` passes over the pictures (repeats included)."""
    return max(1, -(-epochs * batches_per_epoch // grad_accum))


def epochs_for_steps(steps, batches_per_epoch, grad_accum=1):
    """How many passes over the pictures ``steps`` optimizer steps make (fractional)."""
    return steps * grad_accum / max(1, batches_per_epoch)


def to_pixels(image):
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _size_info(sample, top, left):
    """SDXL's size conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w), the crop
    in the original picture's pixels."""
    w0, h0 = sample.original_size
    scale = w0 / sample.resized[0]
    return (h0, w0, int(top * scale + 0.5), int(left * scale + 0.5), sample.bucket[1], sample.bucket[0])


def crop_sample_info(sample):
    """The size info of the centre crop (what ``crop_sample`` without ``random_crop`` returns)."""
    return _size_info(sample, (sample.resized[1] - sample.bucket[1]) // 2, (sample.resized[0] - sample.bucket[0]) // 2)


def crop_sample(sample, flip, random_crop=False, generator=None):
    """-> (pixels [3,H,W] in [-1,1], SDXL size info)."""
    img, (top, left) = bk.resize_and_crop(sample.image, sample.bucket, sample.resized, random_crop, generator)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_pixels(img), _size_info(sample, top, left)


class BucketSampler:
    """Epochs of batches; each batch from one bucket; repeats honoured; shuffled by ``generator``."""

    def __init__(self, samples, batch_size, generator):
        self.samples, self.batch_size, self.g = samples, batch_size, generator
        self.batches, self.pos, self.epoch = [], 0, 0

    def _epoch(self):
        groups = {}
        for i, s in enumerate(self.samples):
            groups.setdefault(s.bucket, []).extend([i] * s.repeats)
        batches = []
        for bucket in sorted(groups):
            idx = groups[bucket]
            order = [idx[j] for j in torch.randperm(len(idx), generator=self.g).tolist()]
            batches += [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        return [batches[j] for j in torch.randperm(len(batches), generator=self.g).tolist()]

    def batches_per_epoch(self):
        groups = bucket_counts(self.samples)
        return sum(-(-n // self.batch_size) for n in groups.values())

    def next(self):
        if self.pos >= len(self.batches):
            self.batches, self.pos = self._epoch(), 0
            self.epoch += 1
        batch = self.batches[self.pos]
        self.pos += 1
        return batch

    def state_dict(self):
        return {"batches": [list(b) for b in self.batches], "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, s):
        self.batches, self.pos, self.epoch = [list(b) for b in s["batches"]], s["pos"], s["epoch"]


LATENT_FORMAT = "charlora-latent"


def _read_latent(path):
    """The latent of a disk cache entry (a safetensors file: never unpickled), or None if it is not one."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            if (f.metadata() or {}).get("format") != LATENT_FORMAT or "latent" not in f.keys():
                return None
            z = f.get_tensor("latent")
    except Exception:
        return None
    return z if z.dtype == torch.float32 and z.dim() == 3 else None


class LatentCache:
    """Latents of (picture, bucket, flip), in memory and optionally on disk.

    Disk entries are keyed by the picture's content, the model's identity and the bucket / resize,
    so a re-run skips encoding and an entry is never used for another model.
    """

    def __init__(self, host, directory: Optional[str] = None, model_key: Optional[str] = None):
        self.host, self.directory = host, directory
        self.model_key = model_key or host.model_sha256 or host.model_hash
        if directory and not self.model_key:
            raise ConfigError("latent_cache_dir", "a disk latent cache needs the model's hash to tell models apart")
        self.memory = {}
        self.encoded = 0   # how many latents this cache had to compute

    def _key(self, sample, flip):
        h = hashlib.sha256()
        h.update(np.asarray(sample.image).tobytes())
        h.update(repr((sample.image.size, sample.bucket, sample.resized, bool(flip), self.model_key,
                       self.host.vae_scale)).encode())
        return h.hexdigest()

    def get(self, index, sample, flip):
        mem_key = (index, bool(flip))
        if mem_key in self.memory:
            return self.memory[mem_key]
        path = None
        if self.directory:
            key = self._key(sample, flip)
            path = os.path.join(self.directory, key[:2], key + ".safetensors")
            if os.path.isfile(path):
                z = _read_latent(path)
                if z is not None:
                    self.memory[mem_key] = z
                    return z
                # unreadable or foreign entry: encode again and overwrite it
        pixels, _ = crop_sample(sample, flip)
        with torch.no_grad():
            z = self.host.encode_images(pixels.unsqueeze(0).to(self.host.device)).float().cpu()[0]
        self.encoded += 1
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".tmp"
            try:
                from safetensors.torch import save_file
                save_file({"latent": z.contiguous()}, tmp, metadata={"format": LATENT_FORMAT})
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        self.memory[mem_key] = z
        return z
