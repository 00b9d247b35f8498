"""Tiny random-weight Stable Diffusion models built from the real architecture code.

No weights are downloaded: the demo and the tests build SD1.5-, SD2- and SDXL-shaped models with
the block layout of the real ones (so key arithmetic is the same) but a few million parameters.
Builders exist for diffusers modules and for ldm modules (compvis names, as A1111 / Forge use).
"""
import json
import os
import tempfile

import torch
from torch import nn

CONTEXT = {"sd1": 32, "sd2": 32, "sdxl": 64}


def _bytes_to_unicode():
    """The byte -> printable-character table of byte-level BPE (CLIP, GPT-2)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tiny_tokenizer(directory=None):
    """A byte-level CLIP tokenizer: 256 byte tokens, their end-of-word forms, a few merges, BOS/EOS."""
    from transformers import CLIPTokenizer
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(chars)})
    merges = [("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("s", "k"), ("sk", "s</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory = directory or tempfile.mkdtemp(prefix="charlora_tok_")
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)
    return CLIPTokenizer.from_pretrained(directory)


def tiny_text_encoder(tokenizer, hidden=32, projection=None, layers=2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    n = len(tokenizer)
    cfg = CLIPTextConfig(vocab_size=n, hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=layers, max_position_embeddings=77, bos_token_id=n - 2,
                         eos_token_id=n - 1, pad_token_id=n - 1, projection_dim=projection or hidden)
    model = CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)
    _nonzero_norm_biases(model)
    return model.eval()


def tiny_vae():
    """4 levels like SD's VAE, so latents are 1/8 of the image."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                         layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()


def tiny_diffusers_unet(arch="sd1"):
    from diffusers import UNet2DConditionModel
    if arch == "sdxl":
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8, cross_attention_dim=64, norm_num_groups=32).eval()
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=CONTEXT[arch], attention_head_dim=8, norm_num_groups=32,
        use_linear_projection=arch == "sd2").eval()


def tiny_ldm_unet(arch="sd1", size_embed_dim=8, pooled_dim=32):
    """ldm ``UNetModel`` with SD1.5's block layout (SD2: linear proj_in/out; SDXL: 3 levels, linear
    projections, a ``label_emb`` for the pooled-text + size vector, like sgm)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    if arch == "sdxl":
        unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2, 2],
                         num_res_blocks=2, attention_resolutions=[1, 2, 4], num_head_channels=16,
                         use_spatial_transformer=True, transformer_depth=1, context_dim=CONTEXT["sdxl"],
                         use_linear_in_transformer=True, legacy=False)
        ted = 32 * 4
        unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(pooled_dim + 6 * size_embed_dim, ted), nn.SiLU(),
                                                     nn.Linear(ted, ted)))
        unet.num_classes = "sequential"  # ldm's forward then adds label_emb(y), as sgm's does
    else:
        unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2, 4, 4],
                         num_res_blocks=2, attention_resolutions=[4, 2, 1], num_heads=2,
                         use_spatial_transformer=True, transformer_depth=1, context_dim=CONTEXT[arch],
                         use_linear_in_transformer=arch == "sd2", legacy=False)
    _rerandomize_zero_layers(unet)
    return unet.eval()


@torch.no_grad()
def _rerandomize_zero_layers(module):
    """ldm zero-initialises output convs and proj_out; PyTorch's default init makes the random
    test model non-trivial (a zero output layer would make the UNet a constant)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not m.weight.any():
            m.reset_parameters()
    _nonzero_norm_biases(module)


@torch.no_grad()
def _nonzero_norm_biases(module):
    # A zero final-LayerNorm bias makes A1111's emphasis step divide 0 by 0.
    for m in module.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.bias is not None and not m.bias.any():
            m.bias.normal_(std=0.02)


def tiny_host(kind="diffusers", arch="sd1", prediction="eps", seed=0, device="cpu", model_name=None):
    """A ready host around freshly built tiny random-weight modules."""
    from .hosts.standalone import DiffusersHost, LdmHost
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    if arch == "sdxl":
        tok2 = tok
        tes = [(tiny_text_encoder(tok, 32), tok), (tiny_text_encoder(tok2, 32, projection=32), tok2)]
    else:
        tes = [(tiny_text_encoder(tok, CONTEXT[arch]), tok)]
    vae = tiny_vae()
    name = model_name or f"tiny-{kind}-{arch}-{prediction}"
    if kind == "diffusers":
        unet = tiny_diffusers_unet(arch)
        host = DiffusersHost(unet, vae, tes, arch=arch, prediction=prediction, model_name=name)
    elif kind == "ldm":
        unet = tiny_ldm_unet(arch)
        host = LdmHost(unet, vae, tes, arch=arch, prediction=prediction, model_name=name, size_embed_dim=8)
    else:
        raise ValueError(f"unknown host kind {kind!r}")
    for m in host.all_modules():
        m.to(device)
    host.device = torch.device(device)
    return host
