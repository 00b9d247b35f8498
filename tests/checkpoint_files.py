"""Tiny single-file checkpoints in the layout WebUIs load (tests only).

The UNet and VAE are the real ldm modules A1111 runs (compvis names as they are in real files); the
text encoders are transformers CLIP models with CLIP's real 49408-token vocabulary, written under the
LDM prefixes — HF layout for CLIP ViT-L (SD1, SDXL's first), open_clip layout for SD2 and SDXL's second.
``modules`` are returned too, so a test can compare the loaded pipeline against the originals.
``size="full"`` gives SD1.5's real widths (a random-weight stand-in for a real v1-5 file: same keys and
shapes, 1.07 B parameters; benchmarks/vs_kohya.py); under ``torch.device("meta")`` it builds no weights.
"""
import os

import torch
from torch import nn

from lib_charlora.tiny import _rerandomize_zero_layers

VOCAB = 49408


def _rerandomize(module):
    if not any(p.is_meta for p in module.parameters()):
        _rerandomize_zero_layers(module)


class LdmVae(nn.Module):
    """ldm's Encoder / Decoder with the quant convs: the ``first_stage_model.*`` keys of a checkpoint."""

    def __init__(self, size="tiny"):
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder, Encoder
        if size == "full":  # SD's VAE (kl-f8)
            dd = dict(ch=128, out_ch=3, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=[], in_channels=3,
                      resolution=256, z_channels=4)
        else:
            dd = dict(ch=32, out_ch=3, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=[], in_channels=3,
                      resolution=64, z_channels=4)
        self.encoder = Encoder(double_z=True, **dd)
        self.decoder = Decoder(**dd)
        self.quant_conv = nn.Conv2d(8, 8, 1)
        self.post_quant_conv = nn.Conv2d(4, 4, 1)


def clip_text(hidden, layers=2, act="quick_gelu", projection=None, intermediate=None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate or hidden * 2,
                         num_attention_heads=max(1, hidden // 64), num_hidden_layers=layers,
                         max_position_embeddings=77, hidden_act=act, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,
                         pad_token_id=VOCAB - 1, projection_dim=projection or hidden)
    model = CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)
    _rerandomize(model)
    return model.eval()


def _hf_state(model):
    """HF CLIP text keys without the ``text_model.`` wrapper (it differs across transformers versions)."""
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in model.state_dict().items()
            if "position_ids" not in k}


def hf_layout(model, prefix):
    return {prefix + "text_model." + k: v for k, v in _hf_state(model).items() if not k.startswith("text_projection")}


def open_clip_layout(model, prefix):
    """The same weights under open_clip's names (fused q/k/v, ``c_fc`` / ``c_proj``, ``text_projection``
    as a [hidden, projection] matrix)."""
    s = _hf_state(model)
    out = {prefix + "token_embedding.weight": s["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": s["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": s["final_layer_norm.weight"], prefix + "ln_final.bias": s["final_layer_norm.bias"]}
    n = model.config.num_hidden_layers
    for i in range(n):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[dst + f"attn.in_proj_{part}"] = torch.cat(
                [s[src + f"self_attn.{p}_proj.{part}"] for p in ("q", "k", "v")])
            out[dst + f"attn.out_proj.{part}"] = s[src + f"self_attn.out_proj.{part}"]
            out[dst + f"ln_1.{part}"] = s[src + f"layer_norm1.{part}"]
            out[dst + f"ln_2.{part}"] = s[src + f"layer_norm2.{part}"]
            out[dst + f"mlp.c_fc.{part}"] = s[src + f"mlp.fc1.{part}"]
            out[dst + f"mlp.c_proj.{part}"] = s[src + f"mlp.fc2.{part}"]
    if "text_projection.weight" in s:
        out[prefix + "text_projection"] = s["text_projection.weight"].T.contiguous()
    else:
        out[prefix + "text_projection"] = torch.eye(model.config.hidden_size)
    return out


def ldm_unet(arch, size="tiny"):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    if size == "full":  # SD1.5's UNet (v1-inference.yaml)
        if arch != "sd1":
            raise ValueError("size='full' is SD1.5 only")
        unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4],
                         num_res_blocks=2, attention_resolutions=[4, 2, 1], num_heads=8, use_spatial_transformer=True,
                         transformer_depth=1, context_dim=768, legacy=False)
    elif arch == "sdxl":  # SDXL's layout: no attention on the first level; sgm's label_emb for pooled text + sizes
        unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2, 2],
                         num_res_blocks=2, attention_resolutions=[2, 4], num_head_channels=16,
                         use_spatial_transformer=True, transformer_depth=2, context_dim=[64 + 128] * 2,
                         use_linear_in_transformer=True, legacy=False)
        unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(128 + 6 * 8, 128), nn.SiLU(), nn.Linear(128, 128)))
        unet.num_classes = "sequential"
    else:
        unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2, 4, 4],
                         num_res_blocks=2, attention_resolutions=[4, 2, 1], num_heads=2,
                         use_spatial_transformer=True, transformer_depth=1, context_dim=64,
                         use_linear_in_transformer=arch == "sd2", legacy=False)
    _rerandomize(unet)
    return unet.eval()


YAML = {
    "sd1": "model:\n  params:\n    unet_config:\n      params:\n        num_heads: 2\n",
    "sd2": "model:\n  params:\n    parameterization: \"{pred}\"\n    unet_config:\n      params:\n        num_heads: 2\n",
    "sdxl": "model:\n  params:\n    network_config:\n      params:\n        num_head_channels: 16\n",
}


def checkpoint_state(arch="sd1", size="tiny"):
    """``(state dict under the checkpoint's names, modules)`` of fresh random modules."""
    unet, vae = ldm_unet(arch, size), LdmVae(size)
    _rerandomize(vae)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    if arch == "sd1":
        tes = [clip_text(768, layers=12, intermediate=3072) if size == "full" else clip_text(64)]  # CLIP ViT-L/14
        sd.update(hf_layout(tes[0], "cond_stage_model.transformer."))
    elif arch == "sd2":
        tes = [clip_text(64, layers=3, act="gelu")]  # the last block is unused (penultimate layer)
        sd.update(open_clip_layout(tes[0], "cond_stage_model.model."))
    else:
        tes = [clip_text(64), clip_text(128, act="gelu", projection=128)]
        sd.update(hf_layout(tes[0], "conditioner.embedders.0.transformer."))
        sd.update(open_clip_layout(tes[1], "conditioner.embedders.1.model."))
    return sd, {"unet": unet, "vae": vae, "text_encoders": tes}


def write_checkpoint(folder, arch="sd1", prediction="eps", seed=0, name=None, yaml=True, dtype=torch.float32,
                     size="tiny"):
    """Writes ``<folder>/<name>.safetensors`` (+ the WebUI-style ``.yaml`` beside it). Returns (path, modules)."""
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    sd, modules = checkpoint_state(arch, size)
    if prediction == "v" and arch == "sdxl":
        sd["v_pred"] = torch.tensor([])
    name = name or f"{size}-{arch}-{prediction}"
    path = os.path.join(folder, name + ".safetensors")
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, path)
    if yaml and arch in YAML:
        text = YAML[arch].format(pred="v" if prediction == "v" else "eps")
        with open(os.path.join(folder, name + ".yaml"), "w", encoding="utf-8") as f:
            f.write(text.replace("num_heads: 2", "num_heads: 8") if size == "full" else text)
    return path, modules
