"""A test double of Stable Diffusion WebUI Forge (main dfdcbab): its loaded model and the backend calls
the adapter makes, built around the real ldm UNet and tiny CLIP / VAE models.

Object layout, names and behaviour follow shared/reference/forge-host.md; the code is ours. What it
reproduces, because the adapter must survive each:

* ``shared.sd_model`` is not an ``nn.Module``; it is ``FakeInitialModel`` until ``forge_model_reload()``,
  which builds the model for the selected checkpoint under ``torch.inference_mode()`` (every
  parameter and buffer an inference tensor);
* the UNet's and the text encoders' linear layers are ``Linear`` modules that are not ``nn.Linear``;
  the text encoders' cast their weights at every call (manual cast), as can UNet layers Forge keeps
  on the CPU (``partial=True``);
* ``BasicTransformerBlock`` adds in place (``x += n``) to the input its LayerNorm saved;
* ``forward(x, timesteps, context, y, control, transformer_options)`` mutates ``transformer_options``
  and asserts ``y`` iff the UNet is class-conditioned (SDXL);
* encoders' outputs (``encode_first_stage``, ``get_learned_conditioning``) are inference tensors;
* LoRA: files cached by name (``functools.lru_cache``), skipped when ``current_lora_hash`` is
  unchanged, merged into the weights by the patchers' shared ``LoraLoader`` under inference mode
  (originals kept as backups); a sampling run re-makes weights under inference mode, as a move to the
  device inside Forge's sampling does;
* the memory manager's bookkeeping (``current_loaded_models``, ``load_models_gpu``,
  ``unload_all_models``, ``soft_empty_cache``), recorded for the tests.
"""
import functools
import os
import re
import types

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from lib_charlora.hosts.forge import ForgeWebUI
from lib_charlora.hosts.standalone import fourier_embedding, sd_alphas_cumprod
from lib_charlora.tiny import tiny_ldm_unet, tiny_text_encoder, tiny_tokenizer, tiny_vae
from tests.forge_rule import key_map

NS = types.SimpleNamespace
SIZE_EMBED = 8


# -- modules ------------------------------------------------------------------------------------
class Linear(nn.Module):
    """Like ``ForgeOperations.Linear``: a plain module named Linear, optionally casting per call."""

    def __init__(self, src, manual_cast):
        super().__init__()
        self.in_features, self.out_features = src.in_features, src.out_features
        self.weight = nn.Parameter(src.weight.detach().clone(), requires_grad=False)
        self.bias = None if src.bias is None else nn.Parameter(src.bias.detach().clone(), requires_grad=False)
        self.parameters_manual_cast = manual_cast

    def forward(self, x):
        w, b = self.weight, self.bias
        if self.parameters_manual_cast:
            w = w.to(device=x.device, dtype=x.dtype)
            b = None if b is None else b.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, b)


def _forge_linears(module, manual_cast):
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, Linear(child, manual_cast))
        else:
            _forge_linears(child, manual_cast)


def _block_forward(self, x, context=None, transformer_options={}):
    """Forge's order of operations: the residual adds are in place."""
    n = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None)
    x += n
    n = self.attn2(self.norm2(x), context=context)
    x += n
    x_skip = x
    x = self.ff(self.norm3(x))
    x += x_skip
    return x


def _unet_forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
    transformer_options["original_shape"] = list(x.shape)  # Forge writes into the dict it is given
    assert (y is not None) == (self.num_classes is not None)
    return type(self).__mro__[1].forward(self, x, timesteps=timesteps, context=context, y=y)


def _unet_config(unet):
    """What Forge's UNet config says about transformer depths (used by its LoRA key mapping)."""
    def depth(block):
        return len(block[1].transformer_blocks) if len(block) > 1 and hasattr(block[1], "transformer_blocks") else 0
    levels = len(unet.channel_mult)
    n_res = unet.num_res_blocks if isinstance(unet.num_res_blocks, list) else [unet.num_res_blocks] * levels
    depth_in, index = [], 1
    for level in range(levels):
        for _ in range(n_res[level]):
            depth_in.append(depth(unet.input_blocks[index]))
            index += 1
        index += 1 if level < levels - 1 else 0
    depth_out = [depth(b) for b in unet.output_blocks][::-1]
    return {"num_res_blocks": n_res, "channel_mult": list(unet.channel_mult), "transformer_depth": depth_in,
            "transformer_depth_output": depth_out, "transformer_depth_middle": depth(unet.middle_block)}


def forge_unet(arch):
    unet = tiny_ldm_unet(arch, size_embed_dim=SIZE_EMBED)
    unet.config = _unet_config(unet)
    _forge_linears(unet, manual_cast=False)
    for m in unet.modules():
        if type(m).__name__ == "BasicTransformerBlock":
            m.__class__ = type("BasicTransformerBlock", (type(m),), {"forward": _block_forward})
    unet.__class__ = type("IntegratedUNet2DConditionModel", (type(unet),), {"forward": _unet_forward})
    return unet


class _TextModel(nn.Module):
    """transformers 4.x's CLIPTextModel layout (``.text_model``), as Forge ships."""

    def __init__(self, clip, projection):
        super().__init__()
        self.text_model = clip
        self.text_projection = nn.Linear(projection, projection, bias=False)  # Forge adds it

    def forward(self, *args, **kwargs):
        return self.text_model(*args, **kwargs)


class IntegratedCLIP(nn.Module):
    def __init__(self, tokenizer, hidden):
        super().__init__()
        self.transformer = _TextModel(tiny_text_encoder(tokenizer, hidden), hidden)
        _forge_linears(self.transformer, manual_cast=True)


class TextEngine:
    """``ClassicTextProcessingEngine``: prompts -> hidden states of layer -max(clip_skip, minimal)."""

    def __init__(self, encoder, tokenizer, minimal_clip_skip=1, final_layer_norm=True, return_pooled=False):
        self.text_encoder, self.tokenizer = encoder, tokenizer
        self.clip_skip, self.minimal_clip_skip = 1, minimal_clip_skip
        self.final_layer_norm, self.return_pooled = final_layer_norm, return_pooled

    def __call__(self, texts):
        t = self.text_encoder.transformer
        ids = self.tokenizer(list(texts), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        out = t(ids.to(t.text_projection.weight.device), output_hidden_states=True)
        z = out.hidden_states[-max(self.clip_skip, self.minimal_clip_skip)]
        if self.final_layer_norm:
            z = t.text_model.final_layer_norm(z)
        if self.return_pooled:
            return z, t.text_projection(out.pooler_output)
        return z


class Timestep(nn.Module):
    def forward(self, t):
        return fourier_embedding(t, SIZE_EMBED)


class AutoencoderKL(nn.Module):
    """``IntegratedAutoencoderKL``: ``encode`` returns a posterior sample; ``process_in`` scales."""

    def __init__(self, scaling_factor):
        super().__init__()
        self.vae = tiny_vae()
        self.scaling_factor = scaling_factor

    def encode(self, x, regulation=None):
        return self.vae.encode(x).latent_dist.sample()

    def decode(self, z):
        return self.vae.decode(z).sample

    def process_in(self, z):
        return z * self.scaling_factor

    def process_out(self, z):
        return z / self.scaling_factor


class Predictor(nn.Module):
    def __init__(self, prediction_type):
        super().__init__()
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod())


class KModel(nn.Module):
    def __init__(self, unet, prediction_type, storage_dtype=torch.float32):
        super().__init__()
        self.diffusion_model = unet
        self.predictor = Predictor(prediction_type)
        self.storage_dtype = self.computation_dtype = storage_dtype


# -- patchers and the LoRA loader -----------------------------------------------------------------
def _get(model, key):
    *path, leaf = key.split(".")
    for p in path:
        model = getattr(model, p)
    return model, leaf


class LoraLoader:
    """Merges LoRA patches into the weights under inference mode, keeping the originals as backups."""

    def __init__(self, model):
        self.model, self.backup, self.loaded_hash = model, {}, str([])

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=torch.device("cpu"), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        for key, weight in self.backup.items():
            parent, leaf = _get(self.model, key)
            parent._parameters[leaf] = weight
        self.backup = {}
        for patches in lora_patches.values():
            for key, items in patches.items():
                parent, leaf = _get(self.model, key)
                weight = parent._parameters[leaf]
                self.backup.setdefault(key, weight)
                merged = weight.float().clone()
                for strength, up, down, alpha in items:
                    delta = up.flatten(1).float() @ down.flatten(1).float() * (alpha / down.shape[0])
                    merged += strength * delta.reshape(weight.shape)
                parent._parameters[leaf] = nn.Parameter(merged.to(weight.dtype), requires_grad=False)
        self.loaded_hash = hashes


class ModelPatcher:
    def __init__(self, model, load_device="cpu", offload_device="cpu"):
        self.model, self.load_device, self.offload_device = model, torch.device(load_device), torch.device(offload_device)
        self.lora_patches = {}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device)
        n.lora_patches = dict(self.lora_patches)
        return n

    def add_patches(self, filename, patches, strength):
        params = {k for k, _ in self.model.named_parameters()}
        self.lora_patches[(filename, strength)] = {k: [(strength, *v)] for k, v in patches.items() if k in params}
        return set(self.lora_patches[(filename, strength)])

    def refresh_loras(self):
        self.lora_loader.refresh(self.lora_patches, self.offload_device)


class ForgeObjects:
    def __init__(self, unet, clip, vae):
        self.unet, self.clip, self.vae = unet, clip, vae

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae)


# -- the memory manager ---------------------------------------------------------------------------
class LoadedModel:
    def __init__(self, patcher, log, partial=False):
        self.model, self.log, self.model_accelerated = patcher, log, partial

    def model_load(self):
        self.model.refresh_loras()
        if torch.is_inference_mode_enabled():  # a move to the device inside Forge's sampling
            _remake_inference(self.model.model)

    def model_unload(self, avoid_model_moving=False):
        self.log.append(("unload", type(self.model.model).__name__))
        self.model_accelerated = False
        if torch.is_inference_mode_enabled() and not avoid_model_moving:  # moved off the device in inference mode
            _remake_inference(self.model.model)


class MemoryManagement:
    def __init__(self):
        self.current_loaded_models, self.log, self.load_options = [], [], []
        self.partial = False  # the next UNet load does not fit: Forge streams part of it from the CPU
        self.low_vram = False  # loading a model pushes the others off the device (Forge's free_memory)

    def get_torch_device(self):
        return torch.device("cpu")

    def load_models_gpu(self, patchers, memory_required=0, **kwargs):
        self.log.append(("load", [type(p.model).__name__ for p in patchers]))
        self.load_options.append(kwargs)  # reForge's manager takes force_full_load
        if self.low_vram:
            for i in range(len(self.current_loaded_models) - 1, -1, -1):
                if not any(self.current_loaded_models[i].model is p for p in patchers):
                    self.current_loaded_models.pop(i).model_unload()
        for p in patchers:
            if any(lm.model is p for lm in self.current_loaded_models):
                continue
            for i in range(len(self.current_loaded_models) - 1, -1, -1):  # a clone of the same model
                if self.current_loaded_models[i].model.model is p.model:
                    self.current_loaded_models.pop(i).model_unload(avoid_model_moving=True)
            lm = LoadedModel(p, self.log, partial=self.partial and isinstance(p.model, KModel))
            lm.model_load()
            self.current_loaded_models.insert(0, lm)

    def load_model_gpu(self, patcher):
        return self.load_models_gpu([patcher])

    def unload_all_models(self):
        self.log.append(("unload_all",))
        while self.current_loaded_models:
            self.current_loaded_models.pop().model_unload()

    def soft_empty_cache(self, force=False):
        self.log.append(("empty_cache", force))


# -- the loaded model -------------------------------------------------------------------------------
class FakeInitialModel:
    def __init__(self):
        self.cond_stage_model = None


class ForgeDiffusionEngine:
    """SD1 (``StableDiffusion``), SD2 (``StableDiffusion2``) or SDXL (``StableDiffusionXL``)."""

    def __init__(self, arch, prediction, mm, name, storage_dtype=torch.float32):
        self.mm = mm
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3 = arch == "sd1", arch == "sd2", arch == "sdxl", False
        self.is_inpaint = False
        self.current_lora_hash = str([])
        tok = tiny_tokenizer()
        unet = KModel(forge_unet(arch), "v_prediction" if prediction == "v" else "epsilon", storage_dtype)
        if arch == "sdxl":
            encoders = nn.ModuleDict({"clip_l": IntegratedCLIP(tok, 32), "clip_g": IntegratedCLIP(tok, 32)})
            self.text_processing_engine_l = TextEngine(encoders["clip_l"], tok, 2, False)
            self.text_processing_engine_g = TextEngine(encoders["clip_g"], tok, 2, False, return_pooled=True)
            self.embedder = Timestep()
        else:
            key = "clip_h" if arch == "sd2" else "clip_l"
            encoders = nn.ModuleDict({key: IntegratedCLIP(tok, 32)})
            self.text_processing_engine = TextEngine(encoders[key], tok)
        vae = NS(first_stage_model=AutoencoderKL(0.13025 if arch == "sdxl" else 0.18215))
        vae.patcher = ModelPatcher(vae.first_stage_model)
        clip = NS(cond_stage_model=encoders, patcher=ModelPatcher(encoders))
        clip.clone = lambda: NS(cond_stage_model=encoders, patcher=clip.patcher.clone(), clone=clip.clone)
        self.forge_objects = ForgeObjects(ModelPatcher(unet), clip, vae)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.sd_checkpoint_info = NS(name=name, hash="1234abcd", sha256="ab" * 32)
        for m in self.modules():
            m.eval()

    def modules(self):
        o = self.forge_objects_original
        return [o.unet.model, o.clip.cond_stage_model, o.vae.first_stage_model]

    def set_clip_skip(self, clip_skip):
        for engine in self._engines():
            engine.clip_skip = clip_skip

    def _engines(self):
        return [getattr(self, n) for n in ("text_processing_engine", "text_processing_engine_l",
                                           "text_processing_engine_g") if hasattr(self, n)]

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts, width=64, height=64):
        self.mm.load_model_gpu(self.forge_objects.clip.patcher)
        if not self.is_sdxl:
            return self.text_processing_engine(prompts)
        cond_l = self.text_processing_engine_l(prompts)
        cond_g, pooled = self.text_processing_engine_g(prompts)
        sizes = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
        vector = self.embedder(sizes).flatten().unsqueeze(0).repeat(len(prompts), 1)
        return {"crossattn": torch.cat([cond_l, cond_g], dim=2), "vector": torch.cat([pooled, vector], dim=1)}

    @torch.inference_mode()
    def encode_first_stage(self, x):
        vae = self.forge_objects.vae
        self.mm.load_models_gpu([vae.patcher])
        return vae.first_stage_model.process_in(vae.first_stage_model.encode(x)).to(x)


@torch.no_grad()
def _remake_inference(module):
    """Every parameter and buffer re-made under inference mode (what Forge's loader and moves do)."""
    with torch.inference_mode():
        for sub in module.modules():
            for n, p in list(sub._parameters.items()):
                if p is not None:  # Forge's loader leaves requires_grad at True
                    sub._parameters[n] = nn.Parameter(p.detach().clone())
            for n, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[n] = b.clone()


# -- the WebUI modules --------------------------------------------------------------------------------
class SdModels:
    """``modules.sd_models``: lazy loading by ``forge_loading_parameters``."""

    def __init__(self, mm, checkpoints):
        self.mm, self.checkpoints = mm, checkpoints
        self.model_data = NS(sd_model=FakeInitialModel(), forge_hash="",
                             forge_loading_parameters={"checkpoint_info": next(iter(checkpoints))})
        self.loads = 0

    def select(self, name, **extra):
        self.model_data.forge_loading_parameters = {"checkpoint_info": name, **extra}

    def forge_model_reload(self):
        data = self.model_data
        if data.forge_hash == str(data.forge_loading_parameters):
            return data.sd_model, False
        name = data.forge_loading_parameters["checkpoint_info"]
        if name not in self.checkpoints:
            raise ValueError("You do not have any model! Please download at least one model in "
                             "[models/Stable-diffusion].")
        data.sd_model = None
        self.mm.unload_all_models()
        torch.manual_seed(0)
        sd_model = self.checkpoints[name](self.mm, name)
        warm(sd_model)
        for m in sd_model.modules():
            _remake_inference(m)
        data.sd_model, data.forge_hash = sd_model, str(data.forge_loading_parameters)
        self.loads += 1
        return sd_model, True


def warm(sd_model):
    """Run the text encoders once (transformers installs hooks on first use), as a generation has."""
    with torch.no_grad():
        for engine in sd_model._engines():
            engine(["warm up"])


class Networks:
    """The built-in sd_forge_lora ``networks`` module: by name, cached by file name, hash-skipped."""

    def __init__(self, sd_models, lora_dir):
        self.sd_models, self.lora_dir = sd_models, lora_dir
        self.available_networks = {}
        self.load_lora_state_dict = functools.lru_cache(maxsize=5)(self._read)
        self.log = []

    @staticmethod
    def _read(filename):
        return safetensors.torch.load_file(filename)

    def list_available_networks(self):
        self.available_networks = {}
        for folder, _, files in os.walk(self.lora_dir):  # Forge walks the Lora folder and its sub-folders
            for f in files:
                if f.endswith(".safetensors"):
                    self.available_networks[f[:-len(".safetensors")]] = os.path.join(folder, f)

    def load_networks(self, names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
        sd = self.sd_models.model_data.sd_model
        if any(n not in self.available_networks for n in names):
            self.list_available_networks()
        targets = [[self.available_networks[n], u, t] for n, u, t in zip(names, unet_multipliers, te_multipliers)]
        if sd.current_lora_hash == str(targets):
            return
        sd.current_lora_hash = str(targets)
        original = sd.forge_objects_original
        unet, clip = original.unet, original.clip
        for filename, strength, _ in targets:
            lora = self.load_lora_state_dict(filename)
            keys = key_map(unet.model, clip.cond_stage_model)
            by_target = {"unet": {}, "clip": {}}
            for name, (where, target) in keys.items():
                if f"{name}.lora_up.weight" in lora:
                    alpha = lora.get(f"{name}.alpha", torch.tensor(float(lora[f"{name}.lora_down.weight"].shape[0])))
                    by_target[where][target] = (lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"],
                                                float(alpha))
            unet = unet.clone()
            loaded = unet.add_patches(filename, by_target["unet"], strength)
            clip = clip.clone()
            loaded_te = clip.patcher.add_patches(filename, by_target["clip"], strength)
            self.log.append((os.path.basename(filename), len(loaded), len(loaded_te)))
        sd.forge_objects.unet, sd.forge_objects.clip = unet, clip
        sd.forge_objects_after_applying_lora = sd.forge_objects.shallow_copy()


class Processing:
    """``modules.processing``: txt2img through the loaded model, LoRAs from ``<lora:name:w>``; the
    conditioning is cached across generations, keyed by prompt and LoRA names (not file contents)."""

    def __init__(self, sd_models, networks, mm):
        self.sd_models, self.networks, self.mm = sd_models, networks, mm
        self.runs, self.prompts = [], []
        self.StableDiffusionProcessing = type("StableDiffusionProcessing", (),
                                              {"cached_c": [None, None, None], "cached_uc": [None, None, None]})

    @staticmethod
    def StableDiffusionProcessingTxt2Img(**kwargs):
        return NS(close=lambda: None, **kwargs)

    def process_images(self, p, steps=3):
        self.prompts.append(p.prompt)
        with torch.inference_mode():
            sd, _ = self.sd_models.forge_model_reload()
            sd.forge_objects = sd.forge_objects_original.shallow_copy()
            loras = re.findall(r"<lora:([^:>]+):([0-9.]+)>", p.prompt)
            self.networks.load_networks([n for n, _ in loras], [float(w) for _, w in loras],
                                        [float(w) for _, w in loras])
            sd.forge_objects = sd.forge_objects_after_applying_lora.shallow_copy()
            prompt = re.sub(r"<lora:[^>]+>", "", p.prompt).strip()
            cache = self.StableDiffusionProcessing.cached_c
            key = (prompt, tuple(loras), p.width, p.height, sd.sd_checkpoint_info.name)
            if cache[0] != key:
                cache[0], cache[1] = key, sd.get_learned_conditioning([prompt], p.width, p.height)
            cond = cache[1]
            self.mm.load_models_gpu([sd.forge_objects.unet])
            unet = sd.forge_objects.unet.model.diffusion_model
            self.runs.append(sum(len(m._forward_hooks) for m in unet.modules()))
            g = torch.Generator().manual_seed(p.seed)
            x = torch.randn((1, 4, p.height // 8, p.width // 8), generator=g)
            context = cond["crossattn"] if sd.is_sdxl else cond
            y = cond["vector"] if sd.is_sdxl else None
            for t in (800, 500, 200)[:steps]:
                x = x - 0.2 * unet(x, torch.tensor([float(t)]), context=context, y=y, transformer_options={})
            vae = sd.forge_objects.vae
            self.mm.load_models_gpu([vae.patcher])
            pixels = vae.first_stage_model.decode(vae.first_stage_model.process_out(x))
        from PIL import Image
        arr = ((pixels[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        return NS(images=[Image.fromarray(arr)], latents=x.clone())


def make_forge(tmp_path, arch="sd1", prediction="eps", models=None):
    """A Forge with one selected checkpoint (``models``: {name: (arch, prediction, options)})."""
    models = models or {f"tiny_{arch}.safetensors": (arch, prediction, {})}
    checkpoints = {}
    for name, (a, pred, options) in models.items():
        checkpoints[name] = functools.partial(_build, a, pred, options)
    mm = MemoryManagement()
    sd_models = SdModels(mm, checkpoints)
    lora_dir = os.path.join(str(tmp_path), "Lora")
    networks = Networks(sd_models, lora_dir)
    processing = Processing(sd_models, networks, mm)
    shared = NS(opts=NS(CLIP_stop_at_last_layers=1), cmd_opts=NS(lora_dir=lora_dir),
                state=NS(interrupted=False, job_no=0, textinfo=""))
    webui = ForgeWebUI(shared, sd_models, mm, networks, processing)
    webui.lora_dir = lora_dir
    return webui


def _build(arch, prediction, options, mm, name):
    kind = options.get("kind")
    if kind in ("Flux", "StableDiffusion3", "Chroma"):
        m = type(kind, (), {})()
        m.forge_objects = m.forge_objects_original = NS()
        m.is_sd1 = m.is_sd2 = m.is_sdxl = False
        m.is_sd3 = kind == "StableDiffusion3"
        m.modules = lambda: []
        m._engines = lambda: []
        return m
    m = ForgeDiffusionEngine(arch, prediction, mm, name, options.get("storage_dtype", torch.float32))
    if options.get("prediction_type"):
        m.forge_objects_original.unet.model.predictor.prediction_type = options["prediction_type"]
    if options.get("inpaint"):
        m.is_inpaint = True
    if options.get("refiner"):
        del m.forge_objects_original.clip.cond_stage_model["clip_l"]
    return m


def generate(webui, prompt, seed=1, size=64):
    """A fixed-seed txt2img through the double's processing (latents back, for exact comparisons)."""
    p = webui.processing.StableDiffusionProcessingTxt2Img(
        sd_model=webui.sd_models.model_data.sd_model, prompt=prompt, seed=seed, width=size, height=size)
    return webui.processing.process_images(p).latents
