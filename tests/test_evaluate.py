"""Test and refine: grids of a LoRA's checkpoints generated through the host's own sampler loading the
files by ``<lora:file:w>`` (the Forge double's processing and LoRA loader), CLIP scores from a tiny
random CLIPModel, the pick-best rule, and an atomic promote."""
import json
import os
import threading

import pytest
import safetensors.torch
import torch
from PIL import Image

from lib_charlora.engine import export
from lib_charlora.engine.embedders import ClipEmbedder, load_clip
from lib_charlora.engine.errors import ConfigError, UnsupportedModelError
from lib_charlora.engine.evaluate import pick_best
from lib_charlora.engine.grid import grid_size
from lib_charlora.hosts.forge import ForgeHost
from lib_charlora.service import TrainService
from lib_charlora.tiny import tiny_tokenizer
from tests.conftest import assert_unchanged, snapshot
from tests.forge_double import generate, make_forge
from tests.test_api import PICS


def tiny_clip():
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    n = len(tok)
    text = dict(vocab_size=n, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    return ClipEmbedder(model, tok, name="CLIP (tiny)")


def forge_service(tmp):
    """A Forge (double) and a service over it that scores with a tiny CLIP."""
    webui = make_forge(tmp, "sd1")
    lock = threading.Lock()
    clip = tiny_clip()
    service = TrainService(lambda: ForgeHost.for_request(webui, lock), webui.lora_dir, lock=lock,
                           job_host_factory=lambda: ForgeHost.for_job(webui), outputs_dir=str(tmp / "outputs"),
                           embedder_factory=lambda: (clip, None))
    return webui, service


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Forge (double) with 'pip' trained for 4 steps, a checkpoint at step 2 kept."""
    tmp = tmp_path_factory.mktemp("forge")
    webui, service = forge_service(tmp)
    job = service.submit({"name": "pip", "trigger": "pipchr", "images": PICS, "steps": 4, "save_every": 2,
                          "resolution": 64, "preset": "fast", "learning_rate": 2e-2, "keep_checkpoints": True})
    assert service.runner.wait(job.id, 300) and job.status == "done", job.error
    return webui, service, tmp


def _eval_body(**kw):
    body = {"lora": "pip", "prompts": ["portrait of {trigger}", "{trigger} in a city"], "seeds": [1],
            "strengths": [0.5, 1.0], "steps": 2, "width": 64, "height": 64}
    body.update(kw)
    return body


def test_grid_scores_and_pick_through_the_hosts_own_lora_loading(trained):
    webui, service, tmp = trained
    sd_model = webui.sd_models.model_data.sd_model
    before = snapshot(*sd_model.modules())
    baseline = generate(webui, "portrait of pipchr", seed=1)
    webui.processing.prompts.clear()
    job = service.submit_evaluation(_eval_body())
    assert job.kind == "evaluate" and job.total_steps == 2 * (1 + 2 * 2)  # columns x (baseline + checkpoints x strengths)
    assert service.runner.wait(job.id, 300) and job.status == "done", job.error
    result = job.result
    # the files were loaded as users load them: the baseline without any LoRA, then <lora:file:strength>
    prompts = webui.processing.prompts
    assert prompts[:2] == ["portrait of pipchr", "pipchr in a city"]
    assert prompts[2] == "<lora:pip-step000002:0.5> portrait of pipchr" and prompts[-1] == "<lora:pip:1> pipchr in a city"
    assert torch.equal(generate(webui, "portrait of pipchr", seed=1), baseline)
    assert_unchanged(before, *sd_model.modules())  # the base model is as before the evaluation
    # one grid per checkpoint, ordered by step: first row the baseline, then one row per strength
    assert [os.path.basename(p) for p in result["grid_paths"]] == ["pip-step000002-grid.png", "pip-grid.png"]
    for path in result["grid_paths"]:
        assert Image.open(path).size == grid_size(3, 2, (64, 64))
    report = json.load(open(result["report_path"]))
    assert report["grid_rows"] == ["without LoRA", "0.5", "1"] and len(report["grid_columns"]) == 2
    assert [(c["file"], c["step"]) for c in report["checkpoints"]] == [("pip-step000002.safetensors", 2),
                                                                       ("pip.safetensors", 4)]
    assert len(os.listdir(os.path.join(os.path.dirname(result["report_path"]), "images"))) == 2 + 2 * 2 * 2
    # scores for every checkpoint x strength, from the CLIP embedder against the kept training pictures
    assert result["embedder"] == "CLIP (tiny)"
    scores = result["scores"]
    assert [(s["checkpoint"], s["strength"]) for s in scores] == [
        ("pip-step000002.safetensors", 0.5), ("pip-step000002.safetensors", 1.0), ("pip.safetensors", 0.5),
        ("pip.safetensors", 1.0)]
    assert all(-1 <= s["identity"] <= 1 and isinstance(s["prompt_fidelity_delta"], float) for s in scores)
    assert result["best"] == {**pick_best(scores), "reason": result["best"]["reason"]}
    assert result["best"]["checkpoint"] in ("pip-step000002.safetensors", "pip.safetensors")


def test_evaluation_refusals_name_the_field(trained, tmp_path):
    webui, service, _ = trained
    cases = [({"lora": "nope"}, "lora", "no LoRA named"), ({"lora": "../x"}, "lora", "path separator"),
             (_eval_body(checkpoints=["other-step000002.safetensors"]), "checkpoints", "not checkpoints of"),
             (_eval_body(prompts=[]), "prompts", "list of 1 to 20"), (_eval_body(prompts=["  "]), "prompts", "non-empty"),
             (_eval_body(strengths=[0]), "strengths", "> 0"), (_eval_body(width=100), "width", "multiple of 64"),
             (_eval_body(seeds=list(range(8)), prompts=["a {trigger}"] * 20), "prompts", "at most 200"),
             (_eval_body(colour=1), "colour", "unknown field")]
    for body, field, text in cases:
        with pytest.raises(ConfigError, match=text) as e:
            service.submit_evaluation(body)
        assert e.value.field == field
    # a file made for another kind of model is refused with its arch named
    other = make_forge(tmp_path, "sdxl")
    os.makedirs(other.lora_dir)
    md = {"ss_base_model_version": "sd_v1", "ss_output_name": "pip", "ss_steps": "4"}
    safetensors.torch.save_file({"x.alpha": torch.tensor(1.0)}, os.path.join(other.lora_dir, "pip.safetensors"), md)
    with pytest.raises(UnsupportedModelError, match="trained for SD1; the loaded checkpoint is SDXL"):
        TrainService(lambda: ForgeHost.for_job(other), other.lora_dir).submit_evaluation({"lora": "pip"})


def test_without_an_embedder_the_grid_is_still_made(trained, tmp_path):
    webui, _, _ = trained
    service = TrainService(lambda: ForgeHost.for_job(webui), webui.lora_dir, outputs_dir=str(tmp_path),
                           embedder_factory=lambda: load_clip("no-such/model-offline"))
    job = service.submit_evaluation(_eval_body(checkpoints="final", strengths=[1.0], prompts=["{trigger}"]))
    assert service.runner.wait(job.id, 120) and job.status == "done", job.error
    assert job.result["embedder"].startswith("unavailable: the CLIP model 'no-such/model-offline' is not in the "
                                             "Hugging Face cache")
    assert any("scores unavailable" in w for w in job.warnings) and len(job.result["grid_paths"]) == 1
    assert job.result["best"]["checkpoint"] == "pip.safetensors" and all(s["identity"] is None
                                                                          for s in job.result["scores"])


def test_a_cancelled_evaluation_writes_nothing(trained, tmp_path):
    webui, _, _ = trained
    service = TrainService(lambda: ForgeHost.for_job(webui), webui.lora_dir, outputs_dir=str(tmp_path / "out"),
                           embedder_factory=lambda: (None, "unavailable: test"))
    job = service.submit_evaluation(_eval_body())
    job.cancel.stop(save=False)
    assert service.runner.wait(job.id, 120) and job.status == "cancelled" and not os.path.exists(tmp_path / "out")


def test_pick_best_rule():
    def row(ckpt, step, strength, lift, delta):
        return {"checkpoint": ckpt, "step": step, "strength": strength, "identity_lift": lift,
                "prompt_fidelity_delta": delta}
    scores = [row("a", 100, 1.0, 0.10, 0.0), row("b", 200, 1.0, 0.30, -0.01), row("c", 300, 1.0, 0.50, -0.20)]
    assert pick_best(scores)["checkpoint"] == "b"  # c has more identity but lost prompt fidelity
    tie = [row("a", 100, 1.0, 0.30, 0.0), row("b", 200, 0.8, 0.30, 0.0), row("a", 100, 0.8, 0.30, 0.0)]
    assert (pick_best(tie)["checkpoint"], pick_best(tie)["strength"]) == ("a", 0.8)  # fewer steps, then lower strength
    overfit = [row("a", 100, 1.0, 0.5, -0.10), row("b", 200, 1.0, 0.6, -0.05), row("c", 300, 1.0, 0.7, -0.30)]
    best = pick_best(overfit)
    assert best["checkpoint"] == "b" and "overfit" in best["reason"]
    unscored = [dict(row("a", 100, 1.0, None, None), final=False), dict(row("b", 200, 0.8, None, None), final=True),
                dict(row("b", 200, 1.0, None, None), final=True)]
    assert (pick_best(unscored)["checkpoint"], pick_best(unscored)["strength"]) == ("b", 1.0)
    assert pick_best([]) is None


def test_clip_embedder_is_a_real_clip_model():
    clip = tiny_clip()
    pics = [Image.new("RGB", (80, 48), (200, 30, 30)), Image.new("RGB", (40, 60), (20, 200, 30))]
    emb = clip.images(pics + pics[:1])
    assert emb.shape == (3, 16) and torch.allclose(emb.norm(dim=1), torch.ones(3))
    assert torch.allclose(emb[0], emb[2]) and not torch.allclose(emb[0], emb[1])
    t = clip.texts(["a red square", "a green square"])
    assert t.shape == (2, 16) and not torch.allclose(t[0], t[1])


def test_promote_is_atomic_and_takes_the_checkpoint(trained, tmp_path, monkeypatch):
    webui, service, _ = trained
    final = os.path.join(webui.lora_dir, "pip.safetensors")
    ckpt = os.path.join(webui.lora_dir, "pip_checkpoints", "pip-step000002.safetensors")
    old = open(final, "rb").read()
    real_replace = os.replace

    def crash(src, dst):
        if dst == final:
            raise OSError("disk full (simulated)")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        service.promote({"lora": "pip", "checkpoint": "pip-step000002.safetensors", "strength": 0.8})
    monkeypatch.undo()
    assert open(final, "rb").read() == old and not [f for f in os.listdir(webui.lora_dir) if f.endswith(".tmp")]
    with pytest.raises(ConfigError, match="not an intermediate checkpoint"):
        service.promote({"lora": "pip", "checkpoint": "pip.safetensors"})
    out = service.promote({"lora": "pip", "checkpoint": "pip-step000002.safetensors", "strength": 0.8})
    assert out["ss_steps"] == "2" and out["preferred_weight"] == 0.8 and out["warnings"] == []
    a, b = safetensors.torch.load_file(final), safetensors.torch.load_file(ckpt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safetensors.safe_open(final, "pt") as f:
        md = f.metadata()
    assert md["ss_steps"] == "2" and md["charlora_promoted_from"] == "pip-step000002.safetensors"
    assert md["sshs_model_hash"] == export.addnet_hash(final)
    assert json.load(open(final[:-len(".safetensors")] + ".json"))["preferred weight"] == 0.8
    kept = os.path.join(webui.lora_dir, "pip_checkpoints", "pip-final.safetensors")
    assert open(kept, "rb").read() == old  # the former final file is kept beside the checkpoints
    assert "pip" in webui.networks.available_networks  # the Lora list was refreshed
    from lib_charlora.engine.evaluate import EvalConfig, lora_arch, read_metadata, select_checkpoints
    arch = lora_arch(read_metadata(final))
    assert [c.file for c in select_checkpoints(EvalConfig(lora="pip"), webui.lora_dir, arch)] == [
        "pip-step000002.safetensors"]  # all: the promoted final is not tested twice
    assert [c.file for c in select_checkpoints(EvalConfig(lora="pip", checkpoints="final"), webui.lora_dir, arch)] == [
        "pip.safetensors"]  # final: the promoted file itself
    # promoting another checkpoint keeps the trained file's copy; promoting that copy undoes the promote
    service.promote({"lora": "pip", "checkpoint": "pip-step000002.safetensors"})
    assert open(kept, "rb").read() == old
    service.promote({"lora": "pip", "checkpoint": "pip-final.safetensors"})
    a, b = safetensors.torch.load_file(final), safetensors.torch.load_file(kept)
    assert all(torch.equal(a[k], b[k]) for k in a) and open(kept, "rb").read() == old
    with safetensors.safe_open(final, "pt") as f:
        assert f.metadata()["ss_steps"] == "4"


def test_the_tab_tests_a_lora_right_after_training(tmp_path):
    """Train in the tab with "Test automatically after training" on: checkpoints are kept and tested."""
    from lib_charlora import ui
    webui, service = forge_service(tmp_path)
    tab = ui.create_tab(service)
    import base64
    paths = []
    for i, b64 in enumerate(PICS):
        paths.append(str(tmp_path / f"p{i}.png"))
        open(paths[-1], "wb").write(base64.b64decode(b64))
    adv = [d for _, _, d, _ in ui.ADVANCED]
    adv[0], adv[5] = 4, 64  # steps, resolution
    # task, files, folder, caption table, name, trigger, overwrite, preset, auto-test, use Advanced, text encoder, *adv
    out = list(tab.charlora["train"]("", paths, "", None, "pip", "pipchr", False, "Fast", True, True, False, *adv))
    assert "data-status='done'" in out[-1][1]
    lora, status, grids, rows, best, state = list(tab.charlora["after_training"](out[-1][0], True, "{trigger}",
                                                                                "1", "1", 2))[-1]
    assert lora == "pip" and "data-status='done'" in status
    assert [g[1] for g in grids] == [f"pip-step00000{i}-grid.png" for i in (1, 2, 3)] + ["pip-grid.png"]
    assert [r[1] for r in rows] == [1, 2, 3, 4] and best.startswith("<lora:pip") and best.endswith(" pipchr")


def test_a_face_embedder_replaces_clip_for_identity_when_it_finds_faces(trained, tmp_path, monkeypatch):
    import lib_charlora.service as service_module
    webui, _, _ = trained
    clip = tiny_clip()

    class FakeFaces:
        name = "face (fake)"

        def __init__(self, found):
            self.found_pattern = found

        def images(self, pictures):
            self.found = [self.found_pattern] * len(pictures)
            return torch.nn.functional.normalize(torch.ones(len(pictures), 4), dim=1)

    for found, expected in ((True, "face (fake)"), (False, "CLIP (tiny)")):
        monkeypatch.setattr(service_module, "load_face_embedder", lambda: FakeFaces(found))
        service = TrainService(lambda: ForgeHost.for_job(webui), webui.lora_dir, outputs_dir=str(tmp_path),
                               embedder_factory=lambda: (clip, None))
        job = service.submit_evaluation(_eval_body(checkpoints="final", strengths=[1.0], prompts=["{trigger}"],
                                                   images=PICS))
        assert service.runner.wait(job.id, 120) and job.status == "done", job.error
        assert job.result["embedder"] == expected


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_standalone_evaluation_loads_each_file_with_diffusers(tmp_path, arch):
    """The diffusers host tests the file through diffusers' own ``load_lora_weights`` (every tensor loaded,
    or the evaluation fails), once per file; the pictures change with the LoRA; afterwards the modules are
    the same objects of the same types with bit-identical weights."""
    from lib_charlora.demo import demo_dataset
    from lib_charlora.engine import TrainConfig, Trainer
    from lib_charlora.engine.evaluate import EvalConfig, Evaluator
    from lib_charlora.tiny import tiny_host
    import numpy as np
    host = tiny_host("diffusers", arch)
    cfg = TrainConfig(name="solo", trigger="pipchr", steps=4, rank=4, alpha=4, learning_rate=5e-2,
                      train_text_encoder=True, text_encoder_lr=1e-2, resolution=64, save_every=2)
    Trainer(host, cfg, demo_dataset(5, 64, "pipchr"), str(tmp_path / "Lora")).run()
    before = snapshot(*host.all_modules())
    types = [(n, type(m)) for m in host.all_modules() for n, m in m.named_modules()]
    loads = []
    import lib_charlora.hosts.standalone as standalone
    real = standalone._load_lora

    def counting(pipe, path):
        loads.append(os.path.basename(path))
        return real(pipe, path)

    standalone._load_lora = counting
    try:
        result = Evaluator(host, EvalConfig(lora="solo", prompts=["photo of {trigger}", "{trigger} at sea"], seeds=[1],
                                            strengths=[0.5, 1.0], width=64, height=64, steps=3),
                           str(tmp_path / "Lora"), str(tmp_path / "out")).run()
    finally:
        standalone._load_lora = real
    assert result.status == "done" and len(result.grid_paths) == 2
    assert loads == ["solo-step000002.safetensors", "solo.safetensors"]
    images = tmp_path / "out" / "images"
    base = np.asarray(Image.open(images / "baseline-photo_of_trigger-1.png"), dtype=int)
    full = np.asarray(Image.open(images / "solo-1-photo_of_trigger-1.png"), dtype=int)
    assert np.abs(base - full).max() > 10
    assert_unchanged(before, *host.all_modules())
    assert [(n, type(m)) for m in host.all_modules() for n, m in m.named_modules()] == types


def test_standalone_evaluation_refuses_a_file_diffusers_cannot_fully_load(tmp_path):
    from lib_charlora.tiny import tiny_host
    host = tiny_host("diffusers", "sd1")
    bad = tmp_path / "bad.safetensors"
    unet = host.unet.module
    q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    safetensors.torch.save_file({
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, q.in_features),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(q.out_features, 2),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_no_such.lora_down.weight": torch.zeros(2, 4),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_no_such.lora_up.weight": torch.zeros(4, 2),
    }, str(bad))
    before = snapshot(*host.all_modules())
    with pytest.raises(Exception) as info:
        host.generate("x", 1, 64, 64, 2, lora=(str(bad), 1.0))
    assert "no_such" in str(info.value) or "did not load every tensor" in str(info.value)
    assert host._loaded is None
    assert_unchanged(before, *host.all_modules())
