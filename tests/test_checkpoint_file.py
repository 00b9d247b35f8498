"""Single-file checkpoints load offline into diffusers modules that compute what the originals compute.

The files are written in the layout WebUIs load (ldm UNet / VAE, CLIP under the LDM prefixes); the
loaded pipeline's UNet, VAE and text encoders are compared with those source modules. Real-size
layouts are checked on the meta device (no memory).
"""
import os

import pytest
import torch

from checkpoint_files import LdmVae, clip_text, open_clip_layout, write_checkpoint
from lib_charlora.engine.errors import UnsupportedModelError
from lib_charlora.hosts import checkpoint_file as cf
from lib_charlora.hosts.standalone import fourier_embedding



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("checkpoints"))


@pytest.mark.parametrize("arch,prediction", [("sd1", "eps"), ("sd2", "v"), ("sdxl", "v")])
def test_checkpoint_loads_and_matches_its_modules(folder, arch, prediction):
    path, src = write_checkpoint(folder, arch, prediction)
    pipe, got_arch, got_pred = cf.load_pipeline(path)
    assert (got_arch, got_pred) == (arch, prediction)
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if prediction == "v" else "epsilon")
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    ctx = torch.randn(2, 7, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        if arch == "sdxl":
            pooled, ids = torch.randn(2, 128), torch.tensor([[64., 64, 0, 0, 64, 64], [96, 64, 8, 0, 64, 64]])
            y = torch.cat([pooled, fourier_embedding(ids.flatten(), 8).reshape(2, -1)], -1)
            want = src["unet"](x, t, context=[ctx, ctx], y=y)
            got = pipe.unet(x, t, encoder_hidden_states=ctx,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        else:
            want = src["unet"](x, t, context=ctx)
            got = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        assert torch.allclose(want, got, atol=1e-4), (want - got).abs().max()

        img = torch.rand(1, 3, 64, 64) * 2 - 1
        want = src["vae"].quant_conv(src["vae"].encoder(img))[:, :4]
        assert torch.allclose(want, pipe.vae.encode(img).latent_dist.mean, atol=1e-4)
        assert pipe.vae.config.scaling_factor == (0.13025 if arch == "sdxl" else 0.18215)

        ids = pipe.tokenizer(["a photo of the sks person"], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
        te = src["text_encoders"][0]
        want = te(ids, output_hidden_states=True).hidden_states
        got = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
        if arch == "sd2":  # the last block is dropped: the model conditions on the penultimate layer
            assert len(got) == len(want) - 1
            assert torch.allclose(want[-2], got[-1], atol=1e-5)
        else:
            assert torch.allclose(want[-1], got[-1], atol=1e-5)
        if arch == "sdxl":
            te2 = src["text_encoders"][1]
            ids2 = pipe.tokenizer_2(["a photo of the sks person"], padding="max_length", max_length=77,
                                    return_tensors="pt").input_ids
            a, b = te2(ids2, output_hidden_states=True), pipe.text_encoder_2(ids2, output_hidden_states=True)
            assert torch.allclose(a.hidden_states[-2], b.hidden_states[-2], atol=1e-5)
            assert torch.allclose(a.text_embeds, b.text_embeds, atol=1e-5)


def test_tokenizers_are_clips_real_ones(folder):
    for pad, pad_id in (("<|endoftext|>", 49407), ("!", 0)):
        directory = cf.write_clip_tokenizer(os.path.join(folder, f"tok{pad_id}"), pad)
        from transformers import CLIPTokenizer
        tok = CLIPTokenizer.from_pretrained(directory)
        assert len(tok) == 49408
        ids = tok("a photo of the sks person", padding="max_length", max_length=12).input_ids
        assert ids == [49406, 320, 1125, 539, 518, 48136, 2533, 49407] + [pad_id] * 4


def test_host_over_a_checkpoint_names_the_file_and_its_hash(folder):
    import hashlib
    path, _ = write_checkpoint(folder, "sd1", name="named")
    host = cf.load_host(path)
    assert host.model_name == "named" and host.arch == "sd1" and host.prediction == "eps"
    with open(path, "rb") as f:
        data = f.read()
    assert host.model_sha256 == hashlib.sha256(data).hexdigest()
    assert host.model_hash == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert host.vae_scaling_factor == 0.18215 and torch.allclose(host.alphas_cumprod, cf.sd_alphas_cumprod())


def test_prediction_override_and_sidecar_yaml(folder):
    path, _ = write_checkpoint(folder, "sd2", "v", name="sd2v")
    assert cf.load_pipeline(path)[2] == "v"                       # parameterization: "v" in the .yaml beside it
    assert cf.load_pipeline(path, prediction="eps")[2] == "eps"   # the flag wins
    other = os.path.join(folder, "eps.yaml")
    with open(other, "w", encoding="utf-8") as f:
        f.write("model:\n  params:\n    unet_config:\n      params:\n        num_heads: 2\n")
    assert cf.load_pipeline(path, config=other)[2] == "eps"       # --config replaces the sidecar


def _meta_ldm_unet(**kw):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    with torch.device("meta"):
        return UNetModel(image_size=64, in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4],
                         num_res_blocks=2, attention_resolutions=[4, 2, 1], use_spatial_transformer=True,
                         transformer_depth=1, legacy=False, **kw)


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_real_size_layouts_without_a_yaml(arch):
    """SD1.5 / SD2.x UNets at full size (meta tensors): the derived config is the published one, and a
    diffusers UNet built from it has exactly the converted checkpoint's keys and shapes."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    if arch == "sd1":
        unet = _meta_ldm_unet(num_heads=8, context_dim=768)
    else:
        unet = _meta_ldm_unet(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    cfg = cf.unet_config(sd, arch)
    assert cfg["block_out_channels"] == [320, 640, 1280, 1280] and cfg["layers_per_block"] == 2
    assert cfg["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert cfg["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    if arch == "sd1":
        assert (cfg["attention_head_dim"], cfg["cross_attention_dim"], cfg["use_linear_projection"]) == (8, 768, False)
    else:
        assert (cfg["attention_head_dim"], cfg["cross_attention_dim"], cfg["use_linear_projection"]) == \
            ([5, 10, 20, 20], 1024, True)
    with torch.device("meta"):
        model = UNet2DConditionModel(**cfg)
    converted = convert_ldm_unet_checkpoint(sd, model.config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == want


def test_text_config_of_open_clip_layout():
    te = clip_text(128, layers=3, act="gelu", projection=96)
    sd = open_clip_layout(te, cf.SDXL_TE2)
    cfg = cf._text_config(sd, cf.SDXL_TE2, True)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["projection_dim"],
            cfg["hidden_act"], cfg["intermediate_size"]) == (128, 3, 2, 96, "gelu", 256)


# -- refused files ------------------------------------------------------------------------------------------
def _save(folder, name, tensors):
    from safetensors.torch import save_file
    path = os.path.join(folder, name)
    save_file(tensors, path)
    return path


def test_refusals_name_the_problem(folder):
    with pytest.raises(cf.CheckpointError, match="no such file"):
        cf.load_pipeline(os.path.join(folder, "missing.safetensors"))
    with pytest.raises(cf.CheckpointError, match="expected a .safetensors"):
        cf.load_pipeline(__file__)
    pickled = os.path.join(folder, "model.ckpt")
    torch.save({"state_dict": {}}, pickled)
    with pytest.raises(cf.CheckpointError, match="--allow-pickle"):
        cf.load_pipeline(pickled)
    broken = os.path.join(folder, "broken.safetensors")
    with open(broken, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(cf.CheckpointError, match="not a readable safetensors"):
        cf.load_pipeline(broken)

    lora = _save(folder, "lora.safetensors", {"lora_unet_x.lora_down.weight": torch.zeros(4, 8)})
    with pytest.raises(UnsupportedModelError, match="LoRA"):
        cf.load_pipeline(lora)

    _, src = write_checkpoint(folder, "sd1", name="base")
    sd = cf.read_shapes(os.path.join(folder, "base.safetensors"))  # names and shapes only (meta tensors)
    assert all(v.is_meta for v in sd.values())
    inpaint = dict(sd)
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(w.shape[0], 9, *w.shape[2:])
    with pytest.raises(UnsupportedModelError, match="inpainting"):
        cf.layout_of(inpaint)
    refiner = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
    refiner["conditioner.embedders.0.model.text_projection"] = torch.zeros(4, 4)
    with pytest.raises(UnsupportedModelError, match="refiner"):
        cf.layout_of(refiner)
    unet_only = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(UnsupportedModelError, match="text encoder"):
        cf.layout_of(unet_only)
    no_vae = {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(UnsupportedModelError, match="VAE"):
        cf.layout_of(no_vae)
    small_vocab = dict(sd)
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    small_vocab[key] = sd[key][:1000]
    with pytest.raises(UnsupportedModelError, match="vocabulary"):
        cf.layout_of(small_vocab)


def test_vae_module_has_ldm_names():
    keys = set(LdmVae().state_dict())
    assert {"encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight"} <= keys


def test_pickled_checkpoint_with_allow_pickle_and_a_diffusers_folder(folder):
    import shutil

    from safetensors.torch import load_file
    path, src = write_checkpoint(folder, "sd1", name="pickled")
    ckpt = os.path.join(folder, "pickled.ckpt")
    torch.save({"state_dict": {**load_file(path), "global_step": torch.tensor(1)}, "epoch": 3}, ckpt)
    pipe, arch, pred = cf.load_pipeline(ckpt, allow_pickle=True)   # the .yaml beside it is found too
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, 64)
    with torch.no_grad():
        assert torch.allclose(src["unet"](x, t, context=ctx), pipe.unet(x, t, encoder_hidden_states=ctx).sample,
                              atol=1e-4)
    saved = os.path.join(folder, "as-diffusers")
    pipe.save_pretrained(saved)
    host = cf.load_host(saved)
    assert (host.arch, host.prediction, host.model_name) == ("sd1", "eps", "as-diffusers")
    assert host.model_sha256 is None
    other = os.path.join(folder, "not-sd")
    shutil.copytree(saved, other)
    with open(os.path.join(other, "model_index.json"), "w", encoding="utf-8") as f:
        f.write('{"_class_name": "FluxPipeline"}')
    with pytest.raises(UnsupportedModelError, match="FluxPipeline"):
        cf.load_pipeline(other)


def test_sd2_without_a_yaml_is_probed_for_v_prediction(folder):
    path, _ = write_checkpoint(folder, "sd2", "v", name="sd2-noyaml", yaml=False)
    pipe, arch, pred = cf.load_pipeline(path)
    assert arch == "sd2" and pred == ("v" if cf.probe_v_prediction(pipe.unet) else "eps")
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if pred == "v" else "epsilon")
