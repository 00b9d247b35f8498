"""Hosts over plain torch modules: a diffusers UNet, or an ldm (compvis-named) UNet, with
Hugging Face CLIP text encoders and a VAE. Used by the standalone CLI, the demo and the tests;
the WebUI adapters supply the same pieces from the WebUI's loaded model.
"""
import torch

from ..engine.errors import UnsupportedModelError
from ..engine.host import Component, Host


def sd_alphas_cumprod(beta_start=0.00085, beta_end=0.012, steps=1000):
    """The "scaled linear" DDPM schedule SD1.x, SD2.x and SDXL were trained with."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def fourier_embedding(values, dim, max_period=10000):
    """Sinusoidal embedding of scalars (SDXL's size / crop conditioning), [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(float(max_period))) * torch.arange(half, dtype=torch.float32) / half)
    args = values.float()[:, None] * freqs[None].to(values.device)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _ClipVaeHost(Host):
    """Shared text/VAE handling. ``text_encoders`` = [(CLIPTextModel[WithProjection], tokenizer), ...]."""

    unet_scheme = None

    def __init__(self, unet, vae, text_encoders, arch="sd1", prediction="eps", alphas_cumprod=None,
                 vae_scaling_factor=None, device=None, model_name=None, clip_skip=1):
        if arch not in ("sd1", "sd2", "sdxl"):
            raise UnsupportedModelError(f"unsupported architecture {arch!r}; supported: sd1, sd2, sdxl")
        self.arch, self.prediction, self.clip_skip = arch, prediction, clip_skip
        self.alphas_cumprod = sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.float().cpu()
        self.device = torch.device(device) if device is not None else next(unet.parameters()).device
        self.vae = vae
        self.vae_scaling_factor = vae_scaling_factor or (0.13025 if arch == "sdxl" else 0.18215)
        self.model_name = model_name
        self._tokenizers = [tok for _, tok in text_encoders]
        self.unet = Component("unet", unet, "lora_unet", self.unet_scheme, arch)
        if arch == "sdxl":
            if len(text_encoders) != 2:
                raise UnsupportedModelError(
                    f"an SDXL base model has two text encoders, this one has {len(text_encoders)}; "
                    "SDXL refiner models are not supported")
            names = [("te1", "lora_te1"), ("te2", "lora_te2")]
        else:
            if len(text_encoders) != 1:
                raise UnsupportedModelError(f"an {arch} model has one text encoder, got {len(text_encoders)}")
            names = [("te", "lora_te")]
        self.text_encoders = [Component(n, te, p, "hf_clip", arch) for (n, p), (te, _) in zip(names, text_encoders)]

    def extra_modules(self):
        return [self.vae]

    def encode_images(self, pixels):
        vae_dtype = next(self.vae.parameters()).dtype
        out = self.vae.encode(pixels.to(self.device, vae_dtype))
        dist = getattr(out, "latent_dist", out)
        return dist.sample() * self.vae_scaling_factor

    def _hidden(self, index, captions):
        te, tok = self.text_encoders[index].module, self._tokenizers[index]
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        return te(ids, output_hidden_states=True)

    def encode_text(self, captions, sizes):
        if self.arch != "sdxl":
            out = self._hidden(0, captions)
            if self.clip_skip > 1:  # A1111's clip skip: an earlier layer, then the final LayerNorm
                te = self.text_encoders[0].module
                norm = getattr(te, "text_model", te).final_layer_norm
                return {"context": norm(out.hidden_states[-self.clip_skip])}
            return {"context": out.last_hidden_state}
        o1, o2 = self._hidden(0, captions), self._hidden(1, captions)
        context = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
        pooled = o2.text_embeds
        time_ids = torch.tensor([list(s) for s in sizes], dtype=torch.float32, device=self.device)
        return {"context": context, "pooled": pooled, "time_ids": time_ids}

    def check_supported(self):
        super().check_supported()
        if self.in_channels != self.latent_channels:
            raise UnsupportedModelError(
                f"the UNet takes {self.in_channels} input channels; inpainting / instruct-pix2pix models "
                "are not supported — load a normal (txt2img) checkpoint")


SAMPLERS = {"Euler a": "EulerAncestralDiscreteScheduler", "Euler": "EulerDiscreteScheduler",
            "DPM++ 2M": "DPMSolverMultistepScheduler", "DDIM": "DDIMScheduler"}
EVAL_ADAPTER = "charlora_eval"


class DiffusersHost(_ClipVaeHost):
    """Over diffusers' ``UNet2DConditionModel`` (+ ``AutoencoderKL``). Pictures (previews, evaluation)
    come from a diffusers pipeline over the same modules; evaluation loads the LoRA file with
    diffusers' own ``load_lora_weights``, as a diffusers user would, and unloads it afterwards."""

    unet_scheme = "diffusers_unet"
    pipeline = None   # set by the checkpoint loader; built from the modules on first use otherwise

    def _pipe(self, sampler):
        import diffusers
        if sampler not in SAMPLERS:
            raise UnsupportedModelError(f"unknown sampler {sampler!r}; the standalone samplers are "
                                        f"{', '.join(SAMPLERS)}")
        if self.pipeline is None:
            (te, tok), *rest = [(c.module, t) for c, t in zip(self.text_encoders, self._tokenizers)]
            if self.arch == "sdxl":
                (te2, tok2), = rest
                self.pipeline = diffusers.StableDiffusionXLPipeline(
                    vae=self.vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                    unet=self.unet.module, scheduler=diffusers.EulerDiscreteScheduler(**scheduler_config(self.prediction)))
            else:
                self.pipeline = diffusers.StableDiffusionPipeline(
                    vae=self.vae, text_encoder=te, tokenizer=tok, unet=self.unet.module,
                    scheduler=diffusers.EulerDiscreteScheduler(**scheduler_config(self.prediction)), safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False)
        pipe = self.pipeline
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(
            {**scheduler_config(self.prediction), **({"timestep_spacing": "trailing"} if sampler != "DDIM" else {})})
        return pipe

    def _picture(self, prompt, seed, width, height, steps, sampler):
        pipe = self._pipe(sampler)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        with torch.no_grad():
            return pipe(prompt=prompt, negative_prompt="", num_inference_steps=steps, guidance_scale=7.0,
                        width=width, height=height, generator=generator).images[0]

    def sample(self, prompt, seed, width, height, steps=20):
        """A preview with the in-training LoRA (the trainer's hooks are active on the modules)."""
        return self._picture(prompt, seed, width, height, steps, "Euler a")

    def generate(self, prompt, seed, width, height, steps=20, sampler="Euler a", lora=None):
        """The file stays loaded for the next picture of the same file (loading is the slow part);
        ``release()`` (the evaluation calls it at the end) unloads it."""
        if lora is None:
            self.release()
            return self._picture(prompt, seed, width, height, steps, sampler)
        path, strength = lora
        pipe = self._pipe(sampler)
        if self._loaded != path:
            self.release()
            roots = (self.unet.module, *(c.module for c in self.text_encoders))
            self._attrs = [(m, set(m.__dict__)) for m in roots]
            self._grads = [(p, p.requires_grad) for m in roots for p in m.parameters()]  # peft freezes them
            unmatched = _load_lora(pipe, path)
            self._loaded = path
            if unmatched:
                self.release()
                raise UnsupportedModelError(f"diffusers did not load every tensor of {path}: {unmatched}")
        pipe.set_adapters([EVAL_ADAPTER], adapter_weights=[float(strength)])
        return self._picture(prompt, seed, width, height, steps, sampler)

    _loaded = None   # the LoRA file generate() has loaded

    def release(self):
        if self._loaded is not None:
            self._loaded = None
            self.pipeline.unload_lora_weights()
            for module, keys in self._attrs:  # the loaders' bookkeeping flags, so the modules are as they were
                for key in set(module.__dict__) - keys:
                    delattr(module, key)
            for p, flag in self._grads:
                p.requires_grad_(flag)

    @property
    def in_channels(self):
        return self.unet.module.config.in_channels

    def predict(self, noisy, timesteps, cond):
        added = None
        if self.arch == "sdxl":
            added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        return self.unet.module(noisy, timesteps, encoder_hidden_states=cond["context"],
                                added_cond_kwargs=added).sample


def scheduler_config(prediction):
    """The SD noise schedule as diffusers schedulers take it (the checkpoint loader writes it too)."""
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "v_prediction" if prediction == "v" else "epsilon", "steps_offset": 1}


def _load_lora(pipe, path):
    """``pipe.load_lora_weights(path)``; returns what diffusers' logger reported as not loaded ("" if all)."""
    import logging
    messages = []

    class Catch(logging.Handler):
        def emit(self, record):
            text = record.getMessage()
            if any(marker in text for marker in ("unexpected keys", "missing keys", "were not used")):
                messages.append(text[:300])

    handler = Catch(logging.WARNING)
    loggers = [logging.getLogger("diffusers"), logging.getLogger("peft")]
    try:  # transformers draws a bar per text-encoder load otherwise
        from transformers.utils import logging as tf_logging
        tf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    for lg in loggers:
        lg.addHandler(handler)
    try:
        pipe.load_lora_weights(path, adapter_name=EVAL_ADAPTER)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    return "; ".join(messages)


class LdmHost(_ClipVaeHost):
    """Over ldm's / sgm's ``UNetModel`` with compvis module names (the layout A1111 and Forge use).

    SDXL: the UNet's ``y`` vector is the pooled text embedding + 256-wide (or ``size_embed_dim``)
    Fourier features of original size, crop and target size, as sgm's ``ConcatTimestepEmbedderND``.
    """

    unet_scheme = "ldm_unet"

    def __init__(self, *args, size_embed_dim=256, **kwargs):
        super().__init__(*args, **kwargs)
        self.size_embed_dim = size_embed_dim

    @property
    def in_channels(self):
        return self.unet.module.in_channels

    def encode_text(self, captions, sizes):
        cond = super().encode_text(captions, sizes)
        if self.arch != "sdxl":
            return cond
        ids = cond.pop("time_ids")
        b = ids.shape[0]
        fourier = fourier_embedding(ids.flatten(), self.size_embed_dim).reshape(b, -1)
        cond["y"] = torch.cat([cond.pop("pooled"), fourier.to(cond["context"].dtype)], dim=-1)
        return cond

    def predict(self, noisy, timesteps, cond):
        return self.unet.module(noisy, timesteps=timesteps, context=cond["context"], y=cond.get("y"))

