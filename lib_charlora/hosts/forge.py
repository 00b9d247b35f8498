"""Host adapter for Stable Diffusion WebUI Forge (the 2024 ``backend/``, main ``dfdcbab``).

In Forge ``shared.sd_model`` is a ``ForgeDiffusionEngine``, not an ``nn.Module`` (reference:
forge-host.md). The adapter hands the engine:

* the UNet ``forge_objects_original.unet.model.diffusion_model`` (compvis names), called directly
  with ``transformer_options={}``; noise schedule and eps / v from the UNet's ``predictor``;
* the text encoders ``clip_l`` / ``clip_h`` / ``clip_g`` (Hugging Face CLIP) through Forge's own
  text-processing engines, so clip skip, emphasis and embeddings are what inference uses;
* latents from Forge's own ``encode_first_stage``.

Forge's traps, each handled here and nowhere else:

* the model loads lazily (``FakeInitialModel`` until ``forge_model_reload()``);
* modules, LoRA merges and encoder outputs are made under ``torch.inference_mode()``: inference
  tensors cannot be saved for backward, so parameters and buffers that are inference tensors are
  replaced by normal tensors with the same values, and outputs are cloned;
* ``BasicTransformerBlock`` adds in place (``x += n``) to a tensor its LayerNorm saved: for the
  session every norm of the block gets a pre-hook that hands it a copy of its input;
* ``ForgeOperations.Linear`` is not an ``nn.Linear`` (the engine's hooks accept it) and may cast
  its weights per call (manual cast);
* the memory manager: the UNet and the text encoders are loaded through ``load_models_gpu``, kept
  there (after Forge's own VAE encode or a preview had to move them) and the cache is emptied after;
* LoRAs of the last generation are merged into the weights: the LoRA loaders are refreshed with no
  patches first, and Forge's LoRA cache (by file name) and ``current_lora_hash`` are reset after, so
  ``<lora:name:1>`` uses the new file at once, also after an overwrite.
"""
import contextlib

import torch

from ..engine.errors import UnsupportedModelError
from ..engine.host import Component, Host
from .webui_common import (clear_prompt_cache, forget_cached_loras, lora_prompt, make_autograd_safe, txt2img,
                           unload)

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
NORMS = ("norm_in", "norm1", "norm2", "norm3")


class ForgeWebUI:
    """The Forge modules the adapter uses, passed in (tests give doubles)."""

    def __init__(self, shared, sd_models, memory_management, networks=None, processing=None, known_names=()):
        self.shared, self.sd_models, self.mm = shared, sd_models, memory_management
        self.networks, self.processing = networks, processing
        self.known_names = tuple(known_names)

    @classmethod
    def import_modules(cls):  # pragma: no cover - needs a running Forge
        from backend import memory_management
        from modules import processing, sd_models, shared
        try:
            import networks  # the built-in sd_forge_lora extension
        except ImportError:
            networks = None
        known = list(getattr(networks, "available_networks", {}) or {})
        return cls(shared, sd_models, memory_management, networks, processing, known)

    def model_is_current(self):
        """A real model is loaded and it is the checkpoint (and low-bits option) now selected."""
        data = self.sd_models.model_data
        return is_loaded(data.sd_model) and data.forge_hash == str(data.forge_loading_parameters)

    def load_model(self):
        """The selected checkpoint, loaded as Forge's first generation would (caller holds the queue lock)."""
        try:
            self.sd_models.forge_model_reload()
        except Exception as e:
            raise UnsupportedModelError(f"Forge could not load the selected checkpoint ({type(e).__name__}: {e})") from e
        return self.sd_models.model_data.sd_model


def is_loaded(sd_model):
    return sd_model is not None and getattr(sd_model, "forge_objects", None) is not None


class ForgeHost(Host):
    def __init__(self, sd_model, webui):
        self.sd_model, self.webui, self.mm = sd_model, webui, webui.mm
        self._refuse_unsupported()
        engines = [getattr(sd_model, n, None) for n in ("text_processing_engine", "text_processing_engine_l")]
        embeddings = [w for e in engines for w in getattr(getattr(e, "embeddings", None), "word_embeddings", {}) or {}]
        self.known_names = tuple(webui.known_names) + tuple(embeddings)
        m = sd_model
        objects = m.forge_objects_original
        self.unet_patcher, self.clip_patcher, self.vae = objects.unet, objects.clip.patcher, objects.vae
        kmodel = self.unet_patcher.model
        self.arch = "sdxl" if m.is_sdxl else "sd2" if getattr(m, "is_sd2", False) else "sd1"
        self.prediction = PREDICTIONS[kmodel.predictor.prediction_type]
        self.alphas_cumprod = kmodel.predictor.alphas_cumprod.detach().float().cpu().clone()
        self.device = torch.device(self.unet_patcher.load_device)
        info = getattr(m, "sd_checkpoint_info", None)
        self.model_name = getattr(info, "name", None)
        self.model_hash = getattr(info, "hash", None)
        self.model_sha256 = getattr(info, "sha256", None)
        opts = getattr(webui.shared, "opts", None)
        self._clip_skip_setting = int(getattr(opts, "CLIP_stop_at_last_layers", 1) or 1)
        self.clip_skip = self._clip_skip_setting if self.arch == "sd1" else 1  # what kohya's metadata records
        self.unet = Component("unet", kmodel.diffusion_model, "lora_unet", "ldm_unet", self.arch)
        encoders = objects.clip.cond_stage_model
        if self.arch == "sdxl":
            self.text_encoders = [Component("te1", encoders.clip_l.transformer, "lora_te1", "hf_clip", "sdxl"),
                                  Component("te2", encoders.clip_g.transformer, "lora_te2", "hf_clip", "sdxl")]
        else:
            te = encoders.clip_h if self.arch == "sd2" else encoders.clip_l
            self.text_encoders = [Component("te", te.transformer, "lora_te", "hf_clip", self.arch)]
        self._train_text_encoder = False
        self._warned_partial = False
        self.warnings = []

    @classmethod
    def for_request(cls, webui, lock):
        """At request time: the loaded model; only when Forge has loaded none yet (it loads lazily, at
        the first generation) is the selected checkpoint loaded now, under the queue lock."""
        sd_model = webui.sd_models.model_data.sd_model
        if not is_loaded(sd_model):
            with lock:
                sd_model = webui.load_model()
        return cls(sd_model, webui)

    @classmethod
    def for_job(cls, webui):
        """In the job (queue lock held): the checkpoint selected now, loaded if it is not."""
        return cls(webui.load_model() if not webui.model_is_current() else webui.sd_models.model_data.sd_model,
                   webui)

    # -- what cannot be trained -----------------------------------------------------------------
    def _refuse_unsupported(self):
        m = self.sd_model
        if not is_loaded(m):
            raise UnsupportedModelError("no checkpoint is loaded; select one in Forge's checkpoint list first")
        kind = type(m).__name__
        if getattr(m, "is_sd3", False) or kind in ("Flux", "Chroma", "StableDiffusion3"):
            raise UnsupportedModelError(f"{kind} models cannot be trained here; select an SD1.x, SD2.x or SDXL "
                                        "checkpoint")
        if not (getattr(m, "is_sd1", False) or getattr(m, "is_sd2", False) or getattr(m, "is_sdxl", False)):
            raise UnsupportedModelError(f"{kind} models are not supported; select an SD1.x, SD2.x or SDXL checkpoint")
        encoders = m.forge_objects_original.clip.cond_stage_model
        if getattr(m, "is_sdxl", False) and not hasattr(encoders, "clip_l"):
            raise UnsupportedModelError("this SDXL checkpoint has one text encoder (an SDXL refiner?); "
                                        "select an SDXL base model to train a LoRA")
        kmodel = m.forge_objects_original.unet.model
        if getattr(m, "is_inpaint", False) or getattr(kmodel.diffusion_model, "in_channels", 4) != 4:
            raise UnsupportedModelError("inpainting checkpoints are not supported; select a normal (txt2img) "
                                        "checkpoint")
        storage = getattr(kmodel, "storage_dtype", None)
        if storage is not None and storage not in (torch.float16, torch.bfloat16, torch.float32):
            raise UnsupportedModelError(
                f"the UNet is stored as {storage} ('Diffusion in Low Bits'); LoRA training needs fp16, bf16 or "
                "fp32 weights — set 'Diffusion in Low Bits' to 'Automatic' and generate once to reload the model")
        prediction = getattr(kmodel.predictor, "prediction_type", None)
        if prediction not in PREDICTIONS:
            raise UnsupportedModelError(f"the model predicts {prediction!r}; only epsilon and v-prediction "
                                        "checkpoints can be trained")

    # -- what the engine calls ------------------------------------------------------------------
    def extra_modules(self):
        return [self.vae.first_stage_model]

    def encode_images(self, pixels):
        with torch.no_grad():
            latents = self.sd_model.encode_first_stage(pixels.float())
        latents = latents.clone()  # an inference tensor: Forge encodes under inference_mode
        self._keep_loaded()  # the VAE may have pushed the UNet off the device
        return latents

    def encode_text(self, captions, sizes):
        m, captions = self.sd_model, list(captions)
        if self.arch != "sdxl":
            return {"context": m.text_processing_engine(captions)}
        cond_l = m.text_processing_engine_l(captions)
        cond_g, pooled = m.text_processing_engine_g(captions)
        sizes = torch.tensor([list(s) for s in sizes], dtype=torch.float32)
        size_emb = m.embedder(sizes.flatten()).reshape(len(captions), -1)  # 6 x Timestep(256), as Forge does
        vector = torch.cat([pooled, size_emb.to(pooled)], dim=1)
        return {"context": torch.cat([cond_l, cond_g], dim=2), "y": vector}

    def predict(self, noisy, timesteps, cond):
        y = cond.get("y")
        return self.unet.module(noisy, timesteps.float(), context=cond["context"].to(noisy.dtype),
                                y=None if y is None else y.to(noisy.dtype), transformer_options={})

    def latents_cached(self):
        """Every latent is cached: the VAE leaves the device (through Forge's bookkeeping)."""
        unload(self.mm, self.vae.patcher)
        self.mm.soft_empty_cache()

    def sample(self, prompt, seed, width, height, steps=20):
        """A picture from Forge's own txt2img processing, with the attached LoRA active."""
        if self.webui.processing is None:
            return None
        if not self.webui.model_is_current():
            raise RuntimeError("another checkpoint was selected during training; previews are skipped so that "
                               "Forge does not switch models under the training")
        try:
            return self._txt2img(prompt, seed, width, height, steps, "Euler a")
        finally:
            self._keep_loaded()  # sampling ran in inference mode and may have moved or re-made weights

    def generate(self, prompt, seed, width, height, steps=20, sampler="Euler a", lora=None):
        """Through Forge's txt2img with ``<lora:file:strength>`` in the prompt, as a user would."""
        if self.webui.processing is None:
            raise UnsupportedModelError("Forge's processing module is not available to generate pictures")
        return self._txt2img(lora_prompt(prompt, lora), seed, width, height, steps, sampler)

    def _txt2img(self, prompt, seed, width, height, steps, sampler):
        return txt2img(self.webui.processing, self.sd_model, prompt, seed, width, height, steps, sampler)

    # -- session --------------------------------------------------------------------------------
    def _training_patchers(self):
        return [self.unet_patcher, self.clip_patcher]

    def _keep_loaded(self):
        """UNet and text encoders on the device, with autograd-safe tensors (cheap when already so)."""
        if not getattr(self, "_active", False):
            return
        self.mm.load_models_gpu(self._training_patchers())
        for lm in self.mm.current_loaded_models:
            if lm.model is self.unet_patcher and getattr(lm, "model_accelerated", False) and not self._warned_partial:
                self._warned_partial = True
                self.warnings.append("the UNet did not fit on the GPU next to Forge's other models; Forge streams "
                                     "part of it from the CPU at every step, which makes training slow")
        modules = [self.unet.module] + ([c.module for c in self.text_encoders] if self._train_text_encoder else [])
        for module in modules:
            make_autograd_safe(module)

    def _clear_merged_loras(self):
        """Weights as in the checkpoint: undo LoRAs merged by the last generation, and make the next
        generation re-apply its LoRAs (from disk, not from Forge's cache)."""
        m = self.sd_model
        for patcher in self._training_patchers():
            patcher.lora_loader.refresh(lora_patches={}, offload_device=patcher.offload_device)
        m.forge_objects = m.forge_objects_original.shallow_copy()
        m.forge_objects_after_applying_lora = m.forge_objects_original.shallow_copy()
        self.forget_loras()

    def forget_loras(self):
        forget_cached_loras(self.sd_model, self.webui.networks)
        clear_prompt_cache(self.webui.processing)

    @contextlib.contextmanager
    def session(self, train_text_encoder=False):
        self._train_text_encoder = bool(train_text_encoder)
        hooks = []
        with super().session(train_text_encoder):  # records the flags first: the weights get swapped below
            try:
                if any(getattr(lm, "model_accelerated", False) for lm in self.mm.current_loaded_models):
                    self.mm.unload_all_models()  # a partial (CPU-swap) load of the last generation: start clean
                self._clear_merged_loras()
                self.sd_model.set_clip_skip(self._clip_skip_setting)  # as Forge's processing sets it per generation
                self._active = True
                self._keep_loaded()
                for block in self.unet.module.modules():
                    if type(block).__name__ == "BasicTransformerBlock":
                        for name in NORMS:
                            norm = getattr(block, name, None)
                            if isinstance(norm, torch.nn.Module):
                                hooks.append(norm.register_forward_pre_hook(_copy_input))
                yield self
            finally:
                self._active = False
                for h in hooks:
                    h.remove()
                self.forget_loras()
                self.mm.soft_empty_cache(force=True)

    def refresh_lora_list(self):
        """After a file was written: Forge finds new names on first use, but caches by name."""
        self.forget_loras()
        networks = self.webui.networks
        if networks is None or not hasattr(networks, "list_available_networks"):
            return "Forge's built-in LoRA extension is disabled: press Refresh on the Lora cards after enabling it"
        networks.list_available_networks()
        return None


def _copy_input(module, args):
    """Forge's transformer block adds in place to the tensor its norms save; give them a copy."""
    x = args[0]
    if torch.is_grad_enabled() and x.requires_grad:
        return (x.clone(),) + tuple(args[1:])
    return None


# -- entry points for webui.py (the running Forge) ----------------------------------------------------
def request_host(lock):  # pragma: no cover - needs a running Forge
    return ForgeHost.for_request(ForgeWebUI.import_modules(), lock)


def job_host():  # pragma: no cover - needs a running Forge
    return ForgeHost.for_job(ForgeWebUI.import_modules())


def model_info():  # pragma: no cover - needs a running Forge
    return describe(ForgeWebUI.import_modules())


def describe(webui):
    """The checkpoint training will use, for the tab (Forge loads it lazily)."""
    data = webui.sd_models.model_data
    selected = (data.forge_loading_parameters or {}).get("checkpoint_info")
    name = getattr(selected, "name", None) or (selected if isinstance(selected, str) else None)
    if name is None:
        return "**No checkpoint selected.** Select one in Forge's checkpoint list."
    if not webui.model_is_current():
        return f"Training on the selected checkpoint: **{name}** (Forge loads it when the training starts)"
    m = data.sd_model
    arch = "SDXL" if m.is_sdxl else "SD2" if getattr(m, "is_sd2", False) else "SD1" if getattr(m, "is_sd1", False) \
        else type(m).__name__
    prediction = getattr(m.forge_objects_original.unet.model.predictor, "prediction_type", "")
    pred = " (v-prediction)" if prediction == "v_prediction" else ""
    return f"Training on the loaded checkpoint: **{name}** — {arch}{pred}"
