"""Peak memory of dataset intake: 50 generated 4000x3000 photos through decoding, bucketing and
latent caching (tiny random-weight model, CPU). Prints the peak RSS above the interpreter's
baseline (after imports), measured in a fresh child process.

    .venv/bin/python benchmarks/intake_memory.py [--count 50] [--resolution 512]
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_photos(folder, count, size=(4000, 3000)):
    import numpy as np
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        path = os.path.join(folder, f"photo_{i:03d}.jpg")
        if os.path.exists(path):
            continue
        # smooth colour field + noise: photo-like JPEG sizes (a few MB), decodes like a camera picture
        small = (rng.random((30, 40, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(small).resize(size, Image.BICUBIC)
        noise = Image.effect_noise(size, 24).convert("RGB")
        Image.blend(img, noise, 0.15).save(path, quality=92)


def child(folder, resolution):
    import torch
    from lib_charlora.engine import TrainConfig, trainset
    from lib_charlora.engine.dataset import load_folder
    from lib_charlora.tiny import tiny_host
    torch.set_num_threads(2)
    host = tiny_host("diffusers", "sd1")
    base = rss_mb()
    t0 = time.perf_counter()
    images, report = load_folder(folder, resolution=resolution)
    t1 = time.perf_counter()
    cfg = TrainConfig(name="bench", trigger="pipchr", resolution=resolution)
    samples = trainset.build_samples(images, cfg)
    cache = trainset.LatentCache(host)
    for i, s in enumerate(samples):
        cache.get(i, s, False)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"pictures accepted: {len(report.accepted)} of {len(report.files)}; buckets: "
          f"{len(trainset.bucket_counts(samples))}; latents cached: {cache.encoded}")
    print(f"time: intake {t1 - t0:.1f} s, bucketing + latent caching {t2 - t1:.1f} s")
    print(f"RSS: baseline {base:.0f} MB, peak {peak:.0f} MB -> peak above baseline {peak - base:.0f} MB "
          f"(limit 1536 MB)")
    return 0 if peak - base < 1536 else 1


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "charlora_bench_photos"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.folder, a.resolution)
    t = time.perf_counter()
    make_photos(a.folder, a.count)
    total = sum(os.path.getsize(os.path.join(a.folder, f)) for f in os.listdir(a.folder))
    print(f"{a.count} photos 4000x3000 in {a.folder} ({total / 1e6:.0f} MB of JPEG, made in "
          f"{time.perf_counter() - t:.0f} s)")
    return subprocess.call([sys.executable, os.path.abspath(__file__), "--child", "--folder", a.folder,
                            "--resolution", str(a.resolution)])


if __name__ == "__main__":
    sys.exit(main())
