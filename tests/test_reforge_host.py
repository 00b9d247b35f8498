"""The reForge adapter: A1111's model layout (the A1111 double) over a ComfyUI-style backend whose
patchers merge a generation's LoRA into the weights in place, under inference mode (forge_double's
patchers and memory manager) — what a real reForge did (forge-host.md §9)."""
import functools
import types

import torch

from lib_charlora.engine import TrainConfig, Trainer
from lib_charlora.hosts.reforge import ReForgeHost
from tests.a1111_double import FakeNetworks, make_sd_model
from tests.forge_double import MemoryManagement, ModelPatcher, ForgeObjects

NS = types.SimpleNamespace


def make_reforge():
    sd_model = make_sd_model("sd1")
    vae = NS(first_stage_model=sd_model.first_stage_model, patcher=ModelPatcher(sd_model.first_stage_model))
    clip = NS(cond_stage_model=sd_model.cond_stage_model, patcher=ModelPatcher(sd_model.cond_stage_model))
    sd_model.forge_objects = ForgeObjects(ModelPatcher(sd_model.model), clip, vae)
    sd_model.forge_objects_original = sd_model.forge_objects.shallow_copy()
    sd_model.forge_objects_after_applying_lora = sd_model.forge_objects.shallow_copy()
    sd_model.current_lora_hash = str([])
    networks = FakeNetworks()
    networks.load_lora_state_dict = functools.lru_cache(maxsize=5)(lambda filename: {})
    processing_runs = []

    def process_images(p):
        processing_runs.append(p)
        with torch.inference_mode():  # reForge samples under inference mode; low VRAM: the VAE evicts the UNet
            mm.load_models_gpu([vae.patcher])
        from PIL import Image
        return NS(images=[Image.new("RGB", (8, 8))])

    mm = MemoryManagement()
    processing = NS(StableDiffusionProcessingTxt2Img=lambda **kw: NS(**kw), process_images=process_images)
    scripts = NS(ScriptRunner=lambda: NS(alwayson_scripts=[]))
    host = ReForgeHost(sd_model, NS(lowvram=False, medvram=False), NS(CLIP_stop_at_last_layers=1),
                       NS(device="cpu", fp8=False), networks, processing=processing, scripts=scripts,
                       model_management=mm)
    return host, mm, processing_runs


def generate_with_lora(host, mm, strength=1.0):
    """A generation with <lora:other:1>: a patcher clone with the LoRA, loaded (merged) under inference mode."""
    sd_model = host.sd_model
    unet = sd_model.forge_objects_original.unet
    clone = unet.clone()
    g = torch.Generator().manual_seed(5)
    patches = {}
    for key, p in unet.model.named_parameters():
        if key.endswith("attn1.to_q.weight"):
            patches[key] = (torch.randn(p.shape[0], 2, generator=g), torch.randn(2, p.shape[1], generator=g), 2.0)
    clone.add_patches("other.safetensors", patches, strength)
    sd_model.forge_objects.unet = clone
    sd_model.current_lora_hash = "[['other.safetensors', 1.0, 1.0]]"
    mm.low_vram = True
    with torch.inference_mode():
        mm.load_models_gpu([clone])
    return patches


def test_trains_on_the_checkpoint_after_a_lora_generation_and_previews(images, tmp_path):
    host, mm, runs = make_reforge()
    unet = host.sd_model.model
    clean = {k: v.clone() for k, v in unet.state_dict().items()}
    patches = generate_with_lora(host, mm)
    merged = {k: v.clone() for k, v in unet.state_dict().items()}
    assert any(not torch.equal(merged[k], clean[k]) for k in patches)
    assert all(p.is_inference() for k, p in unet.named_parameters() if k in patches)  # as reForge leaves them
    seen = {}

    def progress(p):  # the checkpoint's weights during training, also after a preview
        seen[p.step] = all(torch.equal(v, clean[k]) for k, v in unet.state_dict().items())

    cfg = TrainConfig(name="char", trigger="pipchr", steps=4, rank=4, alpha=4, resolution=64, learning_rate=1e-3,
                      train_text_encoder=True, log_every=1, preview_every=2)
    cache = str(tmp_path / "latents")
    result = Trainer(host, cfg, images, str(tmp_path), progress=progress, latent_cache_dir=cache).run()
    assert result.status == "done" and seen == {1: True, 2: True, 3: True, 4: True}
    assert len(runs) == 2 and runs[0].scripts.alwayson_scripts == [] and runs[0].script_args == []
    assert all(o == {"force_full_load": True} for o in mm.load_options if o)  # UNet and TE fully on the device
    assert ("unload", "AutoencoderKL") in mm.log  # the VAE leaves through the manager once latents are cached
    assert not any("preview" in w for w in result.warnings)
    # after training: the checkpoint's weights; the next generation with the LoRA merges it again
    assert all(torch.equal(v, clean[k]) for k, v in unet.state_dict().items())
    generate_with_lora(host, mm)
    assert all(torch.equal(v, merged[k]) for k, v in unet.state_dict().items())
    # again, with every latent on disk (no VAE encode): the session itself restores the weights
    seen.clear()
    cfg.overwrite, cfg.preview_every = True, 0
    assert Trainer(host, cfg, images, str(tmp_path), progress=progress, latent_cache_dir=cache).run().status == "done"
    assert seen == {1: True, 2: True, 3: True, 4: True}
    # a rewritten file of the same name is read anew by the next generation
    host.networks.load_lora_state_dict("char.safetensors")
    host.sd_model.current_lora_hash = "[['char.safetensors', 1.0, 1.0]]"
    assert host.refresh_lora_list() is None
    assert host.networks.load_lora_state_dict.cache_info().currsize == 0 and host.sd_model.current_lora_hash == "[]"
