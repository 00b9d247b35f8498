"""A test double of A1111 1.10's loaded model (``shared.sd_model``), built around the real ldm UNet.

Object layout, attribute names and call signatures follow shared/reference/a1111-host.md §2:
``LatentDiffusion`` (SD1 / SD2) and ``DiffusionEngine`` (SDXL) with ``model.diffusion_model``,
the hijacked text wrappers (``cond_stage_model.wrapped``; SDXL ``conditioner.embedders[i].wrapped``),
``first_stage_model``, ``encode_first_stage`` / ``get_first_stage_encoding``, ``apply_model`` and
``alphas_cumprod_original``. Text encoders are tiny HF CLIP (SD1, SDXL TE1; shown with transformers
4.x's ``text_model`` level, as A1111 ships) and open_clip-shaped towers with ``nn.MultiheadAttention``
(SD2, SDXL TE2).
"""
import contextlib
import types

import torch
from torch import nn

from lib_charlora.hosts.standalone import fourier_embedding, sd_alphas_cumprod
from lib_charlora.tiny import tiny_ldm_unet, tiny_text_encoder, tiny_tokenizer, tiny_vae
from tests.a1111_rule import OpenClipBlock


class _CLIPWithTextModel(nn.Module):
    """transformers 4.x layout (``.text_model``) over a transformers 5 CLIPTextModel."""

    def __init__(self, clip):
        super().__init__()
        self.text_model = clip

    def forward(self, *args, **kwargs):
        return self.text_model(*args, **kwargs)


class FrozenCLIPEmbedder(nn.Module):
    def __init__(self, tokenizer, hidden):
        super().__init__()
        self.tokenizer = tokenizer
        self.transformer = _CLIPWithTextModel(tiny_text_encoder(tokenizer, hidden))

    def hidden(self, texts):
        ids = self.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return self.transformer(ids.to(next(self.parameters()).device), output_hidden_states=True)


class OpenCLIPText(nn.Module):
    """open_clip's text tower: token_embedding, positional_embedding, transformer.resblocks, ln_final."""

    def __init__(self, vocab, width=32, layers=2, projection=32):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(77, width) * 0.01)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([OpenClipBlock(width) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        with torch.no_grad():
            self.ln_final.bias.normal_(std=0.02)
        self.text_projection = nn.Parameter(torch.randn(width, projection) * width ** -0.5)


class FrozenOpenCLIPEmbedder(nn.Module):
    """ldm's / sgm's open_clip embedder: penultimate layer (+ pooled output for SDXL)."""

    def __init__(self, tokenizer, width=32):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = OpenCLIPText(len(tokenizer), width)

    def encode(self, texts):
        ids = self.tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids.to(self.model.positional_embedding.device)
        x = self.model.token_embedding(ids) + self.model.positional_embedding
        x = x.permute(1, 0, 2)  # LND, as open_clip
        blocks = self.model.transformer.resblocks
        for blk in blocks[:-1]:
            x = blk(x)
        penultimate = x.permute(1, 0, 2)
        last = self.model.ln_final(blocks[-1](x).permute(1, 0, 2))
        eot = ids.argmax(dim=-1)  # the end-of-text token has the highest id in this vocabulary
        pooled = last[torch.arange(last.shape[0]), eot] @ self.model.text_projection
        return self.model.ln_final(penultimate), pooled


class HijackedCLIP(nn.Module):
    """``FrozenCLIPEmbedderWithCustomWords``: call with a list of prompts; honours clip skip."""

    def __init__(self, wrapped, opts):
        super().__init__()
        self.wrapped, self.opts = wrapped, opts

    def forward(self, texts):
        out = self.wrapped.hidden(texts)
        skip = getattr(self.opts, "CLIP_stop_at_last_layers", 1)
        if skip > 1:
            return self.wrapped.transformer.text_model.final_layer_norm(out.hidden_states[-skip])
        return out.last_hidden_state


class HijackedOpenCLIP(nn.Module):
    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, texts):
        return self.wrapped.encode(texts)[0]


class DiffusionWrapper(nn.Module):
    def __init__(self, unet, conditioning_key="crossattn"):
        super().__init__()
        self.diffusion_model = unet
        self.conditioning_key = conditioning_key


class _Embedder(nn.Module):
    def __init__(self, wrapped=None):
        super().__init__()
        self.is_trainable = False  # sgm's inference config: the conditioner runs it under no_grad
        if wrapped is not None:
            self.wrapped = wrapped


class Conditioner(nn.Module):
    """sgm's GeneralConditioner as A1111 hijacks it: CLIP-L, bigG (+ pooled) and 3 size embedders."""

    def __init__(self, tokenizer, size_embed_dim=8, text_embedders=2):
        super().__init__()
        self.size_embed_dim = size_embed_dim
        embs = [_Embedder(FrozenCLIPEmbedder(tokenizer, 32))]
        if text_embedders == 2:
            embs.append(_Embedder(FrozenOpenCLIPEmbedder(tokenizer, 32)))
        embs += [_Embedder() for _ in range(3)]
        self.embedders = nn.ModuleList(embs)

    def forward(self, batch):
        texts = batch["txt"]
        with (contextlib.nullcontext() if self.embedders[0].is_trainable else torch.no_grad()):
            h1 = self.embedders[0].wrapped.hidden(texts).hidden_states[-2]
        with (contextlib.nullcontext() if self.embedders[1].is_trainable else torch.no_grad()):
            h2, pooled = self.embedders[1].wrapped.encode(texts)
        sizes = [batch["original_size_as_tuple"], batch["crop_coords_top_left"], batch["target_size_as_tuple"]]
        b = h1.shape[0]
        fourier = [fourier_embedding(s.flatten(), self.size_embed_dim).reshape(b, -1) for s in sizes]
        return {"crossattn": torch.cat([h1, h2], dim=-1), "vector": torch.cat([pooled] + fourier, dim=-1)}


class _Latents(nn.Module):
    def __init__(self, vae, scale_factor):
        super().__init__()
        self.first_stage_model = vae
        self.scale_factor = scale_factor

    @torch.no_grad()
    def _encode(self, x):
        return self.first_stage_model.encode(x).latent_dist


class LatentDiffusion(_Latents):
    def __init__(self, unet, cond_stage_model, vae, parameterization, conditioning_key="crossattn"):
        super().__init__(vae, 0.18215)
        self.model = DiffusionWrapper(unet, conditioning_key)
        self.cond_stage_model = cond_stage_model
        self.parameterization = parameterization
        self.cond_stage_key = "txt"
        ac = sd_alphas_cumprod()
        self.register_buffer("alphas_cumprod", ac.clone())
        self.alphas_cumprod_original = ac.clone()

    def encode_first_stage(self, x):
        return self._encode(x)

    def get_first_stage_encoding(self, dist):
        return dist.sample() * self.scale_factor

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, timesteps=t, context=cond)


class DiffusionEngine(_Latents):
    def __init__(self, unet, conditioner, vae, parameterization="eps"):
        super().__init__(vae, 0.13025)
        self.model = DiffusionWrapper(unet)
        self.conditioner = conditioner
        self.cond_stage_model = conditioner  # as sd_hijack sets it
        self.parameterization = parameterization
        self.alphas_cumprod = sd_alphas_cumprod()
        self.alphas_cumprod_original = self.alphas_cumprod

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self._encode(x).sample() * self.scale_factor

    def get_first_stage_encoding(self, x):  # A1111 patches it to the identity for SDXL
        return x

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, timesteps=t, context=cond["crossattn"], y=cond["vector"])


def make_sd_model(arch="sd1", prediction="eps", seed=0, text_embedders=2, conditioning_key="crossattn", opts=None,
                  unet=None, text_width=32):
    """``unet``, ``text_width``: another SD1 ldm UNet and CLIP width (benchmarks/train_speed.py: full size)."""
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    opts = opts or types.SimpleNamespace(CLIP_stop_at_last_layers=1)
    if arch == "sdxl":
        m = DiffusionEngine(tiny_ldm_unet("sdxl"), Conditioner(tok, text_embedders=text_embedders), tiny_vae(),
                            prediction)
    elif arch == "sd2":
        m = LatentDiffusion(tiny_ldm_unet("sd2"), HijackedOpenCLIP(FrozenOpenCLIPEmbedder(tok, 32)), tiny_vae(),
                            prediction, conditioning_key)
    else:
        m = LatentDiffusion(unet or tiny_ldm_unet("sd1"), HijackedCLIP(FrozenCLIPEmbedder(tok, text_width), opts), tiny_vae(),
                            prediction, conditioning_key)
    m.is_sdxl, m.is_sd2, m.is_sd1 = arch == "sdxl", arch == "sd2", arch == "sd1"
    m.is_sd3 = m.is_ssd = False
    m.sd_checkpoint_info = types.SimpleNamespace(name=f"tiny_{arch}.safetensors", hash="1234abcd", sha256="cd" * 32)
    m.eval()
    with torch.no_grad():  # run once, as a WebUI has before training (transformers installs hooks on first use)
        if arch == "sdxl" and text_embedders == 2:
            z = torch.zeros(1, 2)
            m.conditioner({"txt": ["warm up"], "original_size_as_tuple": z, "crop_coords_top_left": z,
                           "target_size_as_tuple": z})
        elif arch != "sdxl":
            m.cond_stage_model(["warm up"])
    return m


def webui_mapping(sd_model):
    """``network_layer_mapping`` as ``assign_network_names_to_compvis_modules`` builds it."""
    mapping = {}
    if sd_model.is_sdxl:
        for i, embedder in enumerate(sd_model.conditioner.embedders):
            if hasattr(embedder, "wrapped"):
                for name, module in embedder.wrapped.named_modules():
                    mapping[f"{i}_{name.replace('.', '_')}"] = module
    else:
        cond = getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model)
        for name, module in cond.named_modules():
            mapping[name.replace(".", "_")] = module
    for name, module in sd_model.model.named_modules():
        mapping[name.replace(".", "_")] = module
    return mapping


class FakeNetworks:
    """The parts of the built-in Lora extension's ``networks`` module the adapter calls."""

    def __init__(self):
        self.calls = []

    def load_networks(self, names, *args, **kwargs):
        self.calls.append(("load_networks", list(names)))

    def list_available_networks(self):
        self.calls.append(("list_available_networks",))
