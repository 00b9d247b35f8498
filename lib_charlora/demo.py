"""The embedded demo: a tiny random-weight SD1.5-layout model, a procedurally drawn "character"
and a real training run on the CPU that writes a kohya LoRA file with its card.

Nothing is downloaded. The model is random, so the LoRA teaches it nothing useful to look at; the
point is to run the whole engine end to end and show what a run produces.
"""
import math
import os
import random
import sys
import time

from PIL import Image, ImageDraw, ImageFilter


def draw_character(seed, size=128):
    """One picture of "Pip": an orange round creature with a blue pointed hat, big eyes and a
    red scarf, in a random pose, scale, position and background."""
    rng = random.Random(seed)
    s = size * 2  # draw at 2x, downsample for anti-aliasing
    top = tuple(rng.randrange(40, 220) for _ in range(3))
    bottom = tuple(rng.randrange(40, 220) for _ in range(3))
    img = Image.new("RGB", (s, s))
    d = ImageDraw.Draw(img)
    for y in range(s):  # vertical gradient background
        t = y / (s - 1)
        d.line([(0, y), (s, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    for _ in range(rng.randrange(2, 6)):  # clutter
        x, y, r = rng.randrange(s), rng.randrange(s), rng.randrange(s // 20, s // 6)
        colour = tuple(rng.randrange(256) for _ in range(3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x - r, y - r, x + r, y + r], fill=colour)
    scale = rng.uniform(0.55, 1.0)
    cx, cy = rng.uniform(0.35, 0.65) * s, rng.uniform(0.45, 0.65) * s
    r = 0.22 * s * scale
    tilt = rng.uniform(-0.5, 0.5)  # head tilt / pose, radians
    look = rng.uniform(-0.35, 0.35)

    def rot(px, py):
        dx, dy = px - cx, py - cy
        return cx + dx * math.cos(tilt) - dy * math.sin(tilt), cy + dx * math.sin(tilt) + dy * math.cos(tilt)

    d.ellipse([cx - 0.8 * r, cy + 0.6 * r, cx + 0.8 * r, cy + 1.9 * r], fill=(230, 120, 30))   # body
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(245, 140, 40))                           # head
    d.polygon([rot(cx - 1.05 * r, cy + 0.55 * r), rot(cx + 1.05 * r, cy + 0.55 * r),
               rot(cx + 0.9 * r, cy + 0.8 * r), rot(cx - 0.9 * r, cy + 0.8 * r)], fill=(200, 30, 40))  # scarf
    d.polygon([rot(cx - 0.75 * r, cy - 0.6 * r), rot(cx + 0.75 * r, cy - 0.6 * r),
               rot(cx + 0.15 * r, cy - 1.9 * r)], fill=(40, 70, 200))                             # hat
    for side in (-1, 1):                                                                        # eyes
        ex, ey = rot(cx + side * 0.38 * r, cy - 0.05 * r)
        d.ellipse([ex - 0.22 * r, ey - 0.26 * r, ex + 0.22 * r, ey + 0.26 * r], fill=(255, 255, 255))
        px = ex + look * 0.12 * r
        d.ellipse([px - 0.1 * r, ey - 0.1 * r, px + 0.1 * r, ey + 0.1 * r], fill=(20, 20, 20))
    if rng.random() < 0.2:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = img.filter(ImageFilter.GaussianBlur(0.6)).resize((size, size), Image.LANCZOS)
    return img


CAPTIONS = ["standing", "close-up", "outdoors", "smiling", "looking to the side", "simple background"]


def demo_dataset(n=12, size=128, trigger="pip_character", seed=0):
    from .engine import TrainImage
    return [TrainImage(draw_character(seed * 1000 + i, size), f"{trigger}, {CAPTIONS[i % len(CAPTIONS)]}")
            for i in range(n)]


class ProgressBar:
    def __init__(self, stream=None, width=30):
        self.stream, self.width = stream or sys.stderr, width

    def __call__(self, p):
        done = int(self.width * p.step / p.total)
        loss = "  loss -" if p.loss is None else f"  loss {p.loss:.4f}"
        eta = f"  ETA {p.eta:4.0f}s" if p.eta is not None else ""
        self.stream.write(f"\r[{'#' * done}{'.' * (self.width - done)}] {p.step}/{p.total}{loss}  lr {p.lr:.1e}{eta}")
        if p.step == p.total:
            self.stream.write("\n")
        self.stream.flush()


def run_demo(out_dir="charlora_demo", steps=300, images=12, overwrite=True, quiet=False):
    import torch
    from .engine import TrainConfig, Trainer
    from .tiny import tiny_host

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    host = tiny_host("diffusers", "sd1", model_name="tiny-random-sd15")
    trigger = "pip_character"
    data = demo_dataset(images, 128, trigger)
    os.makedirs(out_dir, exist_ok=True)
    data_dir = os.path.join(out_dir, "dataset")
    os.makedirs(data_dir, exist_ok=True)
    for i, im in enumerate(data):
        im.image.save(os.path.join(data_dir, f"{i:02d}.png"))
        with open(os.path.join(data_dir, f"{i:02d}.txt"), "w", encoding="utf-8") as f:
            f.write(im.caption)
    from .engine.dataset import DatasetError, load_folder
    pictures, report = load_folder(data_dir, resolution=128)  # the same intake a user's folder goes through
    if report.errors:
        raise DatasetError("; ".join(report.errors), report)
    if not quiet:
        print(f"Dataset: {len(report.accepted)} pictures with captions in {data_dir}", flush=True)
    cfg = TrainConfig(name="demo_character", trigger=trigger, steps=steps, rank=8, alpha=8, learning_rate=1e-3,
                      text_encoder_lr=5e-4, train_text_encoder=True, batch_size=2, resolution=128,
                      scheduler="cosine", warmup_steps=min(20, steps - 1), min_snr_gamma=5.0, seed=1,
                      save_every=steps // 3 if steps >= 3 else 0,  # checkpoints to compare afterwards
                      overwrite=overwrite, comment="Character LoRA embedded demo (random-weight model)")
    lora_dir = os.path.join(out_dir, "Lora")
    trainer = Trainer(host, cfg, pictures, lora_dir, progress=None if quiet else ProgressBar(), dataset_name="pip")
    if not quiet:
        print(f"Training a rank-{cfg.rank} LoRA on a tiny random-weight SD1.5-layout model "
              f"({sum(p.numel() for p in host.unet.module.parameters()) / 1e6:.1f} M UNet params) "
              f"with {len(data)} generated pictures of '{trigger}' for {steps} steps on the CPU ...", flush=True)
    result = trainer.run()
    hist = result.loss_history
    first = sum(v for _, v in hist[:3]) / len(hist[:3])
    last = sum(v for _, v in hist[-3:]) / len(hist[-3:])
    grids = test_checkpoints(host, lora_dir, os.path.join(out_dir, "tests"), quiet)
    report = {
        "path": result.path, "keys": result.num_keys, "steps": result.steps_done, "loss_start": first,
        "loss_end": last, "seconds": time.perf_counter() - t0, "dataset": data_dir, "grids": grids,
    }
    if not quiet:
        stem = os.path.splitext(result.path)[0]
        print(f"\nDone in {report['seconds']:.0f} s ({result.seconds:.0f} s training).")
        print(f"  loss (mean of first / last 3 readings): {first:.4f} -> {last:.4f}")
        print(f"  LoRA file:  {result.path}  ({result.num_keys} tensors, "
              f"{os.path.getsize(result.path) / 1e6:.2f} MB, kohya format)")
        print(f"  card files: {stem}.preview.png, {stem}.json")
        print(f"  dataset:    {data_dir}")
        print(f"  test grids: {', '.join(grids)}")
        print(f"Use it in a WebUI prompt as:  <lora:demo_character:1> {trigger}")
        print("(The demo model has random weights; on a real checkpoint the same run trains your character.)")
    return report


def test_checkpoints(host, lora_dir, out_dir, quiet=False):
    """Test and refine on the demo's checkpoints: every checkpoint drawn through the diffusers pipeline,
    loading its file with diffusers' own LoRA loader, one grid each (first row without the LoRA). No
    scores: the pictures of a random-weight model say nothing about identity."""
    from .engine.evaluate import EvalConfig, Evaluator
    cfg = EvalConfig(lora="demo_character", prompts=["close-up portrait photo of {trigger}",
                                                     "full body photo of {trigger} standing",
                                                     "watercolor painting of {trigger}"],
                     seeds=[1], strengths=[0.6, 1.0], width=128, height=128, steps=8)
    note = "not computed in the demo (a random-weight model); `evaluate` on a real checkpoint scores with CLIP"

    def progress(done, total):
        if not quiet and (done == total or done % 5 == 0):
            print(f"\rTesting the checkpoints: picture {done}/{total}", end="\n" if done == total else "", flush=True)

    result = Evaluator(host, cfg, lora_dir, out_dir, embedder_note=note, progress=progress).run()
    return result.grid_paths
