"""kohya module names for LoRA keys, derived from live module paths.

kohya sd-scripts writes, per architecture (DESIGN.md §2.3):

* SD1.x / SD2.x UNet: diffusers-style block names
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``);
* SDXL UNet: compvis-style block names (``lora_unet_input_blocks_4_1_...``);
* text encoders: Hugging Face CLIP names under ``lora_te`` (SD1/SD2) or
  ``lora_te1`` / ``lora_te2`` (SDXL), e.g. ``..._text_model_encoder_layers_0_self_attn_q_proj``.

A host module tree is either compvis-named (``ldm`` / ``sgm`` / Forge: ``input_blocks.4.1...``) or
diffusers-named (``down_blocks.1.attentions.0...``); text encoders are either HF CLIP
(``encoder.layers.0.self_attn.q_proj``) or open_clip (``transformer.resblocks.0.attn`` as one
``nn.MultiheadAttention``, ``mlp.c_fc``, ``mlp.c_proj``). The functions below convert between the two
UNet layouts with the block arithmetic both SD1.5 and SDXL share (3 input blocks per level:
2 res blocks + 1 down-sampler; 3 output blocks per level).
"""
import re

UNET_SCHEMES = ("ldm_unet", "diffusers_unet")
TEXT_SCHEMES = ("hf_clip", "open_clip")

_LDM_IN = re.compile(r"^input_blocks\.(\d+)\.1\.(.+)$")
_LDM_MID = re.compile(r"^middle_block\.1\.(.+)$")
_LDM_OUT = re.compile(r"^output_blocks\.(\d+)\.1\.(.+)$")
_DIF_DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_DIF_MID = re.compile(r"^mid_block\.attentions\.0\.(.+)$")
_DIF_UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")


def ldm_to_diffusers_unet(path):
    """``input_blocks.4.1.X`` -> ``down_blocks.1.attentions.0.X`` (transformer blocks only)."""
    m = _LDM_IN.match(path)
    if m:
        n = int(m.group(1))
        return f"down_blocks.{(n - 1) // 3}.attentions.{(n - 1) % 3}.{m.group(2)}"
    m = _LDM_MID.match(path)
    if m:
        return f"mid_block.attentions.0.{m.group(1)}"
    m = _LDM_OUT.match(path)
    if m:
        n = int(m.group(1))
        return f"up_blocks.{n // 3}.attentions.{n % 3}.{m.group(2)}"
    raise ValueError(f"no kohya name rule for UNet module {path!r} (only transformer blocks are mapped)")


def diffusers_to_ldm_unet(path):
    """``down_blocks.1.attentions.0.X`` -> ``input_blocks.4.1.X`` (transformer blocks only)."""
    m = _DIF_DOWN.match(path)
    if m:
        return f"input_blocks.{1 + 3 * int(m.group(1)) + int(m.group(2))}.1.{m.group(3)}"
    m = _DIF_MID.match(path)
    if m:
        return f"middle_block.1.{m.group(1)}"
    m = _DIF_UP.match(path)
    if m:
        return f"output_blocks.{3 * int(m.group(1)) + int(m.group(2))}.1.{m.group(3)}"
    raise ValueError(f"no kohya name rule for UNet module {path!r} (only transformer blocks are mapped)")


def unet_style_for_arch(arch):
    """The UNet naming kohya writes for an architecture: 'diffusers' (SD1/SD2) or 'compvis' (SDXL)."""
    return "compvis" if arch == "sdxl" else "diffusers"


def unet_module_name(path, scheme, arch, prefix="lora_unet"):
    if scheme not in UNET_SCHEMES:
        raise ValueError(f"unknown UNet naming scheme {scheme!r}")
    style = unet_style_for_arch(arch)
    if scheme == "ldm_unet" and style == "diffusers":
        path = ldm_to_diffusers_unet(path)
    elif scheme == "diffusers_unet" and style == "compvis":
        path = diffusers_to_ldm_unet(path)
    return f"{prefix}_{path.replace('.', '_')}"


_HF_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.(.+)$")
_OC_LAYER = re.compile(r"(?:^|\.)transformer\.resblocks\.(\d+)\.(.+)$")
_OC_SUFFIX = {"mlp.c_fc": "mlp_fc1", "mlp.c_proj": "mlp_fc2"}


def text_module_names(path, scheme, prefix):
    """kohya names for one text-encoder module; a list because one open_clip
    ``nn.MultiheadAttention`` carries four kohya modules (q, k, v, out)."""
    if scheme == "hf_clip":
        m = _HF_LAYER.search(path)
        if not m:
            raise ValueError(f"no kohya name rule for text-encoder module {path!r}")
        return [f"{prefix}_text_model_encoder_layers_{m.group(1)}_{m.group(2).replace('.', '_')}"]
    if scheme == "open_clip":
        m = _OC_LAYER.search(path)
        if not m:
            raise ValueError(f"no kohya name rule for text-encoder module {path!r}")
        base = f"{prefix}_text_model_encoder_layers_{m.group(1)}_"
        rest = m.group(2)
        if rest == "attn":
            return [f"{base}self_attn_{p}_proj" for p in ("q", "k", "v", "out")]
        if rest in _OC_SUFFIX:
            return [base + _OC_SUFFIX[rest]]
        raise ValueError(f"no kohya name rule for text-encoder module {path!r}")
    raise ValueError(f"unknown text-encoder naming scheme {scheme!r}")
