"""The A1111 adapter, driven through a double of A1111's loaded-model API built on the real ldm UNet."""
import os
import types

import pytest
import safetensors.torch
import torch

from lib_charlora.engine import CancelToken, ConfigError, TrainConfig, Trainer, UnsupportedModelError
from lib_charlora.hosts.a1111 import A1111Host
from tests.a1111_double import FakeNetworks, make_sd_model, webui_mapping
from tests.a1111_rule import check_file_keys
from tests.conftest import assert_unchanged, fault_at, snapshot

NS = types.SimpleNamespace


def _host(sd_model, networks=None, **cmd):
    cmd_opts = NS(**{"lowvram": False, "medvram": False, "medvram_sdxl": False, **cmd})
    return A1111Host(sd_model, cmd_opts, NS(CLIP_stop_at_last_layers=1, fp8_storage="Disable"),
                     NS(device="cpu", fp8=False), networks)


def _cfg(**kw):
    base = dict(name="char", trigger="pipchr", steps=4, rank=4, alpha=4, resolution=64, learning_rate=1e-3,
                train_text_encoder=True, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("arch,prediction", [("sd1", "eps"), ("sd2", "v"), ("sdxl", "eps")])
def test_trains_and_every_key_resolves(arch, prediction, images, tmp_path):
    sd_model = make_sd_model(arch, prediction)
    nets = FakeNetworks()
    host = _host(sd_model, nets)
    assert (host.arch, host.prediction) == (arch, prediction)
    assert [c.scheme for c in host.text_encoders] == {"sd1": ["hf_clip"], "sd2": ["open_clip"],
                                                      "sdxl": ["hf_clip", "open_clip"]}[arch]
    before = snapshot(sd_model)
    result = Trainer(host, _cfg(), images, str(tmp_path)).run()
    assert result.status == "done" and all(torch.isfinite(torch.tensor(v)) for _, v in result.loss_history)
    assert_unchanged(before, sd_model)
    assert nets.calls[0] == ("load_networks", [])  # merged LoRAs of the last generation are cleared first
    assert host.refresh_lora_list() is None and nets.calls[-1] == ("list_available_networks",)
    tensors = safetensors.torch.load_file(result.path)
    matched, failures = check_file_keys(tensors, webui_mapping(sd_model))
    assert failures == [] and len(matched) == len(tensors) // 3
    te_prefixes = {k.split("_text_model")[0] for k in tensors if "_text_model" in k}
    assert te_prefixes == ({"lora_te1", "lora_te2"} if arch == "sdxl" else {"lora_te"})


def test_training_changes_the_output_and_detach_restores_it(images, tmp_path):
    sd_model = make_sd_model("sdxl")
    host = _host(sd_model)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    sizes = [(64, 64, 0, 0, 64, 64)]
    with torch.no_grad():
        base = host.predict(x, t, host.encode_text(["pipchr"], sizes))
    trainer = Trainer(host, _cfg(steps=6, learning_rate=1e-2), images, str(tmp_path))
    trainer.run()
    trainer.network.attach()
    with torch.no_grad():
        tuned = host.predict(x, t, host.encode_text(["pipchr"], sizes))
    trainer.network.detach()
    with torch.no_grad():
        again = host.predict(x, t, host.encode_text(["pipchr"], sizes))
    assert (tuned - base).abs().max() > 1e-4
    assert torch.equal(again, base)


@pytest.mark.parametrize("outcome", ["stop", "cancel", "error"])
def test_model_restored_in_every_outcome(outcome, images, tmp_path, monkeypatch):
    sd_model = make_sd_model("sd1")
    host = _host(sd_model)
    before = snapshot(sd_model)
    token = CancelToken()

    progress = fault_at(2, outcome, token)
    trainer = Trainer(host, _cfg(steps=10, gradient_checkpointing=True), images, str(tmp_path), progress=progress,
                      cancel=token)
    if outcome == "error":
        with pytest.raises(RuntimeError, match="simulated"):
            trainer.run()
    else:
        result = trainer.run()
        assert result.status == {"stop": "stopped", "cancel": "cancelled"}[outcome]
    assert_unchanged(before, sd_model)
    files = sorted(os.listdir(tmp_path))
    assert files == (["char.json", "char.preview.png", "char.safetensors"] if outcome == "stop" else [])


def test_refusals_say_what_to_change():
    cases = [
        (dict(sd_model=make_sd_model("sd1"), lowvram=True), "--lowvram"),
        (dict(sd_model=make_sd_model("sd1", conditioning_key="hybrid")), "inpainting"),
        (dict(sd_model=make_sd_model("sdxl", text_embedders=1)), "refiner"),
    ]
    for kw, text in cases:
        sd_model = kw.pop("sd_model")
        with pytest.raises(UnsupportedModelError, match=text):
            _host(sd_model, **kw)
    m = make_sd_model("sd1")
    m.cond_stage_key = "edit"
    with pytest.raises(UnsupportedModelError, match="pix2pix"):
        _host(m)
    m = make_sd_model("sd1")
    m.is_sd3 = True
    with pytest.raises(UnsupportedModelError, match="SD3"):
        _host(m)
    with pytest.raises(UnsupportedModelError, match="FP8"):
        A1111Host(make_sd_model("sd1"), NS(lowvram=False), NS(fp8_storage="Enable"), NS(device="cpu", fp8=True))
    with pytest.raises(UnsupportedModelError, match="no checkpoint"):
        A1111Host(None)


def test_medvram_trains_unet_only(images, tmp_path):
    host = _host(make_sd_model("sd1"), medvram=True)
    with pytest.raises(ConfigError, match="train_text_encoder"):
        Trainer(host, _cfg(), images, str(tmp_path)).run()
    assert os.listdir(tmp_path) == []
    result = Trainer(host, _cfg(train_text_encoder=False), images, str(tmp_path)).run()
    assert result.status == "done"
    # through the service (tab, API) a request for text-encoder training is trained UNet-only, and says so
    from lib_charlora.service import TrainService
    from tests.test_api import PICS
    spec = TrainService(lambda: host, str(tmp_path / "Lora")).parse(
        {"name": "pip", "images": PICS, "resolution": 64, "train_text_encoder": True})
    assert spec.config.train_text_encoder is False
    assert any("text encoder is not trained" in w and "--medvram" in w for w in spec.report["warnings"])


def test_clip_skip_and_sizes_reach_the_model(images):
    opts = NS(CLIP_stop_at_last_layers=2, fp8_storage="Disable")
    sd_model = make_sd_model("sd1", opts=opts)
    host = A1111Host(sd_model, NS(lowvram=False, medvram=False), opts, NS(device="cpu", fp8=False))
    assert host.clip_skip == 2
    with torch.no_grad():
        skipped = host.encode_text(["pipchr"], [None])["c"]
        opts.CLIP_stop_at_last_layers = 1
        plain = host.encode_text(["pipchr"], [None])["c"]
    assert not torch.allclose(skipped, plain)  # the WebUI's own text path, with its settings
    xl = _host(make_sd_model("sdxl"))
    with torch.no_grad():
        a = xl.encode_text(["pipchr"], [(1024, 768, 0, 0, 64, 64)])["vector"]
        b = xl.encode_text(["pipchr"], [(512, 512, 32, 0, 64, 64)])["vector"]
    assert a.shape == b.shape and not torch.allclose(a, b)  # per-picture size / crop conditioning


def test_card_preview_comes_from_the_webui_sampler_with_the_lora_active(images, tmp_path):
    from PIL import Image
    sd_model = make_sd_model("sd1")
    calls = []

    class Txt2Img:
        def __init__(self, **kw):
            self.kw = kw

    def process_images(p):
        hooked = sum(len(m._forward_hooks) for m in sd_model.model.diffusion_model.modules())
        assert p.scripts.alwayson_scripts == [] and p.script_args == []  # no other extension runs (reForge needs a runner)
        calls.append((p.kw, hooked))
        return NS(images=[Image.new("RGB", (p.kw["width"], p.kw["height"]), (1, 2, 3))])

    host = A1111Host(sd_model, NS(lowvram=False, medvram=False), NS(CLIP_stop_at_last_layers=1),
                     NS(device="cpu", fp8=False), None, processing=NS(StableDiffusionProcessingTxt2Img=Txt2Img,
                                                                      process_images=process_images),
                     scripts=NS(ScriptRunner=lambda: NS(alwayson_scripts=[])))
    before = snapshot(sd_model)
    result = Trainer(host, _cfg(seed=7), images, str(tmp_path)).run()
    (kw, hooked), = calls
    assert kw["prompt"] == "pipchr" and kw["seed"] == 7 and (kw["width"], kw["height"]) == (64, 64)
    assert kw["do_not_save_samples"] and kw["sd_model"] is sd_model and kw["scheduler"] == "Automatic"
    assert hooked == 192  # every UNet target carries our LoRA while the WebUI samples
    assert Image.open(tmp_path / "char.preview.png").getpixel((0, 0)) == (1, 2, 3)
    assert_unchanged(before, sd_model)
    # the built-in Lora extension disabled: training works, the refresh is skipped with a note
    assert "built-in Lora extension is disabled" in host.refresh_lora_list()

    def broken(p):
        raise RuntimeError("sampler exploded")
    host.processing = NS(StableDiffusionProcessingTxt2Img=Txt2Img, process_images=broken)
    result = Trainer(host, _cfg(name="char2"), images, str(tmp_path)).run()
    assert result.status == "done" and any("preview picture could not be made" in w for w in result.warnings)
    assert os.path.isfile(tmp_path / "char2.preview.png")


def test_sdxl_text_encoders_really_train(images, tmp_path):
    """sgm runs non-trainable embedders under no_grad; the session must lift that for TE training."""
    sd_model = make_sd_model("sdxl")
    host = _host(sd_model)
    before = snapshot(sd_model)
    trainer = Trainer(host, _cfg(steps=3, learning_rate=1e-2, text_encoder_lr=1e-2), images, str(tmp_path))
    trainer.run()
    ups = {k: v for k, v in trainer.network.state_dict().items() if "lora_te" in k and "lora_up" in k}
    assert ups and all(v.abs().sum() > 0 for k, v in ups.items() if "lora_te1_text_model_encoder_layers_1_" not in k)
    assert [e.is_trainable for e in sd_model.conditioner.embedders] == [False] * 5
    assert_unchanged(before, sd_model)


def test_previews_during_training_do_not_change_the_result(images, tmp_path):
    from PIL import Image
    calls = []

    def process_images(p):
        torch.manual_seed(12345)  # the WebUI's sampler reseeds the global RNG
        torch.rand(100)
        hooked = sum(len(m._forward_hooks) for m in sd_model.model.diffusion_model.modules())
        calls.append(hooked)
        return NS(images=[Image.new("RGB", (8, 8))])

    weights = []
    for preview_every in (0, 2):
        sd_model = make_sd_model("sd1")
        host = A1111Host(sd_model, NS(lowvram=False, medvram=False), NS(CLIP_stop_at_last_layers=1),
                         NS(device="cpu", fp8=False), None,
                         processing=NS(StableDiffusionProcessingTxt2Img=lambda **kw: NS(kw=kw),
                                       process_images=process_images))
        seen = []
        t = Trainer(host, _cfg(name=f"p{preview_every}", steps=5, dropout=0.2, preview_every=preview_every),
                    images, str(tmp_path), on_preview=lambda step, im: seen.append(step))
        t.run()
        weights.append({k: v.clone() for k, v in t.network.state_dict().items()})
        assert seen == ([2, 4] if preview_every else [])
    assert calls == [192, 192, 192, 192]  # card picture of run 1; previews at 2, 4 and the card of run 2
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_vae_leaves_the_gpu_after_latent_caching(images, tmp_path, monkeypatch):
    """On a GPU the VAE goes to the CPU once latents are cached and comes back for previews and at
    the end. CPU-only here: the VAE's device is faked and its moves recorded."""
    sd_model = make_sd_model("sd1")
    vae = sd_model.first_stage_model
    moves, gc = [], []
    where = {"device": torch.device("cuda", 0)}

    def to(device, *a, **k):
        moves.append(str(device))
        where["device"] = torch.device(device)
        return vae
    host = A1111Host(sd_model, NS(lowvram=False, medvram=False), NS(CLIP_stop_at_last_layers=1),
                     NS(device="cpu", fp8=False, torch_gc=lambda: gc.append(1)))
    monkeypatch.setattr(vae, "to", to)
    monkeypatch.setattr(host, "_vae_current_device", lambda: where["device"])
    Trainer(host, _cfg(steps=2, train_text_encoder=False), images, str(tmp_path)).run()
    assert moves == ["cpu", "cuda:0"] and gc == [1]  # off after caching, back at the end
    moves.clear()
    where["device"] = torch.device("cuda", 0)
    Trainer(host, _cfg(name="rc", steps=2, random_crop=True), images, str(tmp_path)).run()
    assert moves == []  # random crops encode every step: the VAE stays
