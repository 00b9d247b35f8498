"""Writing the LoRA file: kohya tensors, ``ss_*`` + ``modelspec.*`` metadata, sidecars, atomically.

The ``sshs_model_hash`` we write is A1111's "addnet" hash (sha256 of the file bytes after the
8-byte length and the JSON header). Only tensor bytes enter it, so we serialise once, hash the data
region, and put the hash into the header of that same byte stream.
"""
import errno
import hashlib
import json
import os
import time
import uuid

import safetensors.torch

from .captions import tag_frequency
from .errors import CharLoraError, OutputExistsError

SD_VERSION = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
_ARCH_SPEC = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}


class DiskFullError(CharLoraError, OSError):
    """The disk filled up while a file was written (nothing partial was left)."""


class SaveCancelled(Exception):
    """``write_lora``'s ``abort`` asked to keep the old files: nothing new was moved into place."""


def output_path(output_dir, name):
    return os.path.join(output_dir, f"{name}.safetensors")


def check_can_write(path, overwrite):
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another name or allow overwriting")


def base_model_version(arch, prediction):
    if arch == "sdxl":
        return "sdxl_base_v1-0"
    if arch == "sd2":
        return "sd_v2_v" if prediction == "v" else "sd_v2"
    return "sd_v1"




def build_metadata(host, cfg, *, steps_done, batches_per_epoch, num_images, captions, started_at,
                   precision_mode, optimizer_desc, session_id=None, dataset_name="images", buckets=None,
                   folders=None):
    """All values are strings, as safetensors requires and kohya writes."""
    epochs = max(1, -(-cfg.steps * cfg.grad_accum // max(1, batches_per_epoch)))
    epoch = min(epochs, -(-steps_done * cfg.grad_accum // max(1, batches_per_epoch)))
    res = cfg.resolution
    arch = host.arch
    arch_spec = _ARCH_SPEC[arch]
    if arch == "sd2" and host.prediction == "v":
        arch_spec = "stable-diffusion-v2-768-v"
    md = {
        "ss_session_id": str(session_id or uuid.uuid4().int % 2**31),
        "ss_training_started_at": repr(float(started_at)),
        "ss_training_finished_at": repr(float(time.time())),
        "ss_output_name": cfg.name,
        "ss_training_comment": cfg.comment,
        "ss_base_model_version": base_model_version(arch, host.prediction),
        "ss_v2": str(arch == "sd2"),
        "ss_v_parameterization": str(host.prediction == "v"),
        "ss_sd_model_name": host.model_name or "",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(float(cfg.alpha)),
        "ss_network_dropout": str(cfg.dropout),
        "ss_network_args": json.dumps({"targets": cfg.targets}),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.learning_rate),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr if cfg.train_text_encoder else 0.0),
        "ss_network_train_unet_only": str(not cfg.train_text_encoder),
        "ss_optimizer": optimizer_desc,
        "ss_lr_scheduler": cfg.scheduler,
        "ss_lr_warmup_steps": str(cfg.warmup_steps),
        "ss_lr_scheduler_num_cycles": str(cfg.num_cycles),
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_max_train_steps": str(cfg.steps),
        "ss_steps": str(steps_done),
        "ss_epoch": str(epoch),
        "ss_num_epochs": str(epochs),
        "ss_num_train_images": str(num_images),
        "ss_num_reg_images": "0",
        "ss_num_batches_per_epoch": str(batches_per_epoch),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_total_batch_size": str(cfg.batch_size * cfg.grad_accum),
        "ss_gradient_accumulation_steps": str(cfg.grad_accum),
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_mixed_precision": precision_mode,
        "ss_full_fp16": "False",
        "ss_cache_latents": "True",
        "ss_seed": str(cfg.seed),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_clip_skip": str(host.clip_skip),
        "ss_resolution": f"({res}, {res})",
        "ss_flip_aug": str(cfg.flip),
        "ss_color_aug": "False",
        "ss_random_crop": str(cfg.random_crop),
        "ss_enable_bucket": str(cfg.buckets),
        "ss_bucket_no_upscale": str(cfg.bucket_no_upscale),
        "ss_shuffle_caption": str(cfg.shuffle_tags),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_caption_dropout_rate": str(cfg.caption_dropout),
        "ss_caption_tag_dropout_rate": str(cfg.tag_dropout),
        "ss_prior_loss_weight": "1.0",
        "ss_tag_frequency": json.dumps({dataset_name: tag_frequency(captions)}),
        "ss_dataset_dirs": json.dumps(folders or {dataset_name: {"n_repeats": 1, "img_count": num_images}}),
        "ss_bucket_info": json.dumps({"buckets": {str(i): {"resolution": list(b), "count": n} for i, (b, n) in
                                                  enumerate(sorted((buckets or {(res, res): num_images}).items()))}}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch_spec}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if arch == "sdxl" else "diffusers",
        "modelspec.title": cfg.name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started_at)),
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if host.prediction == "v" else "epsilon",
    }
    if cfg.buckets:
        from .trainset import bucket_limits
        lo, hi = bucket_limits(cfg)
        md["ss_min_bucket_reso"], md["ss_max_bucket_reso"] = str(lo), str(hi)
    if cfg.trigger:
        md["modelspec.trigger_phrase"] = cfg.trigger
    if host.model_hash:
        md["ss_sd_model_hash"] = host.model_hash
    if host.model_sha256:
        md["ss_new_sd_model_hash"] = host.model_sha256
    for k, v in cfg.extra_metadata.items():
        md[str(k)] = str(v)
    return md


def user_metadata(host, cfg):
    """``<stem>.json`` as A1111's / Forge's Lora card editor writes it."""
    return {"description": f"Character LoRA for '{cfg.trigger or cfg.name}'",
            "sd version": SD_VERSION[host.arch], "activation text": cfg.trigger,
            "preferred weight": 1, "negative text": "", "notes": ""}


def serialize_with_hash(tensors, metadata):
    """safetensors bytes with ``sshs_model_hash`` = sha256 of the data region."""
    data = safetensors.torch.save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    body = memoryview(data)[8 + n:]
    header["__metadata__"]["sshs_model_hash"] = hashlib.sha256(body).hexdigest()
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    return [len(hb).to_bytes(8, "little"), hb, body]


def addnet_hash(path):
    """A1111's ``hashes.addnet_hash_safetensors`` of a file (for tests and checks)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        return hashlib.sha256(f.read()).hexdigest()


def _write_file(path, chunks):
    with open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def write_lora(path, tensors, metadata, *, overwrite=False, preview=None, card=None, abort=None):
    """Write ``path`` (+ ``<stem>.preview.png`` and ``<stem>.json``) atomically.

    Everything goes to ``*.tmp`` files first; the sidecars are moved into place before the
    ``.safetensors`` itself, so the Lora list never sees a model without its card. On any error
    the temporary files are removed and nothing of the new output remains (a full disk raises
    ``DiskFullError`` saying so). ``abort()``, asked once everything is written and before anything
    is moved into place, can still cancel the save: ``SaveCancelled``, the old files untouched.
    """
    check_can_write(path, overwrite)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    stem = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
    plan = [(path + ".tmp", path)]
    if preview is not None:
        plan.insert(0, (stem + ".preview.png.tmp", stem + ".preview.png"))
    if card is not None:
        plan.insert(0, (stem + ".json.tmp", stem + ".json"))
    try:
        _write_file(path + ".tmp", serialize_with_hash(tensors, metadata))
        if preview is not None:
            with open(stem + ".preview.png.tmp", "wb") as f:
                preview.save(f, format="PNG")
        if card is not None:
            _write_file(stem + ".json.tmp", [json.dumps(card, indent=2).encode("utf-8")])
        if abort is not None and abort():
            raise SaveCancelled(path)
        check_can_write(path, overwrite)
        for tmp, final in plan:
            os.replace(tmp, final)
    except OSError as e:
        if e.errno != errno.ENOSPC or isinstance(e, DiskFullError):
            raise
        full = DiskFullError(f"the disk is full: {os.path.basename(path)} could not be written to "
                             f"{os.path.dirname(path) or '.'} ({e.strerror or e}); free some space and try "
                             "again (the previous file of that name, if any, is unchanged)")
        full.errno = e.errno  # (strerror stays unset: str() is the message above)
        raise full from e
    finally:
        for tmp, _ in plan:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


def _metadata(path):
    with safetensors.safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


def promote(lora_dir, name, checkpoint_path, strength=1.0, note=""):
    """Make a checkpoint of LoRA ``name`` its ``<name>.safetensors``, atomically; -> the new metadata.

    The trained final file is first copied to ``<name>_checkpoints/<name>-final.safetensors`` (once: a
    later promote keeps that copy, and promoting it restores the trained file); then the
    checkpoint's tensors and metadata (plus where it came from and why) replace the final file through a
    temporary file, and the card's preferred weight becomes ``strength``. Whenever it stops, the final
    file is either the old one or the new one, never a part.
    """
    final = output_path(lora_dir, name)
    tensors = safetensors.torch.load_file(checkpoint_path)
    metadata = _metadata(checkpoint_path)
    metadata.pop("sshs_model_hash", None)  # recomputed for the new file
    metadata["charlora_promoted_from"] = os.path.basename(checkpoint_path)
    if note:
        metadata["charlora_pick"] = note
    keep = os.path.join(lora_dir, f"{name}_checkpoints", f"{name}-final.safetensors")
    with_promoted = os.path.isfile(final) and "charlora_promoted_from" in _metadata(final)
    if os.path.isfile(final) and not (with_promoted and os.path.isfile(keep)):  # the trained file is kept once
        os.makedirs(os.path.dirname(keep), exist_ok=True)
        try:
            with open(final, "rb") as f:
                _write_file(keep + ".tmp", [f.read()])
            os.replace(keep + ".tmp", keep)
        finally:
            if os.path.exists(keep + ".tmp"):
                os.remove(keep + ".tmp")
    card_path = final[:-len(".safetensors")] + ".json"
    card = {}
    if os.path.isfile(card_path):
        try:
            with open(card_path, encoding="utf-8") as f:
                card = json.load(f)
        except (OSError, ValueError):
            card = {}
    card["preferred weight"] = strength
    write_lora(final, tensors, metadata, overwrite=True, card=card)
    return metadata
