"""Captions: sources in priority order, trigger first, kohya's per-step variation, statistics, advice."""
import pytest
import torch
from PIL import Image

from lib_charlora.engine import ConfigError
from lib_charlora.engine import captions as cap

OPTS = cap.CaptionOptions(trigger="pipchr")
IMG = Image.new("RGB", (8, 8))


def test_sources_in_priority_order():
    provider = lambda image: "a girl, red scarf"  # noqa: E731
    assert cap.base_caption("given, tags", "side", IMG, OPTS, provider) == ("pipchr, given, tags", "given")
    assert cap.base_caption(None, "side car", IMG, OPTS, provider) == ("pipchr, side car", "sidecar")
    assert cap.base_caption("  ", "", IMG, OPTS, provider) == ("pipchr, a girl, red scarf", "provider")
    assert cap.base_caption(None, None, IMG, OPTS, lambda image: "") == ("photo of pipchr", "template")
    assert cap.base_caption(None, None, IMG, cap.CaptionOptions(trigger="pipchr", template="{trigger}")) == \
        ("pipchr", "template")


def test_trigger_first_once_with_prefix_and_suffix():
    assert cap.with_trigger_first("smiling, PipChr, outdoors", "pipchr") == "pipchr, smiling, outdoors"
    assert cap.with_trigger_first("smiling", "pipchr", prefix="1girl", suffix="masterpiece, smiling") == \
        "pipchr, 1girl, smiling, masterpiece"
    assert cap.with_trigger_first("a, b", "") == "a, b"
    assert cap.with_trigger_first("photo of PipChr, smiling", "pipchr") == "photo of PipChr, smiling"
    assert cap.with_trigger_first("pipchrs, smiling", "pipchr") == "pipchr, pipchrs, smiling"


def test_render_keeps_leading_tags_and_is_seeded():
    caption = "pipchr, 1girl, a, b, c, d, e, f"
    opts = cap.CaptionOptions(trigger="pipchr", shuffle_tags=True, keep_tokens=2, tag_dropout=0.3)
    runs = [[cap.render(caption, opts, g) for _ in range(20)]
            for g in (torch.Generator().manual_seed(1), torch.Generator().manual_seed(1),
                      torch.Generator().manual_seed(2))]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    for text in runs[0]:
        tags = cap.split_tags(text)
        assert tags[:2] == ["pipchr", "1girl"] and set(tags[2:]) <= set("abcdef")
    assert len({r for r in runs[0]}) > 5                     # shuffled and dropped differently per step
    assert any(len(cap.split_tags(r)) < 8 for r in runs[0])  # some tags dropped
    static = cap.CaptionOptions(trigger="pipchr")
    assert cap.is_static(static) and not cap.is_static(opts)
    assert cap.render(caption, static, torch.Generator()) == caption


def test_caption_dropout_rate():
    opts = cap.CaptionOptions(trigger="p", caption_dropout=0.25)
    g = torch.Generator().manual_seed(0)
    empty = sum(cap.render("p, a, b", opts, g) == "" for _ in range(2000))
    assert 400 < empty < 600


@pytest.mark.parametrize("kw,field", [({"trigger": "a, b"}, "trigger"), ({"keep_tokens": -1}, "keep_tokens"),
                                      ({"tag_dropout": 1.0}, "tag_dropout"), ({"caption_dropout": "x"}, "caption_dropout"),
                                      ({"template": "photo of {name}"}, "caption_template")])
def test_bad_options(kw, field):
    with pytest.raises(ConfigError) as e:
        cap.CaptionOptions(**{"trigger": "p", **kw}).validate()
    assert e.value.field == field


def test_tag_frequency_and_trigger_advice():
    assert cap.tag_frequency(["p, red scarf", "p, smiling, red scarf", ""]) == {"p": 2, "red scarf": 2, "smiling": 1}
    assert any("common word" in w for w in cap.trigger_warnings("girl"))
    assert any("common word" in w for w in cap.trigger_warnings("red_dress"))
    assert cap.trigger_warnings("pipchr") == []
    assert cap.trigger_warnings("ohwx girl") == []  # a rare token plus a class word is the usual advice
    assert any("existing embedding or LoRA (PipChr)" in w for w in cap.trigger_warnings("pipchr", ["PipChr", "x"]))
    assert any("no trigger word" in w for w in cap.trigger_warnings(""))
