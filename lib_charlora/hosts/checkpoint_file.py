"""Checkpoint files -> a diffusers pipeline and a ``DiffusersHost``, offline (standalone CLI).

A single-file checkpoint (the ``.safetensors`` a WebUI loads: ``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*`` / ``conditioner.embedders.*``) is loaded with
diffusers' own single-file loader. That loader needs a diffusers-format *config* folder and a
tokenizer, which it normally fetches from the hub; here they are written into a temporary folder,
derived from the checkpoint's tensor shapes (so SD1.x, SD2.x, SDXL base and fine-tunes of any
width load without a network), with the real CLIP BPE vocabulary taken from a locally installed
package. A WebUI-style ``.yaml`` beside the checkpoint (or ``--config``) supplies what shapes cannot:
attention heads and the prediction type.
"""
import gzip
import importlib.util
import json
import os
import re
import tempfile
from dataclasses import dataclass

import torch

from ..engine.errors import CharLoraError, UnsupportedModelError
from .standalone import DiffusersHost, scheduler_config, sd_alphas_cumprod

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TE = "cond_stage_model.transformer.text_model."
SD2_TE = "cond_stage_model.model."
SDXL_TE1 = "conditioner.embedders.0.transformer.text_model."
SDXL_TE2 = "conditioner.embedders.1.model."
VOCAB_SIZE = 49408


class CheckpointError(CharLoraError):
    """A checkpoint file that cannot be loaded (message says why and what to do)."""


@dataclass
class Layout:
    arch: str            # sd1 / sd2 / sdxl
    prediction: str      # eps / v
    unet: dict           # UNet2DConditionModel config
    vae: dict            # AutoencoderKL config
    text: list           # [(CLIPTextConfig kwargs, with_projection, pad_token)]


# -- reading ------------------------------------------------------------------------------------------
PICKLED = (".ckpt", ".pt", ".pth", ".bin")


def _check_file(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"--checkpoint: no such file: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext != ".safetensors" and ext not in PICKLED:
        raise CheckpointError(f"--checkpoint: {path}: expected a .safetensors file (or a diffusers folder)")
    return ext


def read_shapes(path):
    """``key -> meta tensor`` of a ``.safetensors`` checkpoint: its names and shapes, no weights read."""
    from safetensors import safe_open
    _check_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise CheckpointError(f"--checkpoint: {path} is not a readable safetensors file ({e})") from e


def read_pickled(path, allow_pickle=False):
    """The tensors of a pickled ``.ckpt`` (it can run code when loaded: only with ``allow_pickle``)."""
    _check_file(path)
    if not allow_pickle:
        raise CheckpointError(
            f"--checkpoint: {path} is a pickled file, which can run code when loaded; convert it to "
            ".safetensors or pass --allow-pickle if you trust its source")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"--checkpoint: {path} could not be read ({type(e).__name__}: {e})") from e
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    return {k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def read_yaml(path):
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"--config: cannot read {path} ({e})") from e


def sidecar_yaml(path):
    """The ``<checkpoint>.yaml`` WebUIs keep beside a checkpoint, if any."""
    candidate = os.path.splitext(path)[0] + ".yaml"
    return candidate if os.path.isfile(candidate) else None


# -- what is in the file ------------------------------------------------------------------------------
def detect_arch(sd):
    keys = sd.keys()
    if not any(k.startswith(UNET + "input_blocks.") for k in keys):
        if any(k.startswith(UNET + "joint_blocks.") or k.startswith("joint_blocks.") for k in keys):
            raise UnsupportedModelError("this is an SD3 checkpoint; supported: SD1.x, SD2.x, SDXL base")
        if any("double_blocks." in k for k in keys):
            raise UnsupportedModelError("this is a Flux checkpoint; supported: SD1.x, SD2.x, SDXL base")
        raise UnsupportedModelError(
            "no Stable Diffusion UNet (model.diffusion_model.input_blocks.*) in this file — is it a LoRA, a "
            "VAE or a UNet-only file? Give a full SD1.x / SD2.x / SDXL checkpoint")
    if any(k.startswith(SDXL_TE2) for k in keys):
        if not any(k.startswith(SDXL_TE1) for k in keys):
            raise UnsupportedModelError("no first text encoder in this SDXL file (an SDXL refiner?); "
                                        "SDXL refiner models are not supported")
        arch = "sdxl"
    elif any(k.startswith(SD2_TE) for k in keys):
        arch = "sd2"
    elif any(k.startswith(SD1_TE) for k in keys):
        arch = "sd1"
    elif any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise UnsupportedModelError("this is an SDXL refiner checkpoint; supported: SDXL base")
    else:
        raise UnsupportedModelError("no text encoder in this checkpoint (cond_stage_model / conditioner); "
                                    "give a full checkpoint, not a UNet-only file")
    conv_in = sd[UNET + "input_blocks.0.0.weight"]
    if conv_in.shape[1] != 4:
        raise UnsupportedModelError(
            f"the UNet takes {conv_in.shape[1]} input channels; inpainting / instruct-pix2pix models are not "
            "supported — use a normal (txt2img) checkpoint")
    if not any(k.startswith(VAE) for k in keys):
        raise UnsupportedModelError("no VAE (first_stage_model.*) in this checkpoint; give a full checkpoint")
    return arch


def _indices(sd, prefix):
    """Sorted distinct integers N of keys ``prefix + "N."``."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})


def unet_config(sd, arch, heads=None, head_channels=None):
    """diffusers ``UNet2DConditionModel`` config of an ldm / sgm UNet, from its shapes. Heads: a fixed
    count (``heads``; SD1 = 8) or channels per head (``head_channels``; SD2, SDXL = 64)."""
    if heads is None and head_channels is None:
        heads, head_channels = (8, None) if arch == "sd1" else (None, 64)
    # resblocks split into levels at the downsamples
    levels, current = [], []
    for i in _indices(sd, UNET + "input_blocks.")[1:]:
        if f"{UNET}input_blocks.{i}.0.op.weight" in sd:
            levels.append(current)
            current = []
        else:
            current.append(i)
    levels.append(current)
    channels, res_blocks, attn, depth = [], [], [], []
    for blocks in levels:
        first = blocks[0]
        channels.append(int(sd[f"{UNET}input_blocks.{first}.0.out_layers.3.weight"].shape[0]))
        res_blocks.append(len(blocks))
        tb = f"{UNET}input_blocks.{first}.1.transformer_blocks."
        n = len(_indices(sd, tb))
        attn.append(n > 0)
        depth.append(max(n, 1))
    if len(set(res_blocks)) != 1:
        raise UnsupportedModelError(f"unusual UNet layout (resblocks per level {res_blocks})")
    first_attn = next((i for i, blocks in enumerate(levels) if attn[i]), None)
    if first_attn is None:
        raise UnsupportedModelError("this UNet has no cross-attention; not a text-to-image SD model")
    b = levels[first_attn][0]
    context = int(sd[f"{UNET}input_blocks.{b}.1.transformer_blocks.0.attn2.to_k.weight"].shape[1])
    linear = sd[f"{UNET}input_blocks.{b}.1.proj_in.weight"].ndim == 2
    head_dim = heads if heads is not None else [max(1, c // head_channels) for c in channels]
    cfg = {
        "sample_size": {"sd1": 64, "sd2": 96, "sdxl": 128}[arch],
        "in_channels": 4, "out_channels": int(sd[UNET + "out.2.weight"].shape[0]),
        "block_out_channels": channels, "layers_per_block": res_blocks[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "cross_attention_dim": context, "attention_head_dim": head_dim, "use_linear_projection": linear,
        "transformer_layers_per_block": depth if arch == "sdxl" else depth[first_attn],
    }
    if f"{UNET}label_emb.0.0.weight" in sd:
        adm = int(sd[f"{UNET}label_emb.0.0.weight"].shape[1])
        pooled = int(sd[SDXL_TE2 + "text_projection"].shape[1]) if SDXL_TE2 + "text_projection" in sd else 1280
        if (adm - pooled) % 6:
            raise UnsupportedModelError(f"unexpected SDXL conditioning width {adm} (pooled text {pooled})")
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=(adm - pooled) // 6,
                   projection_class_embeddings_input_dim=adm)
    return cfg


def vae_config(sd, arch):
    levels = _indices(sd, VAE + "encoder.down.")
    channels = [int(sd[f"{VAE}encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": int(sd[VAE + "post_quant_conv.weight"].shape[0]),
        "block_out_channels": channels, "layers_per_block": len(_indices(sd, f"{VAE}encoder.down.0.block.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels), "norm_num_groups": 32,
        "sample_size": {"sd1": 512, "sd2": 768, "sdxl": 1024}[arch],
        "scaling_factor": 0.13025 if arch == "sdxl" else 0.18215,
    }


def _text_config(sd, prefix, open_clip, drop_last=False):
    """CLIPTextConfig kwargs of a HF-layout (``open_clip`` False) or open_clip-layout text encoder."""
    if open_clip:
        tok = sd[prefix + "token_embedding.weight"]
        pos = sd[prefix + "positional_embedding"]
        layers = len(_indices(sd, prefix + "transformer.resblocks."))
        fc1 = sd[prefix + "transformer.resblocks.0.mlp.c_fc.weight"]
        proj = sd.get(prefix + "text_projection")
        act = "gelu"
    else:
        tok = sd[prefix + "embeddings.token_embedding.weight"]
        pos = sd[prefix + "embeddings.position_embedding.weight"]
        layers = len(_indices(sd, prefix + "encoder.layers."))
        fc1 = sd[prefix + "encoder.layers.0.mlp.fc1.weight"]
        proj = None
        act = "quick_gelu"
    hidden = int(tok.shape[1])
    vocab = int(tok.shape[0])
    if vocab != VOCAB_SIZE:
        raise UnsupportedModelError(f"a text encoder with a {vocab}-token vocabulary; SD models use CLIP's {VOCAB_SIZE}")
    cfg = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": int(fc1.shape[0]),
           "num_hidden_layers": layers - 1 if drop_last else layers, "num_attention_heads": max(1, hidden // 64),
           "max_position_embeddings": int(pos.shape[0]), "hidden_act": act, "bos_token_id": VOCAB_SIZE - 2,
           "eos_token_id": VOCAB_SIZE - 1, "pad_token_id": VOCAB_SIZE - 1,
           "projection_dim": int(proj.shape[1]) if proj is not None else hidden}
    return cfg


def text_configs(sd, arch):
    if arch == "sd1":
        return [(_text_config(sd, SD1_TE, False), False, "<|endoftext|>")]
    if arch == "sd2":  # SD2 conditions on the penultimate layer (+ final norm): the last block is not used
        return [(_text_config(sd, SD2_TE, True, drop_last=True), False, "!")]
    return [(_text_config(sd, SDXL_TE1, False), False, "<|endoftext|>"),
            (_text_config(sd, SDXL_TE2, True), True, "!")]


def guess_prediction(sd, arch, yaml_cfg):
    """v or eps: the yaml's ``parameterization``; an SDXL file's ``v_pred`` marker; for SD2, the WebUI's
    check (a v model's output at t=999 on a constant input is far below the input); else eps."""
    params = ((yaml_cfg or {}).get("model") or {}).get("params") or {}
    if "v_pred" in sd or params.get("parameterization") == "v":
        return "v"
    if params:
        return "eps"
    return "probe" if arch == "sd2" else "eps"


def layout_of(sd, yaml_cfg=None, prediction=None):
    arch = detect_arch(sd)
    unet_params = ((((yaml_cfg or {}).get("model") or {}).get("params") or {}).get("unet_config") or
                   (((yaml_cfg or {}).get("model") or {}).get("params") or {}).get("network_config") or {})
    unet_params = unet_params.get("params") or {}
    heads = unet_params.get("num_heads")
    heads = heads if isinstance(heads, int) and heads > 0 else None
    head_channels = unet_params.get("num_head_channels")
    head_channels = head_channels if isinstance(head_channels, int) and head_channels > 0 else None
    pred = prediction or guess_prediction(sd, arch, yaml_cfg)
    return Layout(arch, pred, unet_config(sd, arch, heads, head_channels), vae_config(sd, arch), text_configs(sd, arch))


# -- the tokenizer -------------------------------------------------------------------------------------
def clip_bpe_file():
    """CLIP's BPE merges (``bpe_simple_vocab_16e6.txt.gz``) from an installed ``open_clip`` or ``clip``
    package (``openai-clip``, the standalone extra; WebUIs ship both) — read as data, not imported."""
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz")
            if os.path.isfile(path):
                return path
    return None


def write_clip_tokenizer(directory, pad_token):
    """The CLIP tokenizer (49408 tokens) as ``vocab.json`` + ``merges.txt``, built from CLIP's BPE file the
    same way CLIP builds its vocabulary: bytes, bytes + end-of-word, the merges, then the two specials."""
    bpe = clip_bpe_file()
    if bpe is None:
        raise CheckpointError(
            "the CLIP tokenizer's vocabulary was not found: install it with "
            "`pip install openai-clip==1.0.1` (or the project's extra: `pip install \".[standalone]\"`; only its "
            "vocabulary file is read)")
    with gzip.open(bpe, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]  # CLIP's byte order
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": pad_token, "unk_token": "<|endoftext|>", "do_lower_case": True,
                   "tokenizer_class": "CLIPTokenizer"}, f)
    return directory


# -- the config folder and loading ---------------------------------------------------------------------
def write_config_folder(layout, directory):
    """A diffusers-format folder (model_index.json, component configs, tokenizers) for ``layout``."""
    def dump(sub, name, data):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
        with open(os.path.join(directory, sub, name), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)

    xl = layout.arch == "sdxl"
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    dump("unet", "config.json", {"_class_name": "UNet2DConditionModel", **layout.unet})
    dump("vae", "config.json", {"_class_name": "AutoencoderKL", **layout.vae})
    dump("scheduler", "scheduler_config.json", {"_class_name": "EulerDiscreteScheduler",
                                                **scheduler_config(layout.prediction)})
    for i, (cfg, projection, pad) in enumerate(layout.text):
        suffix = f"_{i + 1}" if i else ""
        cls = "CLIPTextModelWithProjection" if projection else "CLIPTextModel"
        index[f"text_encoder{suffix}"] = ["transformers", cls]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
        dump(f"text_encoder{suffix}", "config.json", {"architectures": [cls], "model_type": "clip_text_model", **cfg})
        write_clip_tokenizer(os.path.join(directory, f"tokenizer{suffix}"), pad)
    if xl:
        index.update(force_zeros_for_empty_prompt=True, image_encoder=[None, None], feature_extractor=[None, None])
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    dump("", "model_index.json", index)
    return directory


def _pipeline_class(arch):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    return StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline


def _check_loaded(pipe):
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        for pname, p in module.named_parameters():
            if p.is_meta:
                raise CheckpointError(f"the checkpoint has no weights for {name}.{pname} (incomplete file?)")


@torch.no_grad()
def probe_v_prediction(unet):
    """The check WebUIs use for SD2 files without a yaml: a v model's output at t=999 for a constant
    0.5 input and context lies far below the input (mean difference < -1)."""
    p = next(unet.parameters())
    x = torch.full((1, 4, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    ctx = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=p.device, dtype=p.dtype)
    out = unet(x, torch.tensor([999], device=p.device), encoder_hidden_states=ctx).sample
    return (out.float() - x.float()).mean().item() < -1


def load_pipeline(path, config=None, prediction=None, dtype=torch.float32, allow_pickle=False):
    """``path``: a single-file checkpoint or a diffusers folder. Returns ``(pipeline, arch, prediction)``."""
    if os.path.isdir(path):
        return _load_diffusers_folder(path, prediction, dtype)
    yaml_path = config or sidecar_yaml(path)
    yaml_cfg = read_yaml(yaml_path) if yaml_path else None
    with tempfile.TemporaryDirectory(prefix="charlora_cfg_") as folder:
        source = path
        if _check_file(path) in PICKLED:  # diffusers reads only safetensors safely: convert in the temp folder
            shapes = read_pickled(path, allow_pickle)
            from safetensors.torch import save_file
            source = os.path.join(folder, "checkpoint.safetensors")
            save_file(shapes, source)
        else:
            shapes = read_shapes(path)
        layout = layout_of(shapes, yaml_cfg, prediction)
        del shapes
        write_config_folder(layout, os.path.join(folder, "config"))
        try:
            pipe = _pipeline_class(layout.arch).from_single_file(
                source, config=os.path.join(folder, "config"), local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"diffusers could not load {path} as an {layout.arch} checkpoint: {e}") from e
    _check_loaded(pipe)
    pred = layout.prediction
    if pred == "probe":
        pred = "v" if probe_v_prediction(pipe.unet) else "eps"
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=(
        "v_prediction" if pred == "v" else "epsilon"))
    return pipe, layout.arch, pred


def _load_diffusers_folder(path, prediction, dtype):
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise CheckpointError(f"--checkpoint: {path} is a folder without model_index.json (not a diffusers model)")
    from diffusers import DiffusionPipeline
    with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    if index.get("_class_name") not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise UnsupportedModelError(f"{path} holds a {index.get('_class_name')}; supported: Stable Diffusion 1.x / "
                                    "2.x and SDXL (StableDiffusionPipeline, StableDiffusionXLPipeline)")
    extra = {"safety_checker": None} if "safety_checker" in index else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, torch_dtype=dtype, **extra)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--checkpoint: diffusers could not load the folder {path}: {e}") from e
    arch = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else (
        "sd2" if pipe.unet.config.use_linear_projection else "sd1")
    pred = prediction or ("v" if pipe.scheduler.config.get("prediction_type") == "v_prediction" else "eps")
    return pipe, arch, pred


def host_from_pipeline(pipe, arch, prediction, device="cpu", model_name=None):
    encoders = [(pipe.text_encoder, pipe.tokenizer)]
    if arch == "sdxl":
        encoders.append((pipe.text_encoder_2, pipe.tokenizer_2))
    sched = pipe.scheduler.config
    if sched.get("beta_schedule") == "scaled_linear":
        alphas = sd_alphas_cumprod(sched.get("beta_start", 0.00085), sched.get("beta_end", 0.012),
                                   sched.get("num_train_timesteps", 1000))
    else:
        alphas = None
    if pipe.device != torch.device(device):
        pipe.to(device)
    host = DiffusersHost(pipe.unet, pipe.vae, encoders, arch=arch, prediction=prediction, alphas_cumprod=alphas,
                         vae_scaling_factor=pipe.vae.config.scaling_factor, device=device, model_name=model_name)
    host.pipeline = pipe
    return host


def load_host(path, config=None, prediction=None, device="cpu", dtype=torch.float32, allow_pickle=False):
    """A ``DiffusersHost`` over the checkpoint ``path`` (its metadata names the file and its hash)."""
    pipe, arch, pred = load_pipeline(path, config, prediction, dtype, allow_pickle)
    name = os.path.splitext(os.path.basename(path.rstrip("/\\")))[0]
    host = host_from_pipeline(pipe, arch, pred, device, model_name=name)
    if os.path.isfile(path):
        host.model_sha256, host.model_hash = file_hashes(path)
    return host


def file_hashes(path):
    """(full sha256, the WebUIs' legacy 8-hex hash of 64 KiB at offset 1 MiB)."""
    import hashlib
    full, legacy = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        legacy.update(f.read(0x10000))
        f.seek(0)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            full.update(chunk)
    return full.hexdigest(), legacy.hexdigest()[:8]


__all__ = ["CheckpointError", "Layout", "load_host", "load_pipeline", "layout_of", "write_config_folder",
           "host_from_pipeline", "read_shapes", "read_pickled"]
