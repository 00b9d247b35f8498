"""Host adapter for reForge (``Panchovix/stable-diffusion-webui-reForge``, main): A1111's model layout
over a ComfyUI-style backend (``ldm_patched``).

``shared.sd_model`` is A1111's ``LatentDiffusion`` (text, latents and ``apply_model`` as in A1111), so
this is the A1111 adapter with reForge's differences, seen on a real reForge (forge-host.md §9):

* the weights are managed by ``ldm_patched``'s memory manager through patchers
  (``sd_model.forge_objects_original``): a generation with ``<lora:…>`` merges the LoRA into the
  weights in place, under inference mode, and leaves them so. Loading the clean patchers (what a
  generation without LoRA does) restores the checkpoint's weights and puts the UNet and the text
  encoder on the device, fully; they are kept there (a VAE encode or a preview may move them) with
  autograd-safe tensors;
* the VAE is moved through that manager too, never behind its back;
* the LoRA extension caches files by name and skips an unchanged LoRA list: reset after training.
"""
import contextlib

from . import a1111
from .a1111 import A1111Host
from .webui_common import forget_cached_loras, make_autograd_safe, unload


class ReForgeHost(A1111Host):
    def __init__(self, sd_model, *args, model_management=None, **kwargs):
        super().__init__(sd_model, *args, **kwargs)
        self.mm = model_management
        self._active = False

    @classmethod
    def from_webui(cls):  # pragma: no cover - needs a running reForge
        from ldm_patched.modules import model_management
        host = A1111Host.from_webui()
        return cls(host.sd_model, host.cmd_opts, host.opts, host.webui_devices, host.networks, host.known_names,
                   host.processing, host.scripts, model_management=model_management)

    def _patchers(self):
        objects = self.sd_model.forge_objects_original
        return [objects.unet, objects.clip.patcher]

    def _keep_loaded(self):
        if not self._active:
            return
        self.mm.load_models_gpu(self._patchers(), force_full_load=True)
        for module in [self.unet.module] + [c.module for c in self.text_encoders]:
            make_autograd_safe(module)

    def encode_images(self, pixels):
        latents = super().encode_images(pixels).clone()  # reForge encodes under inference_mode
        self._keep_loaded()
        return latents

    def latents_cached(self):
        unload(self.mm, self.sd_model.forge_objects.vae.patcher)
        self.mm.soft_empty_cache()

    def sample(self, prompt, seed, width, height, steps=20):
        try:
            return super().sample(prompt, seed, width, height, steps)
        finally:
            self._keep_loaded()

    @contextlib.contextmanager
    def session(self, train_text_encoder=False):
        with super().session(train_text_encoder):
            try:
                self._active = True
                self._keep_loaded()  # the checkpoint's weights, not those merged with the last generation's LoRA
                yield self
            finally:
                self._active = False
                forget_cached_loras(self.sd_model, self.networks)
                self.mm.soft_empty_cache()

    def refresh_lora_list(self):
        forget_cached_loras(self.sd_model, self.networks)
        return super().refresh_lora_list()


# -- entry points for webui.py (the running reForge) --------------------------------------------------
def request_host(lock=None):  # pragma: no cover - needs a running reForge
    return ReForgeHost.from_webui()


job_host = ReForgeHost.from_webui
model_info = a1111.model_info  # the same model object and checkpoint info as A1111's
