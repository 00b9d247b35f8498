"""The written file: kohya key names, real loaders (diffusers, A1111's rule), full-size key sets,
metadata, hash, sidecars, atomic write."""
import copy
import json
import os

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

from lib_charlora.engine import Component, LoRANetwork, OutputExistsError, TrainConfig, Trainer, export, naming
from lib_charlora.tiny import tiny_host
from tests.a1111_rule import OpenClipText, a1111_mapping, check_file_keys, convert_diffusers_name
from tests.conftest import warm


def _randomize(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in net.loras.values():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.05)


# -- naming --------------------------------------------------------------------------------------

def test_a1111_documented_examples():
    # reference/a1111-host.md §5.3 (checked there by running A1111's function)
    sd1 = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_1_attentions_1_proj_in": "diffusion_model_input_blocks_5_1_proj_in",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj":
            "diffusion_model_output_blocks_11_1_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0":
            "diffusion_model_middle_block_1_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_down_blocks_0_resnets_1_conv1": "diffusion_model_input_blocks_2_0_in_layers_2",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "transformer_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": "1_model_transformer_resblocks_0_attn_q_proj",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": "1_model_transformer_resblocks_0_mlp_c_fc",
    }
    for key, want in sd1.items():
        assert convert_diffusers_name(key, False) == want
    assert convert_diffusers_name("lora_te_text_model_encoder_layers_0_self_attn_q_proj", True) == \
        "model_transformer_resblocks_0_attn_q_proj"


def test_block_arithmetic_both_ways():
    # hypertile's hand-written SD1.5 depth table pairs these (a1111-host.md §7)
    pairs = [("down_blocks.1.attentions.0.transformer_blocks.0.attn1", "input_blocks.4.1.transformer_blocks.0.attn1"),
             ("up_blocks.3.attentions.2.proj_out", "output_blocks.11.1.proj_out"),
             ("down_blocks.0.attentions.1.proj_in", "input_blocks.2.1.proj_in"),
             ("mid_block.attentions.0.transformer_blocks.0.ff.net.2", "middle_block.1.transformer_blocks.0.ff.net.2"),
             ("up_blocks.1.attentions.0.proj_in", "output_blocks.3.1.proj_in")]
    for dif, ldm in pairs:
        assert naming.diffusers_to_ldm_unet(dif) == ldm
        assert naming.ldm_to_diffusers_unet(ldm) == dif
    assert naming.unet_module_name("input_blocks.4.1.proj_in", "ldm_unet", "sd1") == "lora_unet_down_blocks_1_attentions_0_proj_in"
    assert naming.unet_module_name("down_blocks.1.attentions.0.proj_in", "diffusers_unet", "sdxl") == \
        "lora_unet_input_blocks_4_1_proj_in"
    with pytest.raises(ValueError, match="no kohya name rule"):
        naming.ldm_to_diffusers_unet("input_blocks.4.0.in_layers.2")


# -- A1111's key matching -----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_every_key_resolves_with_a1111_rule(arch):
    """ldm UNet (compvis names) + the text encoders in A1111's layout: HF CLIP for SD1 / SDXL TE1,
    open_clip with nn.MultiheadAttention for SD2 / SDXL TE2."""
    host = tiny_host("ldm", arch)
    unet = host.unet.module
    hf = host.text_encoders[0].module
    oc = OpenClipText(d=32, layers=2)
    if arch == "sd1":
        tes = [(hf, "hf_clip", "te", "lora_te")]
    elif arch == "sd2":
        tes = [(oc, "open_clip", "te", "lora_te")]
    else:
        tes = [(hf, "hf_clip", "te1", "lora_te1"), (oc, "open_clip", "te2", "lora_te2")]
    net = LoRANetwork(4, 2)
    net.add_component(host.unet)
    for module, scheme, name, prefix in tes:
        net.add_component(Component(name, module, prefix, scheme, arch))
    tensors = net.kohya_state_dict()
    mapping = a1111_mapping(unet, [(m, s) for m, s, _, _ in tes], arch)
    matched, failures = check_file_keys(tensors, mapping)
    assert failures == []
    assert len(matched) == len(net.loras) == len(tensors) // 3
    unet_keys = [k for k in net.loras if k.startswith("lora_unet_")]
    if arch == "sdxl":
        assert all(k.startswith("lora_unet_input_blocks_") or k.startswith(("lora_unet_middle_block_",
                                                                              "lora_unet_output_blocks_"))
                   for k in unet_keys)
    else:
        assert all(k.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_"))
                   for k in unet_keys)


def test_trained_file_resolves_and_carries_metadata(images, tmp_path):
    host = warm(tiny_host("ldm", "sd1", model_name="tiny.safetensors"))
    host.model_hash, host.model_sha256 = "0123abcd", "ab" * 32
    cfg = TrainConfig(name="pip_v1", trigger="sks", steps=4, rank=4, alpha=2, train_text_encoder=True,
                      resolution=64, learning_rate=1e-3, seed=1, comment="test run")
    result = Trainer(host, cfg, images, str(tmp_path)).run()
    path = tmp_path / "pip_v1.safetensors"
    assert result.status == "done" and result.path == str(path)
    assert sorted(os.listdir(tmp_path)) == ["pip_v1.json", "pip_v1.preview.png", "pip_v1.safetensors"]
    tensors = safetensors.torch.load_file(str(path))
    assert len(tensors) == result.num_keys == 3 * (192 + 12)
    assert all(v.dtype == torch.float16 for v in tensors.values())
    assert all(v.item() == 2.0 for k, v in tensors.items() if k.endswith(".alpha"))
    mapping = a1111_mapping(host.unet.module, [(host.text_encoders[0].module, "hf_clip")], "sd1")
    matched, failures = check_file_keys(tensors, mapping)
    assert failures == [] and len(matched) == 204

    with safetensors.safe_open(str(path), "pt") as f:
        md = f.metadata()
    assert md["sshs_model_hash"] == export.addnet_hash(str(path))
    expected = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
                "ss_output_name": "pip_v1", "ss_base_model_version": "sd_v1", "ss_v2": "False",
                "ss_steps": "4", "ss_max_train_steps": "4", "ss_num_train_images": "4", "ss_seed": "1",
                "ss_network_train_unet_only": "False", "ss_sd_model_name": "tiny.safetensors",
                "ss_sd_model_hash": "0123abcd", "ss_new_sd_model_hash": "ab" * 32, "ss_training_comment": "test run",
                "ss_resolution": "(64, 64)", "modelspec.architecture": "stable-diffusion-v1/lora",
                "modelspec.trigger_phrase": "sks", "modelspec.title": "pip_v1"}
    assert {k: md.get(k) for k in expected} == expected
    tags = json.loads(md["ss_tag_frequency"])["images"]
    assert tags[images[0].caption.split(",")[0]] >= 1
    for key in ("ss_session_id", "ss_training_started_at", "ss_training_finished_at", "ss_lr_scheduler",
                "ss_optimizer", "ss_mixed_precision", "ss_bucket_info", "ss_dataset_dirs", "ss_num_epochs",
                "modelspec.sai_model_spec", "modelspec.date", "modelspec.resolution", "modelspec.prediction_type"):
        assert key in md, key
    card = json.loads((tmp_path / "pip_v1.json").read_text())
    assert card["activation text"] == "sks" and card["sd version"] == "SD1" and card["preferred weight"] == 1

    # existing output: refused without overwrite, before any training; replaced with it
    data = path.read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        Trainer(host, cfg, images, str(tmp_path)).run()
    assert path.read_bytes() == data
    cfg.overwrite = True
    Trainer(host, cfg, images, str(tmp_path)).run()
    assert path.read_bytes() != data


@pytest.mark.parametrize("fail_at", ["safetensors", "card"])
def test_crash_during_write_leaves_nothing(tmp_path, monkeypatch, fail_at):
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 3, dtype=torch.float16)}
    real = export._write_file

    def broken(path, chunks):
        if path.endswith(".safetensors.tmp" if fail_at == "safetensors" else ".json.tmp"):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(28, "No space left on device")
        real(path, chunks)

    monkeypatch.setattr(export, "_write_file", broken)
    from PIL import Image
    with pytest.raises(OSError, match="No space"):
        export.write_lora(str(tmp_path / "a.safetensors"), tensors, {"k": "v"}, preview=Image.new("RGB", (8, 8)),
                          card={"activation text": "x"})
    assert os.listdir(tmp_path) == []
    # overwriting a good file that then fails keeps the old file intact
    monkeypatch.setattr(export, "_write_file", real)
    export.write_lora(str(tmp_path / "a.safetensors"), tensors, {"k": "v"})
    old = (tmp_path / "a.safetensors").read_bytes()
    monkeypatch.setattr(export, "_write_file", broken)
    with pytest.raises(OSError):
        export.write_lora(str(tmp_path / "a.safetensors"), tensors, {"k": "v2"}, overwrite=True,
                          card={"activation text": "x"})
    assert os.listdir(tmp_path) == ["a.safetensors"] and (tmp_path / "a.safetensors").read_bytes() == old


# -- full-size architectures on the meta device ------------------------------------------------

_ATTN = [f"attn{i}_{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out_0")] + ["ff_net_0_proj", "ff_net_2"]


def _kohya_rule_diffusers(unet, prefix="lora_unet"):
    """kohya's rule read off a diffusers UNet: every Linear / 1x1 conv inside a Transformer2DModel."""
    names = set()
    for path, mod in unet.named_modules():
        if type(mod).__name__ != "Transformer2DModel":
            continue
        for sub, child in mod.named_modules():
            if isinstance(child, nn.Linear) or (isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1)):
                names.add(f"{prefix}_{path}.{sub}".replace(".", "_"))
    return names


def _sdxl_compvis_names():
    """kohya's SDXL names from SDXL's documented block table (a1111-host.md §5.3)."""
    depth = {"input_blocks_4_1": 2, "input_blocks_5_1": 2, "input_blocks_7_1": 10, "input_blocks_8_1": 10,
             "middle_block_1": 10, **{f"output_blocks_{i}_1": 10 for i in (0, 1, 2)},
             **{f"output_blocks_{i}_1": 2 for i in (3, 4, 5)}}
    names = set()
    for block, n in depth.items():
        names |= {f"lora_unet_{block}_proj_in", f"lora_unet_{block}_proj_out"}
        names |= {f"lora_unet_{block}_transformer_blocks_{k}_{a}" for k in range(n) for a in _ATTN}
    return names


def _te_names(prefix, layers):
    parts = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
    return {f"{prefix}_text_model_encoder_layers_{i}_{p}" for i in range(layers) for p in parts}


def _clip(hidden, layers, heads, inter, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=inter, projection_dim=1280)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _data_bytes(tensors):
    chunks = export.serialize_with_hash(tensors, {"k": "v"})
    return len(chunks[2])


@pytest.mark.parametrize("case", ["sd15-diffusers", "sd15-ldm", "sdxl-diffusers"])
def test_full_size_key_set_and_file_size(case):
    from diffusers import UNet2DConditionModel
    arch, kind = case.split("-")
    with torch.device("meta"):
        if case == "sd15-ldm":
            from ldm.modules.diffusionmodules.openaimodel import UNetModel
            unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                             attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
                             num_heads=8, use_spatial_transformer=True, transformer_depth=1, context_dim=768,
                             legacy=False)
            reference = UNet2DConditionModel()  # diffusers' defaults are SD1.5's
        elif arch == "sd15":
            unet = reference = UNet2DConditionModel()
        else:
            unet = UNet2DConditionModel(
                block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                       "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)
        if arch == "sd15":
            tes = [("te", "lora_te", _clip(768, 12, 12, 3072))]
        else:
            tes = [("te1", "lora_te1", _clip(768, 12, 12, 3072)),
                   ("te2", "lora_te2", _clip(1280, 32, 20, 5120, projection=True))]
    sd_arch = "sd1" if arch == "sd15" else "sdxl"
    scheme = "ldm_unet" if kind == "ldm" else "diffusers_unet"
    sizes = {}
    for rank in (1, 2):
        net = LoRANetwork(rank, rank)
        net.add_component(Component("unet", unet, "lora_unet", scheme, sd_arch))
        for name, prefix, te in tes:
            net.add_component(Component(name, te, prefix, "hf_clip", sd_arch))
        if arch == "sd15":
            expected_unet = _kohya_rule_diffusers(reference)
            assert len(expected_unet) == 192
        else:
            expected_unet = _sdxl_compvis_names()
            assert len(expected_unet) == 722
        expected = expected_unet | set().union(*(_te_names(p, 32 if n == "te2" else 12) for n, p, _ in tes))
        assert set(net.loras) == expected
        # size arithmetic: fp16 down [r, in] + up [out, r] + a scalar alpha per module
        dims = []
        for _, mod in [*((p, m) for p, m in _targets(unet, "unet")), *((p, m) for _, _, te in tes for p, m in _targets(te, "text"))]:
            dims.append((mod.in_channels, mod.out_channels) if isinstance(mod, nn.Conv2d) else (mod.in_features, mod.out_features))
        assert len(dims) == len(expected)
        tensors = net.kohya_state_dict()
        sizes[rank] = _data_bytes(tensors)
        assert sizes[rank] == sum(rank * (i + o) * 2 + 2 for i, o in dims)
    per_rank = sizes[2] - sizes[1]
    print(f"{case}: {len(expected)} modules, {per_rank / 2**20:.2f} MiB per rank (fp16)")


def _targets(module, kind):
    from lib_charlora.engine import find_targets
    return find_targets(module, kind)


# -- diffusers' loader --------------------------------------------------------------------------

def _pipeline(host):
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    tok = host._tokenizers
    te = [copy.deepcopy(c.module) for c in host.text_encoders]
    common = dict(vae=copy.deepcopy(host.vae), unet=copy.deepcopy(host.unet.module), scheduler=DDPMScheduler(steps_offset=1, clip_sample=False))
    if host.arch == "sdxl":
        return StableDiffusionXLPipeline(text_encoder=te[0], text_encoder_2=te[1], tokenizer=tok[0], tokenizer_2=tok[1],
                                         **common)
    return StableDiffusionPipeline(text_encoder=te[0], tokenizer=tok[0], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False, **common)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("with_te", [False, True])
def test_diffusers_loads_every_key(arch, with_te, tmp_path, diffusers_log):
    host = warm(tiny_host("diffusers", arch))
    net = LoRANetwork(4, 8)
    for comp in [host.unet] + (list(host.text_encoders) if with_te else []):
        net.add_component(comp)
    _randomize(net)
    with torch.no_grad():  # compare on the fp16-rounded weights the file holds
        for p in net.parameters():
            p.copy_(p.half().float())
    path = export.write_lora(str(tmp_path / "x.safetensors"), net.kohya_state_dict(), {"ss_network_module": "networks.lora"})

    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    size = [(64, 64, 0, 0, 64, 64)] * 2
    with torch.no_grad():
        base = host.predict(noisy, t, host.encode_text(["sks, a girl", "sks"], size))
        net.attach()
        ours = host.predict(noisy, t, host.encode_text(["sks, a girl", "sks"], size))
        net.detach()

    pipe = _pipeline(host)
    pipe.load_lora_weights(path)
    bad = [r.getMessage() for r in diffusers_log.records if r.levelname in ("WARNING", "ERROR")
           and not r.getMessage().startswith("No LoRA keys associated to CLIPTextModel")]
    assert bad == []
    assert not any("unexpected keys" in r.getMessage() or "missing keys" in r.getMessage() for r in diffusers_log.records)
    ignored = [r.getMessage() for r in diffusers_log.records if r.getMessage().startswith("No LoRA keys")]
    assert len(ignored) == (0 if with_te else len(host.text_encoders))
    loaded_host = copy.copy(host)
    loaded_host.unet = Component("unet", pipe.unet, "lora_unet", "diffusers_unet", arch)
    loaded_host.text_encoders = [Component(c.name, m, c.prefix, c.scheme, arch) for c, m in
                                 zip(host.text_encoders, [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else []))]
    with torch.no_grad():
        theirs = loaded_host.predict(noisy, t, loaded_host.encode_text(["sks, a girl", "sks"], size))
    assert (ours - base).abs().max() > 0.05
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=2e-4)
