import logging
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*CLIPImageProcessor.*")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def images():
    from lib_charlora.demo import demo_dataset
    return demo_dataset(4, 64, trigger="sks")


def warm(host):
    """Run the host once, as a WebUI has before any training (transformers 5 installs its
    output-capturing hooks on the first call with output_hidden_states)."""
    with torch.no_grad():
        host.encode_text(["warm up"], [(64, 64, 0, 0, 64, 64)])
    return host


def snapshot(*modules):
    """Everything a training run must leave unchanged on the host's modules."""
    snap = []
    for m in modules:
        snap.append({
            "state": {k: v.detach().clone() for k, v in m.state_dict().items()},
            "dtypes": {k: (v.dtype, v.device) for k, v in m.state_dict().items()},
            "tree": [(n, id(x), type(x)) for n, x in m.named_modules()],
            "attrs": {n: sorted(x.__dict__.keys()) for n, x in m.named_modules()},
            "hooks": {n: (len(x._forward_hooks), len(x._forward_pre_hooks), len(x._backward_hooks))
                      for n, x in m.named_modules()},
            "grad": {n: p.requires_grad for n, p in m.named_parameters()},
            "training": {n: x.training for n, x in m.named_modules()},
        })
    return snap


def assert_unchanged(before, *modules):
    after = snapshot(*modules)
    for b, a in zip(before, after):
        assert b["tree"] == a["tree"], "module objects changed"
        assert b["attrs"] == a["attrs"], "module attributes changed"
        assert b["hooks"] == a["hooks"], "hooks left behind"
        assert b["dtypes"] == a["dtypes"]
        assert b["grad"] == a["grad"]
        assert b["training"] == a["training"]
        assert b["state"].keys() == a["state"].keys()
        for k in b["state"]:
            assert torch.equal(b["state"][k], a["state"][k]), f"weight {k} changed"


def fault_at(step, outcome, token):
    """A progress callback that, at ``step``, stops (and saves), cancels, or fails like an OOM."""
    def progress(p):
        if p.step == step:
            if outcome == "error":
                raise RuntimeError("CUDA out of memory (simulated)")
            token.stop(save=outcome == "stop")
    return progress


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def diffusers_log():
    handler = LogCapture()
    logger = logging.getLogger("diffusers")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)
