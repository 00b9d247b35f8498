"""Test-side model of how A1111 v1.10's built-in Lora extension matches file keys to modules.

Written from the documented behaviour (shared/reference/a1111-host.md §5.2-5.4), independent of
our exporter: module names are the host's dotted paths with "." -> "_" (text encoders under the
``cond_stage_model.wrapped`` / ``conditioner.embedders[i].wrapped`` layout), keys are first
converted from diffusers-style names, then two fallbacks are tried.
"""
import re

from torch import nn

_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                  "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def _oc_suffix(rest):
    if "mlp_fc1" in rest:
        return rest.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in rest:
        return rest.replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")


def convert_diffusers_name(key, is_sd2):
    """The documented rules of ``convert_diffusers_name_to_compvis``."""
    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)",
         lambda m: f"diffusion_model_time_embed_{2 * int(m[1]) - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_input_blocks_{1 + 3 * int(m[1]) + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
                   f"{_RESNET_SUFFIX.get(m[4], m[4]) if m[2] == 'resnets' else m[4]}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else 2 * int(m[2])}_"
                   f"{_RESNET_SUFFIX.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_output_blocks_{3 * int(m[1]) + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
                   f"{_RESNET_SUFFIX.get(m[4], m[4]) if m[2] == 'resnets' else m[4]}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_{3 + 3 * int(m[1])}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"diffusion_model_output_blocks_{2 + 3 * int(m[1])}_{2 if int(m[1]) > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
         lambda m: f"model_transformer_resblocks_{m[1]}_{_oc_suffix(m[2])}" if is_sd2
         else f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"),
        (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
         lambda m: f"1_model_transformer_resblocks_{m[1]}_{_oc_suffix(m[2])}"),
    ]
    for pattern, build in rules:
        m = re.match(pattern, key)
        if m:
            return build(m)
    return key


def resolve(module_key, mapping):
    """A file's module key -> (host key, module) or (last key tried, None)."""
    is_sd2 = "model_transformer_resblocks" in mapping
    key = convert_diffusers_name(module_key, is_sd2)
    module = mapping.get(key)
    if module is None:
        m = _X_PROJ.match(key)
        if m:
            module = mapping.get(m.group(1))
    if module is None and "lora_unet" in module_key:
        key = module_key.replace("lora_unet", "diffusion_model")
        module = mapping.get(key)
    elif module is None and "lora_te1_text_model" in module_key:
        key = module_key.replace("lora_te1_text_model", "0_transformer_text_model")
        module = mapping.get(key)
        if module is None:
            key = module_key.replace("lora_te1_text_model", "transformer_text_model")
            module = mapping.get(key)
    return key, module


class _HFWrapped(nn.Module):
    """``FrozenCLIPEmbedder``'s layout: ``.transformer`` = CLIPTextModel with a ``text_model`` child
    (transformers 4.x, as A1111 ships; transformers 5 flattens CLIPTextModel)."""

    def __init__(self, clip):
        super().__init__()
        if not hasattr(clip, "text_model"):
            holder = nn.Module()
            holder.text_model = clip
            clip = holder
        self.transformer = clip


class _OpenClipWrapped(nn.Module):
    """``FrozenOpenCLIPEmbedder(2)``'s layout: ``.model.transformer.resblocks``."""

    def __init__(self, oc):
        super().__init__()
        self.model = oc


def a1111_mapping(unet, text_encoders, arch):
    """``network_layer_mapping`` as ``assign_network_names_to_compvis_modules`` builds it.

    ``unet``: the compvis-named UNet (``sd_model.model.diffusion_model``); ``text_encoders``:
    [(module, "hf_clip" | "open_clip")] in embedder order.
    """
    wrapped = [(_HFWrapped(m) if scheme == "hf_clip" else _OpenClipWrapped(m)) for m, scheme in text_encoders]
    mapping = {}
    if arch == "sdxl":
        for i, w in enumerate(wrapped):
            for name, module in w.named_modules():
                mapping[f"{i}_{name.replace('.', '_')}"] = module
    else:
        for name, module in wrapped[0].named_modules():
            mapping[name.replace(".", "_")] = module
    model = nn.Module()
    model.diffusion_model = unet
    for name, module in model.named_modules():
        mapping[name.replace(".", "_")] = module
    return mapping


def check_file_keys(tensors, mapping):
    """Resolve every key of a LoRA state dict; check the tensor shapes fit the matched module.

    Returns (matched {host key: module key}, failures [str]). Shapes follow §5.4: Linear down
    [r, in] / up [out, r]; 1x1 conv the same with [.., 1, 1]; MultiheadAttention q/k/v/out against
    its embed dim, and only if all four are present.
    """
    groups = {}
    for k, v in tensors.items():
        module_key, _, part = k.partition(".")
        groups.setdefault(module_key, {})[part] = v
    matched, failures, mha_parts = {}, [], {}
    for module_key, parts in groups.items():
        key, module = resolve(module_key, mapping)
        if module is None:
            failures.append(f"{module_key}: no module (tried {key})")
            continue
        if set(parts) != {"lora_down.weight", "lora_up.weight", "alpha"}:
            failures.append(f"{module_key}: parts {sorted(parts)}")
            continue
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        parent = mapping.get(key[:-len("_out_proj")]) if key.endswith("_out_proj") else None
        if isinstance(parent, nn.MultiheadAttention):
            mha_parts.setdefault(id(parent), set()).add("out")
        if isinstance(module, nn.MultiheadAttention):
            in_f = out_f = module.embed_dim
            mha_parts.setdefault(id(module), set()).add(module_key.rsplit("_", 2)[-2])
        elif isinstance(module, nn.Conv2d):
            in_f, out_f = module.in_channels, module.out_channels
            if tuple(module.kernel_size) != (1, 1):
                failures.append(f"{module_key}: matched a {module.kernel_size} conv")
        else:
            out_f, in_f = module.weight.shape[:2]
        r = down.shape[0]
        if down.reshape(r, -1).shape != (r, in_f) or up.reshape(up.shape[0], -1).shape != (out_f, r):
            failures.append(f"{module_key}: down {tuple(down.shape)} up {tuple(up.shape)} vs module {in_f}->{out_f}")
        if parts["alpha"].numel() != 1:
            failures.append(f"{module_key}: alpha is not a scalar")
        matched[key] = module_key
    for parts in mha_parts.values():
        if parts != {"q", "k", "v", "out"}:
            failures.append(f"MultiheadAttention with only {sorted(parts)}: A1111 ignores a partial set")
    return matched, failures


class OpenClipBlock(nn.Module):
    """The module layout of open_clip's ResidualAttentionBlock (SD2 / SDXL text encoder 2)."""

    def __init__(self, d, batch_first=False):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=batch_first)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(d, 4 * d))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


OpenClipBlock.__name__ = "ResidualAttentionBlock"


class OpenClipText(nn.Module):
    """open_clip's text tower layout: ``transformer.resblocks.N``."""

    def __init__(self, d=16, layers=2, batch_first=False):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([OpenClipBlock(d, batch_first) for _ in range(layers)])

    def forward(self, x):
        for b in self.transformer.resblocks:
            x = b(x)
        return x

