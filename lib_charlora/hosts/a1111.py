"""Host adapter for AUTOMATIC1111 1.10.x (reForge, whose ``sd_model`` is A1111-like, subclasses it).

It hands the engine the pieces of the checkpoint the WebUI has loaded (reference: a1111-host.md):

* SD1 / SD2: ``ldm`` ``LatentDiffusion``; text through the WebUI's own hijacked wrapper
  ``sd_model.cond_stage_model(texts)`` (clip skip, emphasis, TI embeddings as at inference);
* SDXL: ``sgm`` ``DiffusionEngine``; ``sd_model.conditioner({...})`` with per-picture original
  size / crop / target size, giving ``{"crossattn", "vector"}``;
* latents ``get_first_stage_encoding(encode_first_stage(x))``; the raw UNet output from
  ``apply_model``; the noise schedule from ``alphas_cumprod_original`` (never the possibly
  downcast or rescaled ``alphas_cumprod``).

The WebUI objects are passed in (``from_webui()`` reads them from ``modules``), so the adapter
is tested against a double of that API built around the real ldm UNet.
"""
import contextlib

import torch

from ..engine.errors import UnsupportedModelError
from ..engine.host import Component, Host
from .webui_common import clear_prompt_cache, lora_prompt, txt2img


def _unwrap(module):
    return getattr(module, "wrapped", module)


class A1111Host(Host):
    def __init__(self, sd_model, cmd_opts=None, opts=None, devices=None, networks=None, known_names=(),
                 processing=None, scripts=None):
        self.sd_model = sd_model
        self.cmd_opts, self.opts, self.webui_devices, self.networks = cmd_opts, opts, devices, networks
        self.processing, self.scripts = processing, scripts
        self._vae_device = None
        self.known_names = tuple(known_names)
        self._refuse_unsupported()
        m = sd_model
        self.arch = "sdxl" if getattr(m, "is_sdxl", False) else "sd2" if getattr(m, "is_sd2", False) else "sd1"
        self.prediction = "v" if getattr(m, "parameterization", "eps") == "v" else "eps"
        ac = getattr(m, "alphas_cumprod_original", None)
        if ac is None:
            ac = m.alphas_cumprod
        self.alphas_cumprod = ac.detach().float().cpu()
        self.device = getattr(devices, "device", None) or next(m.model.diffusion_model.parameters()).device
        self.device = torch.device(self.device)
        info = getattr(m, "sd_checkpoint_info", None)
        self.model_name = getattr(info, "name", None)
        self.model_hash = getattr(info, "hash", None)
        self.model_sha256 = getattr(info, "sha256", None)
        self.clip_skip = int(getattr(opts, "CLIP_stop_at_last_layers", 1) or 1) if self.arch == "sd1" else 1
        self.vae_scale = 8
        medvram = bool(getattr(cmd_opts, "medvram", False)) or (
            self.arch == "sdxl" and bool(getattr(cmd_opts, "medvram_sdxl", False)))
        self.supports_text_encoder_training = not medvram
        self.unet = Component("unet", m.model.diffusion_model, "lora_unet", "ldm_unet", self.arch)
        if self.arch == "sdxl":
            emb = [e for e in m.conditioner.embedders if hasattr(e, "wrapped")]
            self.text_encoders = [Component("te1", emb[0].wrapped.transformer, "lora_te1", "hf_clip", "sdxl"),
                                  Component("te2", emb[1].wrapped.model, "lora_te2", "open_clip", "sdxl")]
        elif self.arch == "sd2":
            self.text_encoders = [Component("te", _unwrap(m.cond_stage_model).model, "lora_te", "open_clip", "sd2")]
        else:
            self.text_encoders = [Component("te", _unwrap(m.cond_stage_model).transformer, "lora_te", "hf_clip", "sd1")]

    @classmethod
    def from_webui(cls):  # pragma: no cover - needs a running WebUI
        from modules import devices, processing, scripts, shared
        try:
            import networks  # the built-in Lora extension
        except ImportError:
            networks = None
        known = []
        try:
            from modules import sd_hijack
            known += list(sd_hijack.model_hijack.embedding_db.word_embeddings)
        except Exception:
            pass
        if networks is not None:
            known += list(getattr(networks, "available_networks", {}))
        return cls(shared.sd_model, shared.cmd_opts, shared.opts, devices, networks, known, processing, scripts)

    # -- what cannot be trained -----------------------------------------------------------------
    def _refuse_unsupported(self):
        m, cmd = self.sd_model, self.cmd_opts
        if m is None:
            raise UnsupportedModelError("no checkpoint is loaded; load one in the WebUI first")
        if getattr(cmd, "lowvram", False):
            raise UnsupportedModelError("training is not possible with --lowvram (it swaps the model block by block "
                                        "between the CPU and the GPU); restart the WebUI without --lowvram "
                                        "(--medvram works: the text encoder is then not trained)")
        if getattr(m, "is_sd3", False):
            raise UnsupportedModelError("SD3 models are not supported; load an SD1.x, SD2.x or SDXL checkpoint")
        if getattr(m, "is_ssd", False):
            raise UnsupportedModelError("SSD-1B models are not supported; load an SD1.x, SD2.x or SDXL checkpoint")
        if getattr(self.webui_devices, "fp8", False) or getattr(self.opts, "fp8_storage", "Disable") not in (
                "Disable", None, False):
            raise UnsupportedModelError("the model is stored in fp8; set Settings → Optimizations → FP8 weight to "
                                        "'Disable' and reload the checkpoint to train")
        if getattr(getattr(m, "model", None), "conditioning_key", None) in ("hybrid", "concat") or \
                getattr(m, "is_sdxl_inpaint", False):
            raise UnsupportedModelError("inpainting checkpoints are not supported; load a normal (txt2img) checkpoint")
        if getattr(m, "cond_stage_key", None) == "edit":
            raise UnsupportedModelError("instruct-pix2pix checkpoints are not supported; load a normal checkpoint")
        if getattr(m, "is_sdxl", False):
            text_embedders = [e for e in m.conditioner.embedders if hasattr(e, "wrapped")]
            if len(text_embedders) != 2:
                raise UnsupportedModelError("this SDXL checkpoint has one text encoder (an SDXL refiner?); "
                                            "load an SDXL base model to train a LoRA")

    # -- what the engine calls ------------------------------------------------------------------
    def extra_modules(self):
        return [self.sd_model.first_stage_model]

    def encode_images(self, pixels):
        vae = self.sd_model.first_stage_model
        dtype = next(vae.parameters()).dtype
        with torch.no_grad():
            return self.sd_model.get_first_stage_encoding(self.sd_model.encode_first_stage(pixels.to(self.device, dtype)))

    def encode_text(self, captions, sizes):
        m = self.sd_model
        if self.arch != "sdxl":
            return {"c": m.cond_stage_model(list(captions))}
        rows = torch.tensor([list(s) for s in sizes], dtype=torch.float32, device=self.device)
        batch = {"txt": list(captions), "original_size_as_tuple": rows[:, 0:2],
                 "crop_coords_top_left": rows[:, 2:4], "target_size_as_tuple": rows[:, 4:6]}
        out = m.conditioner(batch)
        return {"crossattn": out["crossattn"], "vector": out["vector"]}

    def predict(self, noisy, timesteps, cond):
        if self.arch == "sdxl":
            return self.sd_model.apply_model(noisy, timesteps, cond)
        return self.sd_model.apply_model(noisy, timesteps, cond["c"])

    def latents_cached(self):
        """Every latent is cached: the VAE leaves the GPU until a preview or the end of training."""
        vae = self.sd_model.first_stage_model
        device = self._vae_current_device()
        if device.type != "cpu":
            self._vae_device = device
            vae.to("cpu")
            getattr(self.webui_devices, "torch_gc", lambda: None)()

    def _vae_current_device(self):
        return next(self.sd_model.first_stage_model.parameters()).device

    def _restore_vae(self):
        if self._vae_device is not None:
            self.sd_model.first_stage_model.to(self._vae_device)
            self._vae_device = None

    def sample(self, prompt, seed, width, height, steps=20):
        """A picture from the WebUI's own txt2img pipeline, with the attached LoRA active."""
        if self.processing is None:
            return None
        self._restore_vae()  # the sampler decodes with it
        return self._txt2img(prompt, seed, width, height, steps, "Euler a")

    def generate(self, prompt, seed, width, height, steps=20, sampler="Euler a", lora=None):
        """Through the WebUI's txt2img with ``<lora:file:strength>`` in the prompt, as a user would."""
        if self.processing is None:
            raise UnsupportedModelError("the WebUI's processing module is not available to generate pictures")
        return self._txt2img(lora_prompt(prompt, lora), seed, width, height, steps, sampler)

    def _txt2img(self, prompt, seed, width, height, steps, sampler):
        return txt2img(self.processing, self.sd_model, prompt, seed, width, height, steps, sampler, self.scripts)

    # -- session --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, train_text_encoder=False):
        """Clear LoRAs the last generation left merged in the weights, freeze everything, and on
        exit refresh the WebUI's Lora list (so the new file is listed without a restart)."""
        if self.networks is not None and hasattr(self.networks, "load_networks"):
            # the next forward of each module restores its clean weights; every list given (reForge zips them)
            self.networks.load_networks([], [], [], [])
        # sgm's conditioner runs embedders that are not "trainable" under no_grad: a text-encoder
        # LoRA would get no gradient. Mark the two text embedders trainable for the session only.
        flags = []
        if self.arch == "sdxl" and train_text_encoder:
            flags = [(e, e.is_trainable) for e in self.sd_model.conditioner.embedders
                     if hasattr(e, "wrapped") and hasattr(e, "is_trainable")]
        try:
            for e, _ in flags:
                e.is_trainable = True
            with super().session(train_text_encoder):
                yield self
        finally:
            self._restore_vae()
            for e, flag in flags:
                e.is_trainable = flag
            clear_prompt_cache(self.processing)  # previews cached conditioning made with the in-training LoRA

    def refresh_lora_list(self):
        """-> None, or a note when the WebUI's Lora extension is not there. Conditioning the WebUI
        cached with an older file of the same name is forgotten."""
        clear_prompt_cache(self.processing)
        if self.networks is None or not hasattr(self.networks, "list_available_networks"):
            return "the WebUI's built-in Lora extension is disabled: press Refresh on the Lora cards after enabling it"
        self.networks.list_available_networks()
        return None


# -- entry points for webui.py (the running A1111) ---------------------------------------------------
def request_host(lock=None):  # pragma: no cover - needs a running WebUI
    return A1111Host.from_webui()  # A1111 loads the checkpoint at start and on a switch: no lock needed


def job_host():  # pragma: no cover - needs a running WebUI
    return A1111Host.from_webui()


def model_info():  # pragma: no cover - needs a running WebUI
    from modules import shared
    return describe(shared.sd_model)


def describe(sd_model):
    """The loaded checkpoint, for the tab."""
    if sd_model is None:
        return "**No checkpoint loaded.**"
    info = getattr(sd_model, "sd_checkpoint_info", None)
    arch = "SDXL" if getattr(sd_model, "is_sdxl", False) else "SD2" if getattr(sd_model, "is_sd2", False) else "SD1"
    pred = " (v-prediction)" if getattr(sd_model, "parameterization", "eps") == "v" else ""
    return f"Training on the loaded checkpoint: **{getattr(info, 'name', '?')}** — {arch}{pred}"
