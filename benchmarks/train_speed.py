"""Training step time and memory of the engine against a minimal reference loop, side by side in one run.

Variants, on random-weight models of one size, the same pictures, precision, rank, targets and optimizer
settings, repeated in interleaved rounds (the machine's drift hits every variant alike):

  ours       the engine (``Trainer``) through the standalone host on a diffusers UNet
  reference  a minimal loop written the standard way: the same diffusers UNet (a copy) with peft's
             ``LoraConfig`` on the same target modules, cached latents and text embeddings, AdamW,
             min-SNR weighting and gradient clipping as the engine's defaults
  a1111      the engine through the A1111 adapter on an ldm UNet of the same size (the test double of
             A1111's loaded model, with scaled-dot-product attention as the WebUI's "sdp" option uses)

Per step: wall time between steps (the device synchronised at each step in every variant), first step
of every run left out. Memory: peak above what was in use when the variant started (CUDA: allocated
memory; CPU: resident memory, sampled). Text encoders keep their real widths but 2 layers and the VAE
is the tiny one: both are frozen and used once for caching, so they do not change a step.

    .venv/bin/python benchmarks/train_speed.py --size tiny --steps 20 --json out.json
    .venv/bin/python benchmarks/train_speed.py --size full --resolution 256 --steps 4      # CPU, minutes
    python benchmarks/train_speed.py --size full --arch sdxl --resolution 1024 --device cuda --precision bf16
"""
import argparse
import copy
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VARIANTS = ("ours", "reference", "a1111")


# -- models ----------------------------------------------------------------------------------------
def diffusers_unet(arch, size):
    from diffusers import UNet2DConditionModel
    from lib_charlora.tiny import tiny_diffusers_unet
    if size == "tiny":
        return tiny_diffusers_unet("sdxl" if arch == "sdxl" else "sd1")
    if arch == "sdxl":  # SDXL base's UNet config
        return UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD1.5's UNet config


def sdp_attention(unet):
    """ldm's CrossAttention with torch's scaled_dot_product_attention (what the WebUI's "sdp" option does)."""
    from ldm.modules.attention import CrossAttention

    def make(attn):
        def forward(x, context=None, mask=None):
            context = x if context is None else context
            q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
            b, n, inner = q.shape
            q, k, v = (t.reshape(b, -1, attn.heads, inner // attn.heads).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v)
            return attn.to_out(out.transpose(1, 2).reshape(b, n, inner))
        return forward
    for m in unet.modules():
        if isinstance(m, CrossAttention):
            m.forward = make(m)


class Standalone:
    """The standalone host without preview pictures (the card picture is then a training picture)."""

    @staticmethod
    def make(arch, size, device, dtype):
        from lib_charlora.hosts.standalone import DiffusersHost
        from lib_charlora.tiny import tiny_text_encoder, tiny_tokenizer, tiny_vae

        class Host(DiffusersHost):
            def sample(self, *args, **kwargs):
                return None
        torch.manual_seed(0)
        tok = tiny_tokenizer()
        if size == "tiny":
            widths = [(32, None), (32, 32)] if arch == "sdxl" else [(32, None)]
        else:
            widths = [(768, None), (1280, 1280)] if arch == "sdxl" else [(768, None)]
        tes = [(tiny_text_encoder(tok, w, projection=p), tok) for w, p in widths]
        host = Host(diffusers_unet(arch, size), tiny_vae(), tes, arch="sdxl" if arch == "sdxl" else "sd1",
                    device=device)
        for m in host.all_modules():
            m.to(device, dtype)
        return host


def a1111_host(arch, size, device, dtype):
    """The A1111 adapter over the test double of A1111's loaded model (tiny SD1.5 / SDXL, full SD1.5)."""
    from lib_charlora.hosts.a1111 import A1111Host
    from tests.a1111_double import make_sd_model
    from tests.checkpoint_files import ldm_unet
    if size == "full":
        model = make_sd_model("sd1", unet=ldm_unet("sd1", "full"), text_width=768)
    else:
        model = make_sd_model("sdxl" if arch == "sdxl" else "sd1")
    sdp_attention(model.model.diffusion_model)
    model.to(device, dtype)
    ns = types.SimpleNamespace
    return A1111Host(model, ns(lowvram=False, medvram=False, medvram_sdxl=False),
                     ns(CLIP_stop_at_last_layers=1, fp8_storage="Disable"), ns(device=device, fp8=False))


def pictures(n, resolution):
    from PIL import Image
    from lib_charlora.engine import TrainImage
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        small = (torch.rand(3, 8, 8, generator=g) * 255).byte().permute(1, 2, 0).numpy()
        out.append(TrainImage(Image.fromarray(small).resize((resolution, resolution), Image.BICUBIC), "photo of benchchr"))
    return out


# -- the variants -----------------------------------------------------------------------------------
class Clock:
    def __init__(self, device):
        self.device, self.stamps = device, []

    def tick(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def steps(self):
        """Seconds of each step after the first."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def config(args, precision):
    from lib_charlora.engine import TrainConfig
    return TrainConfig(name="bench", trigger="benchchr", steps=args.steps, rank=args.rank, alpha=args.rank / 2,
                       resolution=args.resolution, batch_size=args.batch_size, learning_rate=1e-4,
                       mixed_precision=precision, gradient_checkpointing=args.gradient_checkpointing,
                       flip=False, overwrite=True, log_every=10)


def run_engine(host, args, precision, images, out_dir):
    from lib_charlora.engine import Trainer
    clock = Clock(host.device)
    trainer = Trainer(host, config(args, precision), images, out_dir, progress=lambda p: clock.tick())
    trainer.run()
    return clock.steps()


def prepare_reference(host, args, images):
    """The reference's own copy of the UNet with peft's LoRA layers on the engine's targets (made once,
    before any measurement: it is the reference's loaded model), its cached latents and text embeddings."""
    import numpy as np
    from peft import LoraConfig, inject_adapter_in_model
    from lib_charlora.engine import find_targets
    targets = [path for path, _ in find_targets(host.unet.module, "unet")]
    unet = copy.deepcopy(host.unet.module).requires_grad_(False)
    config = LoraConfig(r=args.rank, lora_alpha=args.rank / 2, target_modules=targets, lora_dropout=0.0)
    with torch.no_grad():
        pixels = torch.stack([torch.from_numpy(np.array(im.image)).permute(2, 0, 1) for im in images]).float() / 127.5 - 1
        r = args.resolution
        return {"host": host, "unet": inject_adapter_in_model(config, unet),
                "latents": torch.cat([host.encode_images(pixels[i:i + 1]).float() for i in range(len(images))]),
                "cond": host.encode_text([im.caption for im in images], [(r, r, 0, 0, r, r)] * len(images))}


def run_reference(state, args, precision, images):
    """diffusers UNet + peft LoRA on the same targets, cached latents / embeddings, AdamW."""
    from lib_charlora.engine.optim import choose_precision
    host = state["host"]
    device = host.device
    unet = state["unet"]  # LoRA weights re-initialised for every run
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    with torch.no_grad():
        torch.manual_seed(0)
        for n, p in unet.named_parameters():
            if "lora_A" in n:
                torch.nn.init.kaiming_uniform_(p, a=5 ** 0.5)
            elif "lora_B" in n:
                p.zero_()
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    prec = choose_precision(precision, device, next(unet.parameters()).dtype)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    scaler = prec.make_scaler()
    alphas = host.alphas_cumprod.to(device)
    latents, cond = state["latents"].to(device), {k: v.to(device) for k, v in state["cond"].items()}
    g = torch.Generator().manual_seed(0)
    clock, loss_sum = Clock(device), torch.zeros((), device=device)
    base_dtype = next(p for n, p in unet.named_parameters() if "lora_" not in n).dtype
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(images), (args.batch_size,), generator=g)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, 1000, (len(idx),), generator=g).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with prec.autocast():
            added = None
            if host.arch == "sdxl":
                added = {"text_embeds": cond["pooled"][idx.to(device)], "time_ids": cond["time_ids"][idx.to(device)]}
            pred = unet(noisy.to(base_dtype if prec.autocast_dtype is None else torch.float32), t,
                        encoder_hidden_states=cond["context"][idx.to(device)], added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        snr = alphas[t] / (1 - alphas[t])
        loss = (loss * torch.clamp(snr, max=5.0) / snr).mean()  # min-SNR-gamma 5 (the engine's default)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        if step % 10 == 0 or step in (1, args.steps):
            loss_sum.item()
            loss_sum.zero_()
        clock.tick()
    return clock.steps()


# -- measuring ---------------------------------------------------------------------------------------
def trim_heap():
    """Hand memory freed by the previous variant back to the OS, so the next one's resident peak is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn, device):
    from lib_charlora.engine.memory import PeakMemory
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    trim_heap()
    try:
        with PeakMemory(device) as mem:
            steps = fn()
        return steps, mem.final_mb, None
    except torch.cuda.OutOfMemoryError as e:
        return [], None, f"does not fit ({str(e).splitlines()[0][:120]})"
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            return [], None, f"does not fit ({str(e).splitlines()[0][:120]})"
        raise


def summary(seconds, memory, error, batch):
    if error or not seconds:
        return {"error": error or "no step was timed (use --steps 2 or more)"}
    ms = sorted(s * 1000 for s in seconds)
    med = statistics.median(ms)
    return {"ms_per_step": {"median": round(med, 2), "min": round(ms[0], 2), "max": round(ms[-1], 2)},
            "steps_per_s": round(1000 / med, 3), "samples_per_s": round(1000 * batch / med, 3),
            "timed_steps": len(ms), "peak_memory_mb": None if memory is None else round(max(memory), 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--size", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--resolution", type=int, default=None, help="default: 64 tiny, 512 SD1.5, 1024 SDXL")
    ap.add_argument("--steps", type=int, default=20, help="steps per run (the first is not timed)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every variant")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--precision", choices=("auto", "no", "fp16", "bf16"), default="auto",
                    help="auto: fp32 on the CPU, fp16 autocast on an fp16 model on CUDA")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        ap.error(f"--variants: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(VARIANTS)}")
    if args.steps < 2:
        ap.error("--steps must be 2 or more (the first step of a run is not timed)")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu":
            print("No CUDA device here: measuring on the CPU.", flush=True)
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: this torch build sees no CUDA device; run without --device for the CPU figures")
    device = torch.device(args.device)
    args.resolution = args.resolution or (64 if args.size == "tiny" else 1024 if args.arch == "sdxl" else 512)
    precision = args.precision
    if precision == "auto":
        precision = "no" if device.type == "cpu" else "fp16"
    if precision == "fp16" and device.type == "cpu":
        ap.error("--precision fp16 needs CUDA; use bf16 or no on the CPU")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    notes = []
    if "a1111" in variants and args.arch == "sdxl" and args.size == "full":
        variants.remove("a1111")
        notes.append("a1111 left out: the ldm package here has no per-level transformer depth (SDXL's UNet)")

    t0 = time.perf_counter()
    host = Standalone.make(args.arch, args.size, device, dtype)
    hosts = {"ours": host}
    if "a1111" in variants:
        hosts["a1111"] = a1111_host(args.arch, args.size, device, dtype)
    images = pictures(4, args.resolution)
    ref_state = prepare_reference(host, args, images) if "reference" in variants else None
    params = sum(p.numel() for p in host.unet.module.parameters()) / 1e6
    print(f"{args.arch} {args.size} UNet ({params:.0f} M parameters), {args.resolution} px, batch {args.batch_size}, "
          f"rank {args.rank}, {precision} on {device}; built in {time.perf_counter() - t0:.0f} s", flush=True)

    times = {v: [] for v in variants}
    memory = {v: [] for v in variants}
    errors = {}
    with tempfile.TemporaryDirectory(prefix="charlora-bench-") as out_dir:
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                if v in errors:
                    continue
                if v == "reference":
                    fn = lambda: run_reference(ref_state, args, precision, images)  # noqa: E731
                else:
                    fn = lambda h=hosts[v]: run_engine(h, args, precision, images, out_dir)  # noqa: E731
                steps, mem, error = measure(fn, device)
                if error:
                    errors[v] = f"{error} at batch {args.batch_size}"
                    continue
                times[v] += steps
                if mem is not None:
                    memory[v].append(mem)
                med = statistics.median(steps) * 1000 if steps else float("nan")
                print(f"  round {r + 1} {v:9s} {med:9.1f} ms/step (median of {len(steps)})", flush=True)

    results = {v: summary(times[v], memory[v], errors.get(v), args.batch_size) for v in variants}
    ratio = lambda a, b: (round(results[a]["ms_per_step"]["median"] / results[b]["ms_per_step"]["median"], 3)  # noqa: E731
                          if a in results and b in results and "ms_per_step" in results[a]
                          and "ms_per_step" in results[b] else None)
    report = {
        "arch": args.arch, "size": args.size, "resolution": args.resolution, "batch_size": args.batch_size,
        "rank": args.rank, "steps": args.steps, "rounds": args.rounds, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "precision": precision, "torch": torch.__version__,
        "commit": _commit(), "gradient_checkpointing": args.gradient_checkpointing,
        "unet_parameters_m": round(params, 1), "variants": results,
        "ratio_vs_reference": ratio("ours", "reference"),
        "ratio_a1111_vs_reference": ratio("a1111", "reference"),
        "peak_memory_mb": results.get("ours", {}).get("peak_memory_mb"),
        "memory_kind": "CUDA allocated" if device.type == "cuda" else "resident (RSS)", "notes": notes,
    }
    print(f"\n{'variant':10s} {'ms/step median':>15s} {'min':>9s} {'max':>9s} {'steps/s':>9s} {'peak MB':>9s}")
    for v, res in results.items():
        if "error" in res:
            print(f"{v:10s} {res['error']}")
            continue
        ms = res["ms_per_step"]
        mem = "-" if res["peak_memory_mb"] is None else f"{res['peak_memory_mb']:.0f}"
        print(f"{v:10s} {ms['median']:15.1f} {ms['min']:9.1f} {ms['max']:9.1f} {res['steps_per_s']:9.3f} {mem:>9s}")
    if report["ratio_vs_reference"] is not None:
        print(f"ours / reference (ms per step): {report['ratio_vs_reference']:.3f}  (target <= 0.95)")
    if report["ratio_a1111_vs_reference"] is not None:
        print(f"a1111 / reference (ms per step): {report['ratio_a1111_vs_reference']:.3f}")
    print(f"peak memory above the loaded model: {report['memory_kind']}")
    for n in notes:
        print("note:", n)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return report


def _commit():
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    main()
