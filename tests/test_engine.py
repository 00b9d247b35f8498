"""The trainer's contract: bad input refused before anything happens, the model restored in every
outcome, progress / cancel / checkpoints / resume, schedules, checkpointing, precision."""
import math
import os
import sys

import pytest
import torch

from lib_charlora.engine import (CancelToken, ConfigError, LoRANetwork, MissingPackageError, TrainConfig, Trainer,
                                 UnsupportedModelError)
from lib_charlora.engine.checkpointing import gradient_checkpointing
from lib_charlora.engine.optim import choose_precision, lr_lambda
from lib_charlora.hosts.standalone import DiffusersHost
from lib_charlora.tiny import tiny_host, tiny_text_encoder, tiny_tokenizer, tiny_vae
from tests.conftest import assert_unchanged, snapshot, warm


@pytest.fixture(scope="module")
def host():
    return warm(tiny_host("ldm", "sd1", seed=0))


def _cfg(**kw):
    base = dict(name="t", trigger="sks", steps=4, rank=4, alpha=4, resolution=64, learning_rate=1e-3, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def _lora_weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}


# -- bad input ------------------------------------------------------------------------------------

BAD = [("steps", 0), ("steps", 2.5), ("rank", 0), ("rank", "8"), ("alpha", 0), ("alpha", float("nan")),
       ("learning_rate", 0), ("learning_rate", -1e-4), ("batch_size", 0), ("batch_size", True),
       ("optimizer", "sgd"), ("scheduler", "linear"), ("resolution", 500), ("resolution", 32),
       ("warmup_steps", 4), ("dropout", 0.95), ("targets", "everything"), ("mixed_precision", "fp8"),
       ("save_dtype", "int8"), ("trigger", "two\nlines"), ("train_text_encoder", "yes")]
BAD_NAMES = ["", "a/b", "a\\b", "..", "x..y", "con", "NUL.v2", "név", "a b", "what?", "x" * 65, ".hidden", "end."]


@pytest.mark.parametrize("field,value", BAD)
def test_bad_setting_names_the_field(host, images, tmp_path, field, value):
    before = snapshot(*host.all_modules())
    cfg = _cfg(**{field: value})
    with pytest.raises(ConfigError) as e:
        Trainer(host, cfg, images, str(tmp_path)).run()
    assert e.value.field == field and field in str(e.value)
    assert os.listdir(tmp_path) == []
    assert_unchanged(before, *host.all_modules())


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_name(host, images, tmp_path, name):
    with pytest.raises(ConfigError) as e:
        Trainer(host, _cfg(name=name), images, str(tmp_path)).run()
    assert e.value.field == "name"
    assert os.listdir(tmp_path) == []


def test_good_names():
    for name in ("pip", "Pip_v2.1", "a-b", "x" * 64, "console"):
        TrainConfig(name=name).validate()


def test_no_images(host, tmp_path):
    with pytest.raises(ConfigError, match="images"):
        Trainer(host, _cfg(), [], str(tmp_path)).run()


def test_missing_optimizer_package(host, images, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # makes "import prodigyopt" fail
    before = snapshot(*host.all_modules())
    with pytest.raises(MissingPackageError, match="prodigyopt"):
        Trainer(host, _cfg(optimizer="prodigy"), images, str(tmp_path)).run()
    assert os.listdir(tmp_path) == []
    assert_unchanged(before, *host.all_modules())


def _inpaint_host():
    from diffusers import UNet2DConditionModel
    tok = tiny_tokenizer()
    unet = UNet2DConditionModel(sample_size=8, in_channels=9, out_channels=4, block_out_channels=(32, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    return DiffusersHost(unet, tiny_vae(), [(tiny_text_encoder(tok), tok)])


def test_unsupported_models(images, tmp_path):
    with pytest.raises(UnsupportedModelError, match="inpainting"):
        Trainer(_inpaint_host(), _cfg(), images, str(tmp_path)).run()
    h = tiny_host("diffusers", "sdxl")
    with pytest.raises(UnsupportedModelError, match="refiner"):
        DiffusersHost(h.unet.module, h.vae, [(h.text_encoders[1].module, h._tokenizers[1])], arch="sdxl")
    fp8 = tiny_host("diffusers", "sd1")
    fp8.unet.module.to(torch.float8_e4m3fn)
    before = snapshot(*fp8.all_modules())
    with pytest.raises(UnsupportedModelError, match="fp8"):
        Trainer(fp8, _cfg(), images, str(tmp_path)).run()
    assert_unchanged(before, *fp8.all_modules())
    assert os.listdir(tmp_path) == []


def test_fp16_on_cpu_is_refused_and_auto_picks(host):
    with pytest.raises(ConfigError, match="mixed_precision"):
        choose_precision("fp16", torch.device("cpu"), torch.float32)
    assert choose_precision("auto", torch.device("cpu"), torch.float32).mode == "no"
    assert choose_precision("auto", torch.device("cuda"), torch.float16).mode == "fp16"
    assert choose_precision("auto", torch.device("cuda"), torch.bfloat16).mode == "bf16"
    assert choose_precision("fp16", torch.device("cuda"), torch.float16).use_scaler


# -- every outcome restores the model ---------------------------------------------------------------

def test_exception_mid_step_restores_model(host, images, tmp_path, monkeypatch):
    before = snapshot(*host.all_modules())
    calls = {"n": 0}
    real = type(host).predict

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, *a, **k)

    monkeypatch.setattr(type(host), "predict", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        Trainer(host, _cfg(train_text_encoder=True, gradient_checkpointing=True), images, str(tmp_path)).run()
    monkeypatch.undo()
    assert_unchanged(before, *host.all_modules())
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("save", [True, False])
def test_cancel(host, images, tmp_path, save):
    before = snapshot(*host.all_modules())
    token = CancelToken()
    seen = []

    def progress(p):
        seen.append(p.step)
        if p.step == 2:
            token.stop(save=save)

    result = Trainer(host, _cfg(steps=10, train_text_encoder=True), images, str(tmp_path), progress=progress,
                     cancel=token).run()
    assert seen == [1, 2] and result.steps_done == 2
    assert_unchanged(before, *host.all_modules())
    if save:
        assert result.status == "stopped" and os.path.isfile(result.path)
        import safetensors
        with safetensors.safe_open(result.path, "pt") as f:
            assert f.metadata()["ss_steps"] == "2"
    else:
        assert result.status == "cancelled" and result.path is None
        assert os.listdir(tmp_path) == []


def test_progress_and_loss_reads(host, images, tmp_path):
    seen = []
    result = Trainer(host, _cfg(steps=7, log_every=3), images, str(tmp_path), progress=seen.append).run()
    assert [p.step for p in seen] == list(range(1, 8)) and all(p.total == 7 for p in seen)
    assert all(p.eta is not None and p.eta >= 0 for p in seen) and seen[-1].eta == 0
    assert [s for s, _ in result.loss_history] == [1, 4, 7]  # loss is read back only every log_every steps
    assert all(math.isfinite(v) and v > 0 for _, v in result.loss_history)
    assert seen[-1].lr == pytest.approx(1e-3)
    # the peak memory beyond the loaded model is reported as it grows and at the end
    assert all(p.memory_mb is not None and p.memory_mb >= 0 for p in seen)
    assert [p.memory_mb for p in seen] == sorted(p.memory_mb for p in seen)
    assert result.peak_memory_mb >= seen[-1].memory_mb


def test_peak_memory_sees_an_allocation_and_only_the_peak():
    from lib_charlora.engine.memory import PeakMemory, memory_text
    with PeakMemory("cpu") as mem:
        block = torch.ones(64, 2 ** 20)  # 256 MB, written (resident)
        during = mem.peak_mb()
        del block
    assert 240 < during < 400 and mem.final_mb >= during  # freed afterwards: the peak stays
    with PeakMemory("cpu") as small:
        torch.ones(2 ** 10).sum()
    assert small.final_mb < 50
    assert memory_text(840.4) == "840 MB" and memory_text(1536) == "1.5 GB"


# -- determinism, checkpoints, resume ----------------------------------------------------------------

def test_same_seed_same_weights_different_seed_differs(images, tmp_path):
    runs = []
    for i, seed in enumerate([5, 5, 6]):
        h = warm(tiny_host("diffusers", "sd1", seed=0))
        t = Trainer(h, _cfg(name=f"r{i}", seed=seed, dropout=0.1, flip=True), images, str(tmp_path))
        t.run()
        runs.append(_lora_weights(t))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_resume_equals_uninterrupted(images, tmp_path):
    kw = dict(steps=6, dropout=0.1, flip=True, batch_size=2, scheduler="cosine", warmup_steps=2, seed=11,
              train_text_encoder=True)
    full = Trainer(warm(tiny_host("ldm", "sd1")), _cfg(name="full", save_every=3, **kw), images, str(tmp_path))
    result = full.run()
    assert [os.path.basename(c) for c in result.checkpoints] == ["full-step000003.state"]
    ckpt_dir = tmp_path / "full_checkpoints"
    assert sorted(os.listdir(ckpt_dir)) == ["full-step000003.safetensors", "full-step000003.state"]

    resumed = Trainer(warm(tiny_host("ldm", "sd1")), _cfg(name="resumed", **kw), images, str(tmp_path))
    r2 = resumed.run(resume_from=result.checkpoints[0])
    assert r2.steps_done == 6
    a, b = _lora_weights(full), _lora_weights(resumed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert [s for s, _ in r2.loss_history] == [s for s, _ in result.loss_history] == list(range(1, 7))
    assert [v for _, v in r2.loss_history] == pytest.approx([v for _, v in result.loss_history], rel=1e-5)

    # a checkpoint made with other settings is refused, naming the difference
    with pytest.raises(ConfigError, match="rank 4 -> 8"):
        Trainer(warm(tiny_host("ldm", "sd1")), _cfg(name="other", rank=8, **kw), images, str(tmp_path)).run(
            resume_from=result.checkpoints[0])
    with pytest.raises(ConfigError, match="resume_from"):
        Trainer(warm(tiny_host("ldm", "sd1")), _cfg(name="other", **kw), images, str(tmp_path)).run(
            resume_from=str(tmp_path / "missing.state"))


def _no_unpickling(monkeypatch):
    """Make every way to unpickle fail loudly, so a test sees any use of it."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("something unpickled")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def test_state_file_is_safetensors_and_resume_never_unpickles(images, tmp_path, monkeypatch):
    import json
    import safetensors
    from lib_charlora.engine.trainer import STATE_VERSION
    kw = dict(steps=2, dropout=0.1, flip=True, scheduler="cosine", seed=3)
    full = Trainer(warm(tiny_host("ldm", "sd1")), _cfg(name="sf", save_every=1, **kw), images, str(tmp_path))
    result = full.run()
    state = result.checkpoints[0]
    assert os.path.basename(state) == "sf-step000001.state" and not any(
        f.endswith(".tmp") for f in os.listdir(tmp_path / "sf_checkpoints"))
    with safetensors.safe_open(state, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        assert meta["format"] == "charlora-train-state" and meta["version"] == str(STATE_VERSION) == "2"
        body = json.loads(meta["state"])
        assert body["step"] == 1 and body["num_images"] == len(images) and body["version"] == STATE_VERSION
        assert body["fingerprint"]["rank"] == 4 and body["sampler"]["pos"] >= 1
        network = full.network.state_dict()
        assert {k: v["$tensor"] for k, v in body["network"].items()} == {k: f"network/{k}" for k in network}
        assert f.get_tensor("generator").dtype == torch.uint8 and f.get_tensor("torch_rng").dtype == torch.uint8
        groups = body["optimizer"]["param_groups"]
        assert groups[0]["betas"] == {"$tuple": [0.9, 0.999]} and groups[0]["params"] == list(range(len(network)))
        assert "optimizer/state/0/exp_avg" in keys and "optimizer/state/0/step" in keys
        assert body["scaler"] is None and body["cuda_rng"] is None
    assert keys == {k for k in keys if k.startswith(("network/", "optimizer/state/"))} | {"generator", "torch_rng"}

    _no_unpickling(monkeypatch)  # resuming reads no pickle: it would raise here
    resumed = Trainer(warm(tiny_host("ldm", "sd1")), _cfg(name="sf2", **kw), images, str(tmp_path))
    r2 = resumed.run(resume_from=state)
    assert r2.status == "done" and r2.steps_done == 2
    a, b = _lora_weights(full), _lora_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)   # bit-identical continuation
    assert r2.loss_history == result.loss_history


def test_state_file_round_trips_what_load_state_dict_needs(tmp_path):
    from lib_charlora.engine import statefile
    from lib_charlora.engine.optim import make_optimizer, make_scheduler

    def make(seed):
        torch.manual_seed(seed)
        ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(2))]
        opt = make_optimizer("adamw", [{"params": ps[:1], "lr": 1e-2}, {"params": ps[1:], "lr": 1e-3}], 0.01,
                             torch.device("cpu"))
        return ps, opt, make_scheduler(opt, "cosine_with_restarts", 10, 2, 2)

    def train(ps, opt, sched, n):
        for _ in range(n):
            (ps[0].square().sum() + ps[1].sin().sum()).backward()
            opt.step()
            opt.zero_grad()
            sched.step()

    ps, opt, sched = make(0)
    train(ps, opt, sched, 3)
    base = torch.arange(6.0)
    odd = {"$x": 1, 7: (base, base[:3]), "t": ((1, 2.5), [None, True, float("inf")]), "s": "é"}
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "odd": odd, "started_at": 1.0 / 3}
    statefile.save(str(tmp_path / "x.state"), state, 9)
    back = statefile.load(str(tmp_path / "x.state"), 9)
    assert back["started_at"] == 1.0 / 3 and back["scheduler"] == sched.state_dict()
    assert back["odd"]["$x"] == 1 and back["odd"]["t"] == ((1, 2.5), [None, True, float("inf")])
    assert back["odd"]["s"] == "é" and torch.equal(back["odd"][7][0], base)
    assert torch.equal(back["odd"][7][1], base[:3])
    o = back["optimizer"]
    assert o["param_groups"] == opt.state_dict()["param_groups"] and isinstance(o["param_groups"][0]["betas"], tuple)
    assert set(o["state"]) == {0, 1} and all(torch.equal(o["state"][i][k], v) and o["state"][i][k].dtype == v.dtype
                                              for i, s in opt.state_dict()["state"].items() for k, v in s.items())
    ps2, opt2, sched2 = make(1)
    with torch.no_grad():
        for p, q in zip(ps2, ps):
            p.copy_(q)
    opt2.load_state_dict(o)
    sched2.load_state_dict(back["scheduler"])
    train(ps, opt, sched, 4)
    train(ps2, opt2, sched2, 4)
    assert all(torch.equal(p, q) for p, q in zip(ps, ps2)) and sched2.get_last_lr() == sched.get_last_lr()


def test_old_pickled_or_unreadable_state_is_refused(host, images, tmp_path, monkeypatch):
    import pickle
    old = tmp_path / "old-step000002.state"
    torch.save({"version": 1, "fingerprint": _cfg().fingerprint(), "num_images": len(images)}, str(old))
    plain = tmp_path / "plain.state"
    plain.write_bytes(pickle.dumps({"version": 1}, protocol=2))
    junk = tmp_path / "junk.state"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    empty = tmp_path / "empty.state"
    empty.write_bytes(b"")
    _no_unpickling(monkeypatch)  # a refusal, never an attempt to read the pickle
    for path, reason in [(old, "is a pickled file"), (plain, "is a pickled file"), (junk, "not a readable"),
                         (empty, "not a readable")]:
        with pytest.raises(ConfigError) as e:
            Trainer(host, _cfg(name="old"), images, str(tmp_path)).run(resume_from=str(path))
        assert e.value.field == "resume_from" and reason in str(e.value), str(e.value)
        assert "resume it with the version of Character LoRA that wrote it, or train again" in str(e.value)
    assert "never read" in str(pytest.raises(ConfigError, Trainer(host, _cfg(name="old"), images, str(tmp_path)).run,
                                              resume_from=str(old)).value)
    assert not os.path.exists(tmp_path / "old.safetensors")


def test_state_of_another_version_or_format_is_refused(host, images, tmp_path):
    import json
    from safetensors.torch import save_file
    from lib_charlora.engine.trainer import STATE_VERSION
    t = {"generator": torch.zeros(4, dtype=torch.uint8)}
    cases = []
    for version in ("1", "3"):
        path = str(tmp_path / f"v{version}.state")
        save_file(t, path, metadata={"format": "charlora-train-state", "version": version, "state": "{}"})
        cases.append((path, f"training state of state version {version}, this Character LoRA reads state "
                            f"version {STATE_VERSION}"))
    lora = str(tmp_path / "lora.state")  # e.g. the checkpoint's LoRA file given instead of its .state
    save_file(t, lora, metadata={"ss_network_module": "networks.lora"})
    cases.append((lora, "not a Character LoRA training state (no format marker, expected 'charlora-train-state')"))
    other = str(tmp_path / "other.state")
    save_file(t, other, metadata={"format": "someone-else", "version": str(STATE_VERSION), "state": "{}"})
    cases.append((other, "format marker 'someone-else'"))
    broken = str(tmp_path / "broken.state")  # right marker and version, a tensor it names is missing
    save_file(t, broken, metadata={"format": "charlora-train-state", "version": str(STATE_VERSION),
                                   "state": json.dumps({"torch_rng": {"$tensor": "torch_rng"}})})
    cases.append((broken, "'torch_rng' is missing"))
    partial = str(tmp_path / "partial.state")
    body = json.dumps({"version": STATE_VERSION, "generator": {"$tensor": "generator"}})
    save_file(t, partial, metadata={"format": "charlora-train-state", "version": str(STATE_VERSION), "state": body})
    cases.append((partial, "not a complete Character LoRA training state"))
    for path, reason in cases:
        with pytest.raises(ConfigError) as e:
            Trainer(host, _cfg(name="v"), images, str(tmp_path)).run(resume_from=path)
        assert e.value.field == "resume_from" and reason in str(e.value), str(e.value)


# -- schedules, checkpointing, precision ------------------------------------------------------------------

def test_adamw_is_fused_where_torch_has_it_else_multi_tensor(monkeypatch):
    from lib_charlora.engine.optim import make_optimizer
    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer("adamw", [{"params": [p], "lr": 1e-3}], 0.01, torch.device("cpu"))
    assert opt.defaults["fused"] is True  # torch 2.13 has a fused CPU kernel

    class Torch21AdamW(torch.optim.AdamW):  # torch < 2.4 refuses fused off CUDA (A1111 1.10 ships 2.1.2)
        def __init__(self, params, *args, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of "
                                   "supported devices: ['cuda']")
            super().__init__(params, *args, fused=fused, **kwargs)
    monkeypatch.setattr(torch.optim, "AdamW", Torch21AdamW)
    opt = make_optimizer("adamw", [{"params": [p], "lr": 1e-3}], 0.01, torch.device("cpu"))
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    p.grad = torch.ones(3)
    opt.step()
    assert (p < 0).all()


def test_lr_schedules():
    const = lr_lambda("constant", 100, warmup_steps=10)
    assert [const(s) for s in (0, 5, 10, 99)] == [0, 0.5, 1, 1]
    cos = lr_lambda("cosine", 110, warmup_steps=10)
    assert cos(10) == 1 and cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0)
    rst = lr_lambda("cosine_with_restarts", 100, num_cycles=2)
    assert rst(0) == 1 and rst(25) == pytest.approx(0.5) and rst(50) == pytest.approx(1) and rst(75) == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["ldm", "diffusers"])
def test_gradient_checkpointing_same_gradients(kind):
    h = warm(tiny_host(kind, "sdxl"))
    net = LoRANetwork(4, 4)
    for c in [h.unet, *h.text_encoders]:
        net.add_component(c)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in net.loras.values():
            lora.lora_up.weight.normal_(std=0.02, generator=g)
    noisy, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700])
    mods = h.all_modules()
    before = snapshot(*mods)
    grads = []
    for enabled in (False, True):
        net.zero_grad()
        with h.session(True), gradient_checkpointing([h.unet.module, *(c.module for c in h.text_encoders)],
                                                     enabled) as n:
            assert (n > 0) == enabled
            net.attach()
            try:
                cond = h.encode_text(["sks", "a cat"], [(64, 64, 0, 0, 64, 64)] * 2)
                h.predict(noisy, t, cond).square().mean().backward()
            finally:
                net.detach()
        grads.append({k: p.grad for k, p in net.named_parameters()})
    # SDXL conditions on the penultimate layers; only TE2 feeds its last layer into the pooled vector
    last = ["lora_te1_text_model_encoder_layers_1_"]
    for k, g in grads[0].items():
        assert (g is None) == any(p in k for p in last), k
        assert g is None or g.abs().sum() > 0, k
    for k in grads[0]:
        if grads[0][k] is not None:
            torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)
    assert_unchanged(before, *mods)


def test_bf16_autocast_trains_on_cpu(host, images, tmp_path):
    result = Trainer(host, _cfg(mixed_precision="bf16", steps=2), images, str(tmp_path)).run()
    assert result.status == "done" and all(math.isfinite(v) for _, v in result.loss_history)


def test_demo_runs(tmp_path, capsys):
    from lib_charlora.cli import main
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "3", "--images", "5"]) == 0
    out = capsys.readouterr().out
    assert os.path.isfile(tmp_path / "d" / "Lora" / "demo_character.safetensors")
    assert "Dataset: 5 pictures" in out and "<lora:demo_character:1>" in out
    from PIL import Image
    from lib_charlora.engine.grid import grid_size
    grids = sorted(os.listdir(tmp_path / "d" / "tests"))  # steps 1, 2 and the final file, each tested
    assert [g for g in grids if g.endswith("-grid.png")] == [
        "demo_character-grid.png", "demo_character-step000001-grid.png", "demo_character-step000002-grid.png"]
    with Image.open(tmp_path / "d" / "tests" / "demo_character-grid.png") as im:
        assert im.size == grid_size(3, 3, (128, 128))  # baseline + 2 strengths, 3 prompts x 1 seed
    assert main(["demo", "--out", str(tmp_path / "e"), "--steps", "3", "--images", "4"]) == 2
    assert "only 4 usable pictures; at least 5 are needed" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "e" / "Lora")
