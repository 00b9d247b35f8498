"""Test-side model of how Forge's built-in LoRA loader (sd_forge_lora, main dfdcbab) matches kohya keys.

Written from shared/reference/forge-host.md §4, independent of our exporter:

* UNet: every ``diffusion_model.<path>.weight`` of the KModel answers to ``lora_unet_<path with _>``;
  diffusers-style names answer through the block arithmetic of the UNet's config (``num_res_blocks``,
  ``transformer_depth`` per input block, ``transformer_depth_output`` popped from the end,
  ``transformer_depth_middle``) for the transformer parts (``proj_in``, ``proj_out``, ``norm`` and
  every transformer block's attention / feed-forward / norms);
* text encoders: ``<clip_l|clip_h|clip_g>.transformer.text_model.encoder.layers.<b>.<part>.weight``
  answer to ``lora_te_…`` / ``lora_te1_…`` (clip_l, clip_h), ``lora_te2_…`` (clip_g next to clip_l),
  ``lora_te_…`` (clip_g alone) for the attention projections and the MLP;
* a file key is consumed with its ``.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``; what is
  left unconsumed is "unmatched" — more than 12 and Forge skips the whole file. A patch whose target
  is not a parameter of the model is "skipped".
"""
CLIP_PARTS = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.q_proj": "self_attn_q_proj",
              "self_attn.k_proj": "self_attn_k_proj", "self_attn.v_proj": "self_attn_v_proj",
              "self_attn.out_proj": "self_attn_out_proj"}
_ATTENTION_PARTS = ["proj_in", "proj_out", "norm"]
_BLOCK_PARTS = ["norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"]


def _transformer_names(diffusers_prefix, ldm_prefix, depth):
    out = {f"{diffusers_prefix}.{p}": f"{ldm_prefix}.{p}" for p in _ATTENTION_PARTS}
    for t in range(depth):
        for p in _BLOCK_PARTS:
            out[f"{diffusers_prefix}.transformer_blocks.{t}.{p}"] = f"{ldm_prefix}.transformer_blocks.{t}.{p}"
    return out


def diffusers_to_ldm(config):
    """diffusers module path -> ldm module path, for the transformer parts of the UNet."""
    res_blocks = list(config["num_res_blocks"])
    depth_in = list(config["transformer_depth"])
    depth_out = list(config["transformer_depth_output"])
    out = {}
    for level, n_res in enumerate(res_blocks):
        for j in range(n_res):
            depth = depth_in.pop(0)
            if depth:
                index = 1 + (n_res + 1) * level + j
                out.update(_transformer_names(f"down_blocks.{level}.attentions.{j}", f"input_blocks.{index}.1", depth))
    out.update(_transformer_names("mid_block.attentions.0", "middle_block.1", config["transformer_depth_middle"]))
    for level, n_res in enumerate(reversed(res_blocks)):
        for j in range(n_res + 1):
            depth = depth_out.pop()
            if depth:
                index = (n_res + 1) * level + j
                out.update(_transformer_names(f"up_blocks.{level}.attentions.{j}", f"output_blocks.{index}.1", depth))
    return out


def key_map(kmodel, cond_stage_model):
    """kohya module name -> model parameter key (``diffusion_model.…weight`` / ``clip_l.…weight``)."""
    keys = {}
    params = {k for k, _ in kmodel.named_parameters()}
    for k in params:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            keys["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = ("unet", k)
    for dif, ldm in diffusers_to_ldm(kmodel.diffusion_model.config).items():
        keys["lora_unet_" + dif.replace(".", "_")] = ("unet", f"diffusion_model.{ldm}.weight")
    te_params = {k for k, _ in cond_stage_model.named_parameters()}
    has_l = any(k.startswith("clip_l.") for k in te_params)
    for b in range(32):
        for part, kohya in CLIP_PARTS.items():
            for encoder, prefixes in (("clip_h", ("lora_te", "lora_te1")), ("clip_l", ("lora_te", "lora_te1")),
                                      ("clip_g", ("lora_te2",) if has_l else ("lora_te",))):
                k = f"{encoder}.transformer.text_model.encoder.layers.{b}.{part}.weight"
                if k in te_params:
                    for prefix in prefixes:
                        keys[f"{prefix}_text_model_encoder_layers_{b}_{kohya}"] = ("clip", k)
    return keys


def check_file_keys(tensors, kmodel, cond_stage_model):
    """-> (patches {model key: module name}, unmatched file keys, failures [(name, why)])."""
    keys = key_map(kmodel, cond_stage_model)
    params = {"unet": dict(kmodel.named_parameters()), "clip": dict(cond_stage_model.named_parameters())}
    left = set(tensors)
    patches, failures = {}, []
    for name, (where, target) in keys.items():
        up, down = f"{name}.lora_up.weight", f"{name}.lora_down.weight"
        if up not in tensors:
            continue
        left -= {up, down, f"{name}.alpha"}
        weight = params[where].get(target)
        if weight is None:
            failures.append((name, f"target {target} is not a parameter (skipped)"))
            continue
        u, d = tensors[up].flatten(1), tensors[down].flatten(1)
        if (u.shape[0], d.shape[1]) != tuple(weight.flatten(1).shape) or u.shape[1] != d.shape[0]:
            failures.append((name, f"shape {tuple(u.shape)} x {tuple(d.shape)} vs {tuple(weight.shape)}"))
            continue
        if f"{name}.alpha" not in tensors:
            failures.append((name, "no alpha"))
        patches[target] = name
    return patches, sorted(left), failures
