"""The training state a run resumes from (``<name>-stepNNNNNN.state``), written without pickle.

The file is a safetensors file: every tensor of the state (LoRA weights, optimizer moments, RNG
states as uint8, any tensor inside the scheduler / scaler / sampler states) under a flat key, and
everything else as JSON in the safetensors metadata, which holds three strings:

* ``format``: ``charlora-train-state`` (a marker: any other safetensors file is refused);
* ``version``: the state version that wrote the file (a reader refuses any other);
* ``state``: the state itself as JSON, where a tensor is ``{"$tensor": "<key in the file>"}``, a
  tuple ``{"$tuple": [...]}`` and a dict with keys other than strings (the optimizer's ``state`` is
  keyed by parameter index) or with keys starting with ``$`` ``{"$dict": [[key, value], ...]}``, so
  that reading gives back exactly the types ``load_state_dict`` was given when written.

Reading never unpickles: a pickled file (the ``.state`` of Character LoRA before state version 2
was a ``torch.save`` pickle) is recognised by its first bytes and refused with the reason.
"""
import json

import torch

from .errors import ConfigError

FORMAT = "charlora-train-state"
_TENSOR, _TUPLE, _DICT = "$tensor", "$tuple", "$dict"
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")   # torch.save's zip container; a plain pickle (protocol >= 2)


def _encode(value, path, tensors, seen):
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:   # safetensors refuses tensors that share memory: store a copy
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        key, n = path or "tensor", 1
        while key in tensors:
            key, n = f"{path}~{n}", n + 1
        tensors[key] = t
        return {_TENSOR: key}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, f"{path}/{k}" if path else k, tensors, seen) for k, v in value.items()}
        return {_DICT: [[_encode(k, f"{path}/key", tensors, seen),
                         _encode(v, f"{path}/{k}" if path else str(k), tensors, seen)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and type(value).__module__ == "numpy":   # a numpy scalar
        return value.item()
    raise TypeError(f"the training state holds a {type(value).__name__} at {path!r}, which the state file "
                    "cannot store")


def _decode(value, tensors):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and _TENSOR in value:
            return tensors(value[_TENSOR])
        if len(value) == 1 and _TUPLE in value:
            return tuple(_decode(v, tensors) for v in value[_TUPLE])
        if len(value) == 1 and _DICT in value:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value[_DICT]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def save(path, state, version):
    """Write ``state`` (a dict of tensors, containers and JSON scalars) to ``path`` as safetensors."""
    from safetensors.torch import save_file
    tensors = {}
    body = json.dumps(_encode(state, "", tensors, set()), allow_nan=True, separators=(",", ":"))
    save_file(tensors, path, metadata={"format": FORMAT, "version": str(version), "state": body})


def _looks_pickled(path):
    with open(path, "rb") as f:
        head = f.read(4)
    return any(head.startswith(m) for m in _PICKLE_MAGIC)


def load(path, version, field="resume_from"):
    """The state in ``path``, tensors on the CPU; a ``ConfigError(field)`` with the reason when the file
    is not a training state of ``version``. Never unpickles anything."""
    from safetensors import safe_open
    retrain = "resume it with the version of Character LoRA that wrote it, or train again"
    try:
        pickled = _looks_pickled(path)
    except OSError as e:
        raise ConfigError(field, f"{path} cannot be read ({e})") from e
    if pickled:
        raise ConfigError(field, f"{path} is a pickled file: an old training state (state version 1, from a "
                                 f"Character LoRA before state version {version}) or a foreign file. Pickled files "
                                 f"can run code when loaded and are never read; {retrain}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                found = f"format marker {meta['format']!r}" if "format" in meta else "no format marker"
                raise ConfigError(field, f"{path} is a safetensors file but not a Character LoRA training state "
                                         f"({found}, expected {FORMAT!r}); pass a checkpoint's .state file")
            if meta.get("version") != str(version):
                raise ConfigError(field, f"{path} is a training state of state version {meta.get('version')}, "
                                         f"this Character LoRA reads state version {version}; {retrain}")
            keys = set(f.keys())

            def tensor(key):
                if key not in keys:
                    raise ValueError(f"tensor {key!r} is missing")
                return f.get_tensor(key)

            state = _decode(json.loads(meta["state"]), tensor)
    except ConfigError:
        raise
    except Exception as e:   # not safetensors, truncated, damaged JSON, a missing tensor
        raise ConfigError(field, f"{path} is not a readable Character LoRA training state ({e}); an old or foreign "
                                 f"file cannot be resumed: {retrain}") from e
    if not isinstance(state, dict):
        raise ConfigError(field, f"{path} is not a readable Character LoRA training state (no state in it)")
    return state


__all__ = ["FORMAT", "save", "load"]
