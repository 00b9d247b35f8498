"""The training loop: LoRA on a live model through a ``Host``, written as a kohya file.

Deterministic under a seed: every random draw of the loop (data order, flips, noise, timesteps)
comes from one CPU ``torch.Generator``, LoRA dropout from the global RNG inside ``fork_rng`` (the
host's own RNG state is left as it was). A checkpoint stores all of it, so a resumed run ends with
the same weights as an uninterrupted one.
"""
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import export
from .checkpointing import gradient_checkpointing
from .config import TrainConfig
from . import captions as cap
from . import statefile
from . import trainset
from .parallel import SINGLE
from .errors import CharLoraError, ConfigError
from .lora import LoRANetwork
from .memory import PeakMemory
from .optim import choose_precision, make_optimizer, make_scheduler, require_optimizer

STATE_VERSION = 2   # 2: a safetensors file with the rest as JSON (engine.statefile); 1 was a pickle


@dataclass
class Progress:
    step: int
    total: int
    loss: Optional[float]      # mean loss of the last ``log_every`` steps (None before the first read)
    lr: float
    elapsed: float
    eta: Optional[float]
    memory_mb: Optional[float] = None   # peak memory so far beyond the loaded model (engine.memory)


@dataclass
class TrainResult:
    status: str                        # "done", "stopped" (saved early) or "cancelled" (nothing written)
    steps_done: int
    path: Optional[str] = None
    loss_history: list = field(default_factory=list)   # [(step, mean loss)]
    metadata: dict = field(default_factory=dict)
    num_keys: int = 0
    checkpoints: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_mb: Optional[float] = None   # beyond the loaded model: CUDA allocated, else resident memory


class CancelToken:
    """Thread-safe stop request: ``stop(save=True)`` keeps what is trained, ``save=False`` discards."""

    def __init__(self):
        self._event = threading.Event()
        self.save = True

    def stop(self, save=True):
        self.save = bool(save)
        self._event.set()

    @property
    def requested(self):
        return self._event.is_set()


def diffusion_loss(pred, x0, noise, alphas, prediction, min_snr_gamma):
    """Per-batch MSE to the eps or v target, min-SNR-gamma weighted. ``alphas`` = alphas_cumprod[t]."""
    a = alphas.view(-1, 1, 1, 1)
    target = noise if prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        snr = alphas / (1 - alphas)
        weight = torch.clamp(snr, max=min_snr_gamma) / (snr if prediction == "eps" else snr + 1)
        loss = loss * weight
    return loss.mean()


class Trainer:
    def __init__(self, host, config: TrainConfig, images, output_dir, checkpoint_dir=None,
                 progress: Optional[Callable[[Progress], None]] = None, cancel: Optional[CancelToken] = None,
                 dataset_name="images", caption_provider=None, latent_cache_dir=None, on_preview=None,
                 parallel=None):
        self.host, self.cfg = host, config
        self.parallel = parallel or SINGLE   # data parallel: a share of every batch per process
        self.images = list(images)
        self.caption_provider = caption_provider
        self.latent_cache_dir = latent_cache_dir
        self.on_preview = on_preview      # called with (step, PIL image) for every preview picture
        self.output_dir = output_dir
        self.checkpoint_dir = checkpoint_dir or os.path.join(output_dir, f"{config.name}_checkpoints")
        self.progress = progress
        self.cancel = cancel or CancelToken()
        self.dataset_name = dataset_name
        self.warnings = []

    # -- public -------------------------------------------------------------------------------
    def run(self, resume_from=None):
        cfg, host = self.cfg, self.host
        cfg.validate()
        if not self.images:
            raise ConfigError("images", "no training images were given")
        host.check_supported()
        require_optimizer(cfg.optimizer)
        if cfg.train_text_encoder and not host.supports_text_encoder_training:
            raise ConfigError("train_text_encoder", "this host cannot train the text encoder in its current "
                                                    "memory mode; train the UNet only")
        self.out_path = export.output_path(self.output_dir, cfg.name)
        export.check_can_write(self.out_path, cfg.overwrite)
        state = self._load_state(resume_from) if resume_from else None
        self.samples = trainset.build_samples(self.images, cfg, self.caption_provider)
        self.size_info = [trainset.crop_sample_info(smp) for smp in self.samples]  # SDXL size conditioning
        self.warnings += cap.trigger_warnings(cfg.trigger, getattr(host, "known_names", ()))
        self.precision = choose_precision(cfg.mixed_precision, host.device, host.base_dtype)
        self.started_at = state["started_at"] if state else time.time()
        t0 = time.perf_counter()
        fork_devices = [host.device] if host.device.type == "cuda" else []
        self._final = None
        with torch.random.fork_rng(devices=fork_devices), host.session(cfg.train_text_encoder), \
                PeakMemory(host.device) as self.memory:
            torch.manual_seed(cfg.seed)
            result = self._train(state)
        result.peak_memory_mb = self.memory.final_mb
        if self._final is not None and self.parallel.is_main:  # once the model is restored (a failed restore writes nothing)
            tensors, preview = self._final
            result.metadata = self._metadata(result.steps_done)
            try:  # a cancel (not stop-and-save) that comes during the final preview or save still keeps the old file
                result.path = export.write_lora(self.out_path, tensors, result.metadata, overwrite=cfg.overwrite,
                                                preview=preview, card=export.user_metadata(host, cfg),
                                                abort=lambda: self.cancel.requested and not self.cancel.save)
                result.num_keys = len(tensors)
            except export.SaveCancelled:
                result.status, result.metadata = "cancelled", {}
        result.seconds = time.perf_counter() - t0
        return result

    # -- internals ----------------------------------------------------------------------------
    def _cached_conds(self):
        host = self.host
        with torch.no_grad():
            return [host.encode_text([smp.caption], [info]) for smp, info in zip(self.samples, self.size_info)]

    def _train(self, state):
        cfg, host = self.cfg, self.host
        device = host.device
        g = torch.Generator().manual_seed(cfg.seed)
        self.cache = trainset.LatentCache(host, self.latent_cache_dir) if not cfg.random_crop else None
        if self.cache is not None:
            par = self.parallel
            # with a disk cache one process per machine encodes, the others read (same seed: same latents)
            turns = (True, False) if self.latent_cache_dir and par.world > 1 else (None,)
            for turn in turns:
                if turn is None or turn == par.is_local_main:
                    for i, smp in enumerate(self.samples):
                        if self.cancel.requested and par.world == 1:  # stopped while pictures are encoded
                            return TrainResult(status="cancelled", steps_done=0, loss_history=[], checkpoints=[],
                                               warnings=self.warnings)
                        for flip in ((False, True) if cfg.flip else (False,)):
                            self.cache.get(i, smp, flip)
                if turn is not None:
                    par.barrier()
            host.latents_cached()

        network = LoRANetwork(cfg.rank, cfg.alpha, cfg.dropout)
        components = [host.unet] + (list(host.text_encoders) if cfg.train_text_encoder else [])
        for comp in components:
            network.add_component(comp, cfg.targets, generator=g)
        network.to(device=device, dtype=torch.float32)
        self.network = network

        self.caption_opts = trainset.caption_options(cfg)
        static = cap.is_static(self.caption_opts) and not cfg.random_crop
        conds = self._cached_conds() if static and not cfg.train_text_encoder else None
        groups = [{"params": network.parameters_of(host.unet.name), "lr": cfg.learning_rate}]
        if cfg.train_text_encoder:
            te_params = [p for c in host.text_encoders for p in network.parameters_of(c.name)]
            groups.append({"params": te_params, "lr": cfg.text_encoder_lr})
        optimizer = make_optimizer(cfg.optimizer, groups, cfg.weight_decay, device)
        scheduler = make_scheduler(optimizer, cfg.scheduler, cfg.steps, cfg.warmup_steps, cfg.num_cycles)
        scaler = self.precision.make_scaler()
        sampler = trainset.BucketSampler(self.samples, cfg.batch_size, g)
        self.batches_per_epoch = sampler.batches_per_epoch()
        history, checkpoints, step = [], [], 0
        if state:
            network.load_state_dict(state["network"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            g.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], device)
            sampler.load_state_dict(state["sampler"])
            history, step = list(state["history"]), state["step"]

        alphas_cumprod = host.alphas_cumprod.float().to(device)
        input_dtype = torch.float32 if self.precision.autocast_dtype else host.base_dtype
        run = dict(network=network, optimizer=optimizer, scheduler=scheduler, scaler=scaler, generator=g,
                   sampler=sampler)
        trainable = [p for grp in groups for p in grp["params"]]
        loss_sum, loss_n = torch.zeros((), device=device), 0
        t_start, steps_this_run = time.perf_counter(), 0
        status = "done"
        ckpt_modules = [c.module for c in components]
        network.train()
        with gradient_checkpointing(ckpt_modules, cfg.gradient_checkpointing):
            network.attach()
            try:
                while step < cfg.steps:
                    if self.parallel.any(self.cancel.requested):
                        status = "stopped" if self.cancel.save or not self.cancel.requested else "cancelled"
                        break
                    for _ in range(cfg.grad_accum):
                        idx = sampler.next()
                        loss = self._step_loss(idx, conds, alphas_cumprod, input_dtype, g)
                        if loss is not None:  # None: this process has no share of this batch
                            loss = loss / cfg.grad_accum
                            (scaler.scale(loss) if scaler else loss).backward()
                            loss_sum += loss.detach()
                    if self.parallel.world > 1:
                        self._sum_gradients(trainable)
                    if scaler:
                        scaler.unscale_(optimizer)
                    if cfg.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm, foreach=True)
                    if scaler:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    step += 1
                    steps_this_run += 1
                    loss_n += 1
                    if loss_n >= cfg.log_every or step == cfg.steps or step == 1:
                        value = (self.parallel.sum(loss_sum) / loss_n).item()
                        if not math.isfinite(value):
                            raise CharLoraError(f"the loss became {value} at step {step}; lower the learning rate "
                                                "or use fp32/bf16 precision")
                        history.append((step, value))
                        loss_sum.zero_()
                        loss_n = 0
                    if self.progress:
                        elapsed = time.perf_counter() - t_start
                        eta = elapsed / steps_this_run * (cfg.steps - step)
                        self.progress(Progress(step, cfg.steps, history[-1][1] if history else None,
                                               optimizer.param_groups[0]["lr"], elapsed, eta,
                                               self.memory.peak_mb()))
                    main = self.parallel.is_main  # one process writes files and draws previews
                    if main and cfg.preview_every and step % cfg.preview_every == 0 and step < cfg.steps:
                        image = self._sample()
                        if image is not None and self.on_preview:
                            self.on_preview(step, image)
                    if main and cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                        checkpoints.append(self._save_checkpoint(step, history, run))
                preview = self._preview() if status != "cancelled" and self.parallel.is_main else None
            finally:
                network.detach()
        result = TrainResult(status=status, steps_done=step, loss_history=history, checkpoints=checkpoints,
                             warnings=self.warnings)
        if status == "cancelled" or step == 0:
            result.status = "cancelled"
            return result
        self._final = (network.kohya_state_dict(self._save_dtype()), preview)
        return result

    def _sum_gradients(self, params):
        """Every process's gradients summed (a process without a share of the batch adds zeros)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.parallel.sum(torch.cat([gr.reshape(-1) for gr in grads]))
        offset = 0
        for p, gr in zip(params, grads):
            p.grad = flat[offset:offset + gr.numel()].view_as(gr).clone()
            offset += gr.numel()

    def _step_loss(self, idx, conds, alphas_cumprod, input_dtype, g):
        """The loss of this process's share of the batch ``idx``, as a part of the whole batch's mean
        (random numbers are drawn for the whole batch, so every process draws the same ones)."""
        cfg, host = self.cfg, self.host
        device = host.device
        flips = (torch.rand(len(idx), generator=g) < 0.5).tolist() if cfg.flip else [False] * len(idx)
        if self.cache is not None:
            x0 = torch.stack([self.cache.get(i, self.samples[i], f) for i, f in zip(idx, flips)])
            infos = [self.size_info[i] for i in idx]
        else:  # random crop: a new crop every step, encoded now
            crops = [trainset.crop_sample(self.samples[i], f, True, g) for i, f in zip(idx, flips)]
            with torch.no_grad():
                x0 = host.encode_images(torch.stack([c[0] for c in crops]).to(device)).float().cpu()
            infos = [c[1] for c in crops]
        noise = torch.randn(x0.shape, generator=g)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((x0.shape[0], x0.shape[1], 1, 1), generator=g)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
        captions = None if conds is not None else [cap.render(self.samples[i].caption, self.caption_opts, g)
                                                   for i in idx]
        share = self.parallel.positions(len(idx))
        if not share:
            return None
        if len(share) < len(idx):
            x0, noise, t, infos = x0[share], noise[share], t[share], [infos[j] for j in share]
            captions = None if captions is None else [captions[j] for j in share]
        full, idx = len(idx), [idx[j] for j in share]
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        a = alphas_cumprod[t]
        noisy = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
        with self.precision.autocast():
            if conds is not None:
                cond = {k: torch.cat([conds[i][k] for i in idx]) for k in conds[idx[0]]}
            elif cfg.train_text_encoder:
                cond = host.encode_text(captions, infos)
            else:
                with torch.no_grad():
                    cond = host.encode_text(captions, infos)
            pred = host.predict(noisy.to(input_dtype), t, cond)
        return diffusion_loss(pred, x0, noise, a, host.prediction, cfg.min_snr_gamma) * (len(idx) / full)

    def _sample(self):
        """A picture from the host's sampler with the LoRA active, or None. The sampler seeds the
        global RNG; ours (LoRA dropout) is saved and restored so previews never change the result."""
        cfg, host = self.cfg, self.host
        devices = [host.device] if host.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                self.network.eval()
                return host.sample(cfg.trigger or cfg.name, cfg.seed, cfg.resolution, cfg.resolution)
        except Exception as e:  # a failed preview must not cost the training
            self.warnings.append(f"a preview picture could not be made ({type(e).__name__}: {e})")
            return None
        finally:
            self.network.train()

    def _preview(self):
        image = self._sample()
        if image is None:  # no sampler (or it failed): the first training picture is the card picture
            image = self.samples[0].image.copy()
            image.thumbnail((512, 512))
        return image

    def _save_dtype(self):
        return torch.float16 if self.cfg.save_dtype == "fp16" else torch.float32

    def _metadata(self, step):
        cfg = self.cfg
        opt = f"{cfg.optimizer}(weight_decay={cfg.weight_decay})"
        return export.build_metadata(self.host, cfg, steps_done=step, batches_per_epoch=self.batches_per_epoch,
                                     num_images=sum(smp.repeats for smp in self.samples),
                                     captions=[c for smp in self.samples for c in [smp.caption] * smp.repeats],
                                     buckets=trainset.bucket_counts(self.samples),
                                     folders=self._folders(),
                                     started_at=self.started_at, precision_mode=self.precision.mode,
                                     optimizer_desc=opt, dataset_name=self.dataset_name)

    def _folders(self):
        """kohya's ss_dataset_dirs: picture count and repeats per source folder."""
        out = {}
        for smp in self.samples:
            folder = smp.name.rsplit("/", 1)[0] if "/" in smp.name else self.dataset_name
            entry = out.setdefault(folder, {"n_repeats": smp.repeats, "img_count": 0})
            entry["img_count"] += 1
        return out

    # -- checkpoints ----------------------------------------------------------------------------
    def _save_checkpoint(self, step, history, run):
        cfg = self.cfg
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        stem = os.path.join(self.checkpoint_dir, f"{cfg.name}-step{step:06d}")
        device = self.host.device
        state = {
            "version": STATE_VERSION, "fingerprint": cfg.fingerprint(), "num_images": len(self.images),
            "step": step, "started_at": self.started_at, "history": list(history),
            "network": run["network"].state_dict(), "optimizer": run["optimizer"].state_dict(),
            "scheduler": run["scheduler"].state_dict(),
            "scaler": run["scaler"].state_dict() if run["scaler"] is not None else None,
            "generator": run["generator"].get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "sampler": run["sampler"].state_dict(),
        }
        tmp = stem + ".state.tmp"
        try:
            statefile.save(tmp, state, STATE_VERSION)   # safetensors + JSON: resuming never unpickles
            os.replace(tmp, stem + ".state")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        tensors = run["network"].kohya_state_dict(self._save_dtype())
        export.write_lora(stem + ".safetensors", tensors, self._metadata(step), overwrite=True)
        return stem + ".state"

    def _load_state(self, path):
        if not os.path.isfile(path):
            raise ConfigError("resume_from", f"checkpoint state {path} does not exist")
        state = statefile.load(path, STATE_VERSION, "resume_from")  # refuses old (pickled) and foreign files
        missing = [k for k in ("version", "fingerprint", "num_images", "step", "started_at", "history", "network",
                               "optimizer", "scheduler", "generator", "torch_rng", "sampler") if k not in state]
        if missing or state["version"] != STATE_VERSION or not isinstance(state["fingerprint"], dict):
            why = f" (no {', '.join(missing)})" if missing else ""
            raise ConfigError("resume_from", f"{path} is not a complete Character LoRA training state of state "
                                             f"version {STATE_VERSION}{why}")
        mine = self.cfg.fingerprint()
        diff = sorted(k for k in mine if state["fingerprint"].get(k) != mine[k])
        if diff:
            raise ConfigError("resume_from", "the checkpoint was made with different settings: " + ", ".join(
                f"{k} {state['fingerprint'].get(k)!r} -> {mine[k]!r}" for k in diff))
        if state["num_images"] != len(self.images):
            raise ConfigError("resume_from", f"the checkpoint was made with {state['num_images']} images, "
                                             f"now there are {len(self.images)}")
        return state
