"""From accepted pictures to batches: buckets, repeats, determinism, latent cache, training end to end."""
import io
import json

import pytest
import safetensors
import torch

from lib_charlora.demo import draw_character
from lib_charlora.engine import ConfigError, TrainConfig, Trainer
from lib_charlora.engine import trainset
from lib_charlora.engine.dataset import load_uploads
from lib_charlora.tiny import tiny_host
from tests.conftest import assert_unchanged, snapshot, warm


def _png(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _picture(i, w, h):
    return draw_character(i, max(w, h)).resize((w, h))


@pytest.fixture(scope="module")
def mixed():
    """3 square, 3 landscape (3:2) and 2 portrait pictures; the portraits with 2 repeats."""
    sizes = [(300, 300)] * 3 + [(450, 300)] * 3 + [(300, 450)] * 2
    files = [(f"p{i}.png" if w >= h else f"2_side/p{i}.png", _png(_picture(i, w, h)), "pipchr, smiling, outdoors")
             for i, (w, h) in enumerate(sizes)]
    images, report = load_uploads(files, resolution=256)
    assert len(images) == 8 and report.errors == []
    for im in images:
        if im.name.startswith("2_side/"):
            im.repeats = 2
    return images


def _cfg(**kw):
    base = dict(name="mix", trigger="pipchr", steps=6, rank=4, alpha=4, resolution=256, batch_size=2,
                learning_rate=1e-3, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_buckets_repeats_and_batches(mixed):
    samples = trainset.build_samples(mixed, _cfg())
    assert [s.bucket for s in samples] == [(256, 256)] * 3 + [(320, 192)] * 3 + [(192, 320)] * 2
    assert trainset.bucket_counts(samples) == {(256, 256): 3, (320, 192): 3, (192, 320): 4}
    landscape = samples[3]
    assert landscape.resized == (320, 213)
    # SDXL size conditioning: original (h, w), centre crop offset in original pixels, target (h, w)
    assert trainset.crop_sample_info(landscape) == (300, 450, 14, 0, 192, 320)
    pixels, info = trainset.crop_sample(landscape, flip=False)
    assert pixels.shape == (3, 192, 320) and info == trainset.crop_sample_info(landscape)

    def epochs(seed, n=2):
        sampler = trainset.BucketSampler(samples, 2, torch.Generator().manual_seed(seed))
        per = sampler.batches_per_epoch()
        return per, [sampler.next() for _ in range(per * n)]

    per, batches = epochs(0)
    assert per == 6
    for b in batches:
        assert len({samples[i].bucket for i in b}) == 1  # one bucket per batch
    first = sorted(i for b in batches[:per] for i in b)
    assert first == [0, 1, 2, 3, 4, 5, 6, 6, 7, 7]       # every picture, portraits twice
    assert epochs(0)[1] == batches and epochs(1)[1] != batches
    assert trainset.steps_for_epochs(10, per) == 60 and trainset.epochs_for_steps(60, per) == 10
    assert trainset.steps_for_epochs(3, per, grad_accum=4) == 5 and trainset.epochs_for_steps(5, per, 4) == 20 / 6


def test_square_crops_without_buckets(mixed):
    samples = trainset.build_samples(mixed, _cfg(buckets=False))
    assert {s.bucket for s in samples} == {(256, 256)}
    assert samples[3].resized == (384, 256)


def test_training_on_mixed_buckets(mixed, tmp_path):
    host = warm(tiny_host("ldm", "sdxl"))
    before = snapshot(*host.all_modules())
    seen = []
    real = type(host).encode_text

    def spy(self, captions, sizes):
        seen.append((list(captions), [tuple(s) for s in sizes]))
        return real(self, captions, sizes)

    type(host).encode_text = spy
    try:
        result = Trainer(host, _cfg(flip=True, shuffle_tags=True, caption_dropout=0.2, keep_tokens=1), mixed,
                         str(tmp_path)).run()
    finally:
        type(host).encode_text = real
    assert result.status == "done" and result.steps_done == 6
    assert result.warnings == []  # 'pipchr' is a rare word
    assert_unchanged(before, *host.all_modules())
    # varying captions: encoded every step, the trigger always first (or the whole caption dropped)
    step_captions = [c for caps, _ in seen for c in caps]
    assert all(c == "" or c.startswith("pipchr") for c in step_captions)
    assert all(s[4:] in {(256, 256), (192, 320), (320, 192)} for _, sizes in seen for s in sizes)
    with safetensors.safe_open(result.path, "pt") as f:
        md = f.metadata()
    info = json.loads(md["ss_bucket_info"])["buckets"]
    assert sorted((tuple(b["resolution"]), b["count"]) for b in info.values()) == \
        [((192, 320), 4), ((256, 256), 3), ((320, 192), 3)]
    assert json.loads(md["ss_dataset_dirs"]) == {"images": {"n_repeats": 1, "img_count": 6},
                                                 "2_side": {"n_repeats": 2, "img_count": 2}}
    assert md["ss_num_train_images"] == "10" and md["ss_enable_bucket"] == "True"
    assert md["ss_shuffle_caption"] == "True" and md["ss_caption_dropout_rate"] == "0.2"
    assert md["ss_min_bucket_reso"] == "128" and md["ss_max_bucket_reso"] == "512"
    assert json.loads(md["ss_tag_frequency"])["images"] == {"pipchr": 10, "smiling": 10, "outdoors": 10}


def test_random_crop_encodes_every_step(mixed, tmp_path):
    host = warm(tiny_host("diffusers", "sd1"))
    calls = []
    real = type(host).encode_images
    type(host).encode_images = lambda self, px: calls.append(px.shape) or real(self, px)
    try:
        result = Trainer(host, _cfg(random_crop=True, steps=3), mixed, str(tmp_path)).run()
    finally:
        type(host).encode_images = real
    assert result.status == "done" and len(calls) == 3  # one encode per step, nothing cached up front


def test_latent_cache_on_disk(mixed, tmp_path):
    host = tiny_host("diffusers", "sd1")
    samples = trainset.build_samples(mixed[:4], _cfg())
    first = trainset.LatentCache(host, str(tmp_path), model_key="model-a")
    lat = [first.get(i, s, f) for i, s in enumerate(samples) for f in (False, True)]
    assert first.encoded == 8
    again = trainset.LatentCache(host, str(tmp_path), model_key="model-a")
    assert all(torch.equal(a, again.get(i, s, f)) for a, (i, s, f) in
               zip(lat, [(i, s, f) for i, s in enumerate(samples) for f in (False, True)]))
    assert again.encoded == 0  # a re-run skips encoding
    other = trainset.LatentCache(host, str(tmp_path), model_key="model-b")
    other.get(0, samples[0], False)
    assert other.encoded == 1  # never reused across models
    with pytest.raises(ConfigError, match="hash"):
        trainset.LatentCache(host, str(tmp_path))  # no model hash: a disk cache could mix models


def test_latent_cache_is_safetensors_and_foreign_entries_are_recomputed(mixed, tmp_path, monkeypatch):
    import os
    import pickle
    from safetensors.torch import save_file
    host = tiny_host("diffusers", "sd1")
    sample = trainset.build_samples(mixed[:1], _cfg())[0]
    first = trainset.LatentCache(host, str(tmp_path), model_key="model-a")
    z = first.get(0, sample, False)
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    key = first._key(sample, False)
    path = str(tmp_path / key[:2] / (key + ".safetensors"))
    assert files == [path]  # the same cache key, a safetensors file, no temp file left
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "charlora-latent"} and list(f.keys()) == ["latent"]
        assert torch.equal(f.get_tensor("latent"), z)

    def refuse(*a, **k):
        raise AssertionError("something unpickled")
    for mod, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(mod, name, refuse)
    again = trainset.LatentCache(host, str(tmp_path), model_key="model-a")
    assert torch.equal(again.get(0, sample, False), z) and again.encoded == 0  # read back, never unpickled
    foreign = [lambda: monkeypatch.undo() or torch.save(z, path),   # a pickled tensor (the old .pt format)
               lambda: open(path, "wb").write(b"garbage"),
               lambda: save_file({"latent": z}, path),               # no marker
               lambda: save_file({"latent": z.half()}, path, metadata={"format": "charlora-latent"}),
               lambda: save_file({"other": z}, path, metadata={"format": "charlora-latent"})]
    for write in foreign:
        write()
        for mod, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
            monkeypatch.setattr(mod, name, refuse)
        cache = trainset.LatentCache(host, str(tmp_path), model_key="model-a")
        w = cache.get(0, sample, False)
        assert cache.encoded == 1 and w.shape == z.shape and w.dtype == z.dtype  # ignored and recomputed
        assert torch.equal(trainset._read_latent(path), w)  # and overwritten with a good entry


def test_trainer_reuses_disk_cache(mixed, tmp_path):
    host = warm(tiny_host("diffusers", "sd1"))
    host.model_sha256 = "f" * 64
    runs = []
    for name in ("a", "b"):
        t = Trainer(host, _cfg(name=name, steps=2), mixed, str(tmp_path / "out"), latent_cache_dir=str(tmp_path / "c"))
        t.run()
        runs.append(t.cache.encoded)
    assert runs == [8, 0]


def test_caption_provider_fills_pictures_without_captions():
    files = [(f"p{i}.png", _png(_picture(i, 300, 300)), None) for i in range(5)]
    files[0] = ("p0.png", files[0][1], "given caption")
    images, _ = load_uploads(files, resolution=256)
    asked = []

    def provider(image):  # the WebUI adapter plugs its BLIP / DeepBooru interrogator in here
        asked.append(image.size)
        return "a small creature, green background" if len(asked) % 2 else ""

    samples = trainset.build_samples(images, _cfg(), provider)
    assert [(s.caption, s.caption_source) for s in samples] == [
        ("pipchr, given caption", "given"),
        ("pipchr, a small creature, green background", "provider"), ("photo of pipchr", "template"),
        ("pipchr, a small creature, green background", "provider"), ("photo of pipchr", "template")]
    assert len(asked) == 4
