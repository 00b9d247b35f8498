"""LoRA layers: math against peft, MultiheadAttention, target rules, clean attach/detach."""
import copy

import pytest
import torch
from torch import nn

from lib_charlora.engine import Component, LoRANetwork, find_targets
from lib_charlora.engine.lora import LoRAModule
from lib_charlora.tiny import tiny_host
from tests.a1111_rule import OpenClipText
from tests.conftest import assert_unchanged, snapshot


def _random_lora(lora, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.1)


class _Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer


@pytest.mark.parametrize("conv", [False, True])
def test_lora_matches_peft(conv):
    from peft import LoraConfig, inject_adapter_in_model
    torch.manual_seed(0)
    base = nn.Conv2d(12, 10, 1) if conv else nn.Linear(12, 10)
    x = torch.randn(3, 12, 5, 5) if conv else torch.randn(3, 7, 12)
    ref = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=6, target_modules=["layer"]),
                                  _Holder(copy.deepcopy(base)), adapter_name="a")
    peft_layer = ref.layer
    with torch.no_grad():
        peft_layer.lora_B["a"].weight.normal_()

    net = LoRANetwork(4, 6)
    net.bind(base, ["lora_unet_layer"], "unet")
    lora = net.loras["lora_unet_layer"]
    with torch.no_grad():
        lora.lora_down.weight.copy_(peft_layer.lora_A["a"].weight.reshape(lora.lora_down.weight.shape))
        lora.lora_up.weight.copy_(peft_layer.lora_B["a"].weight.reshape(lora.lora_up.weight.shape))
    expected = peft_layer(x)
    plain = base(x)
    net.attach()
    got = base(x)
    net.detach()
    assert not torch.allclose(expected, plain)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got - plain, lora(x), rtol=1e-5, atol=1e-6)  # the hook's inline math = the module's
    torch.testing.assert_close(base(x), plain, rtol=0, atol=0)
    # peft's scale is alpha / r, as ours
    assert lora.scale == peft_layer.scaling["a"] == 6 / 4


def test_lora_init_is_identity_and_kaiming():
    lora = LoRAModule(64, 32, 8, 8)
    assert not lora.lora_up.weight.any()
    bound = 1 / 64 ** 0.5
    assert lora.lora_down.weight.abs().max() <= bound and lora.lora_down.weight.abs().max() > bound * 0.8


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_all_four_and_equal_to_merged_weights(batch_first):
    torch.manual_seed(0)
    model = OpenClipText(batch_first=batch_first)
    comp = Component("te2", model, "lora_te2", "open_clip", "sdxl")
    net = LoRANetwork(4, 2)
    net.add_component(comp)
    names = sorted(net.loras)
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert sum("self_attn" in n for n in names) == 8  # q, k, v, out for each of 2 layers
    assert sum("mlp_fc" in n for n in names) == 4
    for i, lora in enumerate(net.loras.values()):
        _random_lora(lora, i)
    x = torch.randn(5, 3, 16)
    before = snapshot(model)
    plain = model(x)
    # reference: the same model with W + up @ down * alpha/r merged into the weights
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for i, blk in enumerate(merged.transformer.resblocks):
            p = f"lora_te2_text_model_encoder_layers_{i}_"
            d = [net.loras[p + f"self_attn_{k}_proj"].delta_weight() for k in "qkv"]
            blk.attn.in_proj_weight += torch.cat(d)
            blk.attn.out_proj.weight += net.loras[p + "self_attn_out_proj"].delta_weight()
            blk.mlp.c_fc.weight += net.loras[p + "mlp_fc1"].delta_weight()
            blk.mlp.c_proj.weight += net.loras[p + "mlp_fc2"].delta_weight()
    net.attach()
    got = model(x)
    got.sum().backward()
    net.detach()
    torch.testing.assert_close(got, merged(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert_unchanged(before, model)
    torch.testing.assert_close(model(x), plain, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["diffusers", "ldm"])
def test_target_rules(kind):
    host = tiny_host(kind, "sd1")
    t_all = dict(find_targets(host.unet.module, "unet", "kohya"))
    t_attn = dict(find_targets(host.unet.module, "unet", "attention"))
    # SD1.5 layout: 16 transformer blocks x (proj_in, proj_out, 8 attention, 2 feed-forward)
    assert len(t_all) == 16 * 12
    assert len(t_attn) == 16 * 8 and set(t_attn) < set(t_all)
    assert all(p.endswith(("to_q", "to_k", "to_v", "to_out.0")) for p in t_attn)
    assert sum(isinstance(m, nn.Conv2d) for m in t_all.values()) == 32  # SD1 proj_in/out are 1x1 convs
    te = dict(find_targets(host.text_encoders[0].module, "text", "kohya"))
    assert len(te) == 2 * 6
    with pytest.raises(ValueError, match="unknown target rule"):
        find_targets(host.unet.module, "unet", "everything")


def test_detach_is_exact_and_idempotent():
    host = tiny_host("ldm", "sd1")
    mods = [host.unet.module, host.text_encoders[0].module]
    before = snapshot(*mods)
    net = LoRANetwork(4, 4)
    net.add_component(host.unet)
    net.add_component(host.text_encoders[0])
    net.attach()
    with pytest.raises(RuntimeError):
        net.attach()
    net.detach()
    net.detach()
    assert_unchanged(before, *mods)
