"""LoRA layers attached to a live model by hooks (DESIGN.md §2.2).

The base modules are never replaced or modified: Linear and 1x1 conv targets get a forward hook
that adds ``up(down(dropout(x))) * alpha / rank``; an ``nn.MultiheadAttention`` (open_clip text
encoders) gets an instance-level ``forward`` that runs the same attention with
``W + up @ down * alpha / rank`` for q, k, v and out (all four or none: A1111 ignores partial sets).
The LoRA parameters are fp32 and live in a ``LoRANetwork`` the engine owns. ``detach()`` removes
every hook and instance attribute, leaving the host's modules exactly as they were.
"""
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from . import naming

TARGET_RULES = ("kohya", "attention")

UNET_CONTAINERS = frozenset({"SpatialTransformer", "Transformer2DModel"})
TEXT_CONTAINERS = frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP",
                             "ResidualAttentionBlock"})
_UNET_ATTN = re.compile(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_TEXT_ATTN = re.compile(r"(^|\.)(self_attn\.(q_proj|k_proj|v_proj|out_proj)|attn)$")


def is_linear(module):
    # Forge's ForgeOperations.Linear is a plain nn.Module named "Linear", not an nn.Linear.
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Linear" and hasattr(module, "weight"))


def is_conv1x1(module):
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def _linear_dims(module):
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight
    return w.shape[1], w.shape[0]


def find_targets(root, component_kind, rule="kohya"):
    """``[(path, module)]`` of the modules kohya's rule trains in ``root``.

    ``component_kind`` is 'unet' or 'text'. Rule 'kohya' = every Linear / 1x1 conv inside UNet
    transformer blocks, and the attention (q/k/v/out) and MLP (fc1/fc2) Linears of the text
    encoder; 'attention' keeps only the attention projections.
    """
    if rule not in TARGET_RULES:
        raise ValueError(f"unknown target rule {rule!r}; choose one of {', '.join(TARGET_RULES)}")
    containers = UNET_CONTAINERS if component_kind == "unet" else TEXT_CONTAINERS
    attn_re = _UNET_ATTN if component_kind == "unet" else _TEXT_ATTN
    found = {}
    for cpath, container in root.named_modules():
        if type(container).__name__ not in containers:
            continue
        mha_paths = []
        for sub, module in container.named_modules():
            path = f"{cpath}.{sub}" if sub else cpath
            if any(path.startswith(p + ".") for p in mha_paths):
                continue  # out_proj inside an nn.MultiheadAttention is not called as a module
            if isinstance(module, nn.MultiheadAttention):
                mha_paths.append(path)
                found[path] = module
            elif is_linear(module) or (component_kind == "unet" and is_conv1x1(module)):
                found[path] = module
    targets = [(p, m) for p, m in found.items() if rule == "kohya" or attn_re.search(p)]
    return targets


class LoRAModule(nn.Module):
    """``up(down(dropout(x))) * alpha / rank``; math identical to peft's ``LoraLayer``."""

    def __init__(self, in_features, out_features, rank, alpha, dropout=0.0, conv=False, generator=None):
        super().__init__()
        if conv:
            self.lora_down = nn.Conv2d(in_features, rank, 1, bias=False)
            self.lora_up = nn.Conv2d(rank, out_features, 1, bias=False)
        else:
            self.lora_down = nn.Linear(in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, out_features, bias=False)
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            # Kaiming-uniform with a = sqrt(5) (bound 1/sqrt(fan_in)), as nn.Linear and peft do.
            self.lora_down.weight.uniform_(-1 / math.sqrt(in_features), 1 / math.sqrt(in_features),
                                           generator=generator)
            self.lora_up.weight.zero_()

    def forward(self, x):
        # scaled at rank width: one pass over a [.., rank] tensor instead of the [.., out] output
        return self.lora_up(self.lora_down(self.dropout(x)) * self.scale)

    def delta_weight(self):
        """The weight delta as a matrix ``[out, in]``."""
        up = self.lora_up.weight.reshape(self.lora_up.weight.shape[0], -1)
        down = self.lora_down.weight.reshape(self.rank, -1)
        return (up @ down) * self.scale


class _Binding:
    __slots__ = ("module", "kind", "names", "handle")

    def __init__(self, module, kind, names):
        self.module, self.kind, self.names, self.handle = module, kind, names, None


class LoRANetwork(nn.Module):
    """The LoRA parameters of one training run, keyed by kohya module name."""

    def __init__(self, rank, alpha, dropout=0.0):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        self.rank, self.alpha, self.dropout_p = rank, float(alpha), float(dropout)
        self.loras = nn.ModuleDict()
        self.component_of = {}  # kohya name -> component name ("unet", "te1", ...)
        self._bindings = []
        self.attached = False

    def add_component(self, component, rule="kohya", generator=None):
        """Create LoRA modules for the targets of ``component`` (see hosts: ``Component``)."""
        kind = "unet" if component.scheme in naming.UNET_SCHEMES else "text"
        targets = find_targets(component.module, kind, rule)
        if not targets:
            raise ValueError(f"no LoRA targets found in {component.name} ({type(component.module).__name__})")
        for path, module in targets:
            if kind == "unet":
                names = [naming.unet_module_name(path, component.scheme, component.arch, component.prefix)]
            else:
                names = naming.text_module_names(path, component.scheme, component.prefix)
            self.bind(module, names, component.name, generator)

    def bind(self, module, names, component_name, generator=None):
        """Create the LoRA for one target module (four names for an ``nn.MultiheadAttention``)."""
        if isinstance(module, nn.MultiheadAttention):
            e = module.embed_dim
            dims = [(e, e), (module.kdim, e), (module.vdim, e), (e, e)]
            binding = _Binding(module, "mha", names)
            for name, (i, o) in zip(names, dims):
                self._new(name, component_name, i, o, False, generator)
        else:
            conv = is_conv1x1(module)
            i, o = (module.in_channels, module.out_channels) if conv else _linear_dims(module)
            binding = _Binding(module, "conv" if conv else "linear", names)
            self._new(names[0], component_name, i, o, conv, generator)
        self._bindings.append(binding)

    def _new(self, name, component_name, i, o, conv, generator):
        if name in self.loras:
            raise ValueError(f"two modules map to the kohya name {name}")
        self.loras[name] = LoRAModule(i, o, self.rank, self.alpha, self.dropout_p, conv, generator)
        self.component_of[name] = component_name

    def parameters_of(self, component_name):
        return [p for n, m in self.loras.items() if self.component_of[n] == component_name for p in m.parameters()]

    # -- attach / detach -------------------------------------------------------------------
    def attach(self):
        if self.attached:
            raise RuntimeError("LoRA network is already attached")
        try:
            for b in self._bindings:
                if b.kind == "mha":
                    b.module.forward = _mha_forward(b.module, [self.loras[n] for n in b.names])
                else:
                    b.handle = b.module.register_forward_hook(_add_hook(self.loras[b.names[0]]))
        except BaseException:
            self.attached = True
            self.detach()
            raise
        self.attached = True

    def detach(self):
        if not self.attached:
            return
        for b in self._bindings:
            if b.kind == "mha":
                b.module.__dict__.pop("forward", None)
            elif b.handle is not None:
                b.handle.remove()
                b.handle = None
        self.attached = False

    def kohya_state_dict(self, dtype=torch.float16):
        """``{name.lora_down.weight, name.lora_up.weight, name.alpha}`` as kohya writes them."""
        out = {}
        for name, m in self.loras.items():
            out[f"{name}.lora_down.weight"] = m.lora_down.weight.detach().to("cpu", dtype).contiguous()
            out[f"{name}.lora_up.weight"] = m.lora_up.weight.detach().to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=dtype)
        return out


def _add_hook(lora):
    """``output + LoRA(x)``, the same math as ``LoRAModule.forward`` with the functional ops called directly:
    a small model's step is bound by per-call overhead (about 200 targets), measured with
    benchmarks/train_speed.py."""
    down, up, scale = lora.lora_down.weight, lora.lora_up.weight, lora.scale
    op = F.conv2d if down.dim() == 4 else F.linear
    dropout = None if isinstance(lora.dropout, nn.Identity) else lora.dropout

    def hook(module, args, output):
        x = args[0]
        if x.dtype != down.dtype:
            x = x.to(down.dtype)
        if dropout is not None:
            x = dropout(x)
        y = op(op(x, down) * scale, up)
        return output + (y if y.dtype == output.dtype else y.to(output.dtype))
    return hook


def _mha_forward(mha, loras):
    q, k, v, o = loras

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched = query.dim() == 3
        if mha.batch_first and batched:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        out_w = mha.out_proj.weight
        out_w = out_w + o.delta_weight().to(out_w.dtype)
        kwargs = dict(training=mha.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
                      attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if mha._qkv_same_embed_dim:
            w = mha.in_proj_weight
            delta = torch.cat([q.delta_weight(), k.delta_weight(), v.delta_weight()])
            kwargs["use_separate_proj_weight"] = False
            in_w = w + delta.to(w.dtype)
        else:
            in_w = None
            kwargs.update(use_separate_proj_weight=True,
                          q_proj_weight=mha.q_proj_weight + q.delta_weight().to(mha.q_proj_weight.dtype),
                          k_proj_weight=mha.k_proj_weight + k.delta_weight().to(mha.k_proj_weight.dtype),
                          v_proj_weight=mha.v_proj_weight + v.delta_weight().to(mha.v_proj_weight.dtype))
        attn, weights = F.multi_head_attention_forward(
            query, key, value, mha.embed_dim, mha.num_heads, in_w, mha.in_proj_bias, mha.bias_k, mha.bias_v,
            mha.add_zero_attn, mha.dropout, out_w, mha.out_proj.bias, **kwargs)
        if mha.batch_first and batched:
            attn = attn.transpose(1, 0)
        return attn, weights
    return forward
