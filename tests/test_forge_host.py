"""The Forge adapter, driven through a double of Forge's backend (tests/forge_double.py) that reproduces
its traps around the real ldm UNet; file keys checked with a test-side model of Forge's LoRA mapping."""
import os
import threading
import types

import pytest
import safetensors.torch
import torch

from lib_charlora.engine import CancelToken, TrainConfig, Trainer, UnsupportedModelError
from lib_charlora.hosts import forge
from lib_charlora.hosts.forge import ForgeHost
from tests.conftest import assert_unchanged, fault_at, snapshot
from tests.forge_double import generate, make_forge
from tests.forge_rule import check_file_keys

NS = types.SimpleNamespace


def _cfg(**kw):
    base = dict(name="char", trigger="pipchr", steps=4, rank=4, alpha=4, resolution=64, learning_rate=1e-3,
                train_text_encoder=True, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def _modules(webui):
    return webui.sd_models.model_data.sd_model.modules()


def _train(webui, images, out, **kw):
    host = ForgeHost.for_job(webui)
    trainer = Trainer(host, _cfg(**kw), images, out, on_preview=kw.pop("on_preview", None))
    return trainer, trainer.run()


@pytest.mark.parametrize("arch,prediction", [("sd1", "eps"), ("sd2", "v"), ("sdxl", "eps")])
def test_trains_and_every_key_resolves_through_forges_mapping(arch, prediction, images, tmp_path):
    webui = make_forge(tmp_path, arch, prediction)
    assert type(webui.sd_models.model_data.sd_model).__name__ == "FakeInitialModel"
    host = ForgeHost.for_job(webui)  # Forge loads lazily: the job loads the selected checkpoint
    sd_model = webui.sd_models.model_data.sd_model
    assert (host.arch, host.prediction) == (arch, prediction) and webui.sd_models.loads == 1
    assert all(p.is_inference() for m in sd_model.modules() for p in m.parameters())  # as Forge builds them
    before = snapshot(*sd_model.modules())
    result = Trainer(host, _cfg(gradient_checkpointing=arch == "sdxl"), images, str(tmp_path / "Lora")).run()
    assert result.status == "done" and all(torch.isfinite(torch.tensor(v)) for _, v in result.loss_history)
    assert_unchanged(before, *sd_model.modules())
    tensors = safetensors.torch.load_file(result.path)
    objects = sd_model.forge_objects_original
    patches, unmatched, failures = check_file_keys(tensors, objects.unet.model, objects.clip.cond_stage_model)
    assert unmatched == [] and failures == [] and len(patches) == len(tensors) // 3
    te_prefixes = {k.split("_text_model")[0] for k in tensors if "_text_model" in k}
    assert te_prefixes == ({"lora_te1", "lora_te2"} if arch == "sdxl" else {"lora_te"})
    if arch != "sdxl":  # kohya's SD1/SD2 UNet names are diffusers-style; Forge maps them by its config
        assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in tensors)
    # the file works as a user uses it: <lora:char:1> changes the picture, the LoRA loaded with every key
    base = generate(webui, "pipchr")
    tuned = generate(webui, "<lora:char:1> pipchr")
    assert (tuned - base).abs().max() > 1e-4
    name, unet_keys, te_keys = webui.networks.log[-1]
    assert name == "char.safetensors" and unet_keys + te_keys == len(tensors) // 3


def test_the_traps_are_real_and_each_fix_is_needed(images, tmp_path, monkeypatch):
    """Without the adapter's fixes the double fails exactly as Forge does."""
    webui = make_forge(tmp_path, "sd1")
    monkeypatch.setattr(forge, "make_autograd_safe", lambda module: None)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        _train(webui, images, str(tmp_path / "a"))
    monkeypatch.undo()
    monkeypatch.setattr(forge, "_copy_input", lambda module, args: None)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _train(webui, images, str(tmp_path / "b"), train_text_encoder=False)
    monkeypatch.undo()
    _, result = _train(webui, images, str(tmp_path / "c"))
    assert result.status == "done"


@pytest.mark.parametrize("outcome", ["stop", "cancel", "error"])
def test_model_restored_in_every_outcome(outcome, images, tmp_path):
    webui = make_forge(tmp_path, "sdxl")
    host = ForgeHost.for_job(webui)
    before = snapshot(*_modules(webui))
    token = CancelToken()

    progress = fault_at(2, outcome, token)
    trainer = Trainer(host, _cfg(steps=10, gradient_checkpointing=True), images, str(tmp_path / "Lora"),
                      progress=progress, cancel=token)
    if outcome == "error":
        with pytest.raises(RuntimeError, match="simulated"):
            trainer.run()
    else:
        assert trainer.run().status == {"stop": "stopped", "cancel": "cancelled"}[outcome]
    assert_unchanged(before, *_modules(webui))
    assert webui.mm.log[-1] == ("empty_cache", True)  # the training's memory is given back
    files = sorted(os.listdir(tmp_path / "Lora")) if os.path.isdir(tmp_path / "Lora") else []
    assert files == (["char.json", "char.preview.png", "char.safetensors"] if outcome == "stop" else [])
    # the next generation is the same as without any training
    assert torch.equal(generate(webui, "pipchr"), generate(webui, "pipchr"))


def test_a_lora_merged_by_the_last_generation_is_not_trained_on(images, tmp_path):
    """Forge merges LoRAs into the weights (under inference mode); training must start from the checkpoint."""
    webui = make_forge(tmp_path, "sd1")
    _train(webui, images, webui.lora_dir, name="other", learning_rate=2e-2)
    clean = generate(webui, "pipchr")
    sd_model = webui.sd_models.model_data.sd_model
    checkpoint = snapshot(*sd_model.modules())  # after a generation without LoRA: the checkpoint's weights
    with_other = generate(webui, "<lora:other:1> pipchr")  # the last generation merged a LoRA into them
    assert not torch.equal(sd_model.modules()[0].state_dict()["diffusion_model.input_blocks.1.1.proj_in.weight"],
                           checkpoint[0]["state"]["diffusion_model.input_blocks.1.1.proj_in.weight"])
    seen = {}

    def progress(p):  # during training (also after a preview): the checkpoint's weights, not merged with 'other'
        seen[p.step] = {k: v.clone() for k, v in sd_model.modules()[0].state_dict().items()}

    host = ForgeHost.for_job(webui)
    Trainer(host, _cfg(preview_every=2), images, webui.lora_dir, progress=progress).run()
    assert sorted(seen) == [1, 2, 3, 4]
    assert all(torch.equal(state[k], checkpoint[0]["state"][k]) for state in seen.values() for k in state)
    assert torch.equal(generate(webui, "pipchr"), clean)  # after training everything is as before
    assert torch.equal(generate(webui, "<lora:other:1> pipchr"), with_other)


def test_overwriting_a_lora_takes_effect_at_once(images, tmp_path):
    """Forge caches LoRA files by name and skips an unchanged LoRA set: an overwrite must still show."""
    webui = make_forge(tmp_path, "sd1")
    _train(webui, images, webui.lora_dir, seed=1, learning_rate=2e-2)
    first = generate(webui, "<lora:char:1> pipchr")
    assert torch.equal(generate(webui, "<lora:char:1> pipchr"), first)  # cached and hash-skipped as in Forge
    _, result = _train(webui, images, webui.lora_dir, seed=2, learning_rate=3e-2, overwrite=True)
    host = ForgeHost(webui.sd_models.model_data.sd_model, webui)
    assert host.refresh_lora_list() is None
    second = generate(webui, "<lora:char:1> pipchr")
    assert torch.isfinite(second).all() and (second - first).abs().max() > 1e-4
    # what a fresh Forge would compute from the file on disk
    webui.networks.load_lora_state_dict.cache_clear()
    webui.sd_models.model_data.sd_model.current_lora_hash = "[]"
    generate(webui, "pipchr")
    assert torch.equal(generate(webui, "<lora:char:1> pipchr"), second)


def test_previews_go_through_forges_processing_and_training_survives_them(images, tmp_path):
    """A preview samples under inference mode and may push the UNet off the device (low VRAM):
    training must go on with autograd-safe weights on the device."""
    webui = make_forge(tmp_path, "sdxl")
    webui.mm.low_vram = True
    seen = []
    host = ForgeHost.for_job(webui)
    trainer = Trainer(host, _cfg(steps=5, preview_every=2, seed=3), images, webui.lora_dir,
                      on_preview=lambda step, im: seen.append(step))
    result = trainer.run()
    assert result.status == "done" and seen == [2, 4]
    hooks = sum(1 for n in trainer.network.loras if n.startswith("lora_unet"))
    assert webui.processing.runs == [hooks] * 3  # previews at 2, 4 and the card picture, with the LoRA on
    assert not any("preview picture could not be made" in w for w in result.warnings)
    # a checkpoint switch selected during training: no preview (it would make Forge switch models)
    webui.sd_models.select("tiny_sdxl.safetensors", unet_storage_dtype=None)
    trainer = Trainer(host, _cfg(name="p2", steps=2, preview_every=1), images, webui.lora_dir)
    result = trainer.run()
    assert result.status == "done" and any("another checkpoint was selected" in w for w in result.warnings)


def test_memory_manager_bookkeeping(images, tmp_path):
    webui = make_forge(tmp_path, "sd1")
    generate(webui, "pipchr")
    webui.mm.partial = True  # the UNet does not fit: Forge streams part of it from the CPU
    webui.mm.current_loaded_models[-1].model_accelerated = True  # so it was for the last generation
    webui.mm.log.clear()
    host = ForgeHost.for_job(webui)
    result = Trainer(host, _cfg(steps=2, train_text_encoder=False), images, webui.lora_dir).run()
    log = webui.mm.log
    assert log[0] == ("unload_all",)  # a partial load is never trained on
    assert ("load", ["KModel", "ModuleDict"]) in log  # UNet and text encoders loaded for the run
    assert ("unload", "AutoencoderKL") in log  # the VAE leaves once every latent is cached
    assert log[-1] == ("empty_cache", True)
    assert any("did not fit on the GPU" in w for w in host.warnings) and result.status == "done"
    webui.mm.partial = False  # e.g. after a restart with more free VRAM
    webui.mm.unload_all_models()
    generate(webui, "pipchr")
    webui.mm.log.clear()
    Trainer(ForgeHost.for_job(webui), _cfg(name="c2", steps=2), images, webui.lora_dir).run()
    assert ("unload_all",) not in webui.mm.log  # a full load is kept: the next generation is as fast as before


def test_lazy_load_checkpoint_switch_and_refusals(images, tmp_path):
    models = {"a.safetensors": ("sd1", "eps", {}), "xl.safetensors": ("sdxl", "eps", {}),
              "flux.safetensors": ("sd1", "eps", {"kind": "Flux"}), "sd3.safetensors": ("sd1", "eps",
                                                                                       {"kind": "StableDiffusion3"}),
              "fp8.safetensors": ("sd1", "eps", {"storage_dtype": torch.float8_e4m3fn}),
              "inpaint.safetensors": ("sd1", "eps", {"inpaint": True}),
              "refiner.safetensors": ("sdxl", "eps", {"refiner": True}),
              "edm.safetensors": ("sdxl", "eps", {"prediction_type": "edm"})}
    webui = make_forge(tmp_path, models=models)
    lock = threading.Lock()
    host = ForgeHost.for_request(webui, lock)  # nothing loaded yet: loaded now, under the queue lock
    assert host.arch == "sd1" and webui.sd_models.loads == 1 and not lock.locked()
    assert forge.describe(webui).endswith("**a.safetensors** — SD1")
    webui.sd_models.select("xl.safetensors")  # Forge switches lazily, at the next generation or job
    assert ForgeHost.for_request(webui, lock).arch == "sd1"  # a request only checks the loaded model
    assert "Forge loads it when the training starts" in forge.describe(webui)
    assert ForgeHost.for_job(webui).arch == "sdxl" and webui.sd_models.loads == 2
    for name, text in [("flux.safetensors", "Flux models cannot be trained"), ("sd3.safetensors", "StableDiffusion3"),
                       ("fp8.safetensors", "Diffusion in Low Bits"), ("inpaint.safetensors", "inpainting"),
                       ("refiner.safetensors", "refiner"), ("edm.safetensors", "'edm'"),
                       ("missing.safetensors", "could not load the selected checkpoint")]:
        webui.sd_models.select(name)
        with pytest.raises(UnsupportedModelError, match=text):
            ForgeHost.for_job(webui)
    assert "**missing.safetensors**" in forge.describe(webui)


def test_service_on_forge_checks_against_the_model_that_runs(images, tmp_path):
    """A request checked on one checkpoint, another selected before the job runs: a clear failure."""
    from tests.test_api import PICS
    from lib_charlora.service import TrainService
    models = {"a.safetensors": ("sd1", "eps", {}), "xl.safetensors": ("sdxl", "eps", {})}
    webui = make_forge(tmp_path, models=models)
    lock = threading.Lock()
    service = TrainService(lambda: ForgeHost.for_request(webui, lock), webui.lora_dir, lock=lock,
                           job_host_factory=lambda: ForgeHost.for_job(webui))
    body = {"name": "pip", "images": PICS, "steps": 2, "resolution": 64, "preset": "fast"}
    job = service.submit(dict(body))
    assert service.runner.wait(job.id, 120) and job.status == "done", job.error
    with lock:  # a generation runs; meanwhile the user selects the SDXL checkpoint
        job = service.submit(dict(body, name="pip2"))
        webui.sd_models.select("xl.safetensors")
    assert service.runner.wait(job.id, 120) and job.status == "failed"
    assert "changed since the request was checked (SD1 -> SDXL)" in job.error
    assert not os.path.exists(os.path.join(webui.lora_dir, "pip2.safetensors"))


def test_clip_skip_and_sdxl_sizes_reach_the_model(tmp_path):
    """Text goes through Forge's own engines: the clip-skip setting and per-picture SDXL sizes count."""
    webui = make_forge(tmp_path, "sd1")
    sd_model = ForgeHost.for_job(webui).sd_model
    out = {}
    for skip in (1, 2):
        webui.shared.opts.CLIP_stop_at_last_layers = skip
        host = ForgeHost(sd_model, webui)
        with host.session(), torch.no_grad():
            out[skip] = host.encode_text(["pipchr"], [None])["context"]
    assert host.clip_skip == 2 and not torch.allclose(out[1], out[2])
    xl = ForgeHost.for_job(make_forge(tmp_path / "xl", "sdxl"))
    with torch.no_grad():
        a = xl.encode_text(["pipchr"], [(1024, 768, 0, 0, 64, 64)])
        b = xl.encode_text(["pipchr"], [(512, 512, 32, 0, 64, 64)])
    assert torch.equal(a["context"], b["context"]) and not torch.allclose(a["y"], b["y"])
