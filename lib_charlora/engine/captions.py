"""Captions: the trigger word first and kept in place, per-step variation with kohya's semantics.

Sources, in priority order: a caption given with the picture -> its sidecar file -> a caption
provider (the WebUI's BLIP / DeepBooru interrogators) -> a template ("photo of {trigger}").
Tags are comma-separated. ``keep_tokens`` tags at the front (the trigger is the first) never move
or drop; the rest may be shuffled and dropped per step; a whole caption may be dropped (trained
unconditionally) with ``caption_dropout``.
"""
import collections
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import ConfigError

DEFAULT_TEMPLATE = "photo of {trigger}"

# Words the base models already know well: as a trigger they fight the character's identity.
COMMON_WORDS = frozenset("""
a an and the of in on at to for with by from is are was be this that it as or not but man woman girl boy
person people child lady guy men women girls boys baby kid character photo picture image portrait art
drawing painting anime cartoon style cat dog bird horse fox wolf dragon car house tree flower sky water
red blue green yellow black white pink purple orange brown grey gray gold silver hair eyes face smile
dress shirt hat beautiful cute pretty young old big small new good best one two three love life day
night sun moon star king queen prince princess knight warrior hero angel demon robot doll
""".split())


@dataclass
class CaptionOptions:
    trigger: str = ""
    template: str = DEFAULT_TEMPLATE
    prefix: str = ""                 # tags put right after the trigger
    suffix: str = ""                 # tags put at the end
    shuffle_tags: bool = False
    keep_tokens: int = 1             # leading tags that keep their place (the trigger is the first)
    tag_dropout: float = 0.0         # per-tag drop probability (kept tags never drop)
    caption_dropout: float = 0.0     # probability of training a step with an empty caption

    def validate(self):
        if not isinstance(self.trigger, str) or "," in self.trigger or "\n" in self.trigger:
            raise ConfigError("trigger", "must be a single tag: no commas or line breaks")
        try:
            self.template.format(trigger="x")
        except (KeyError, ValueError, IndexError) as e:
            raise ConfigError("caption_template", f"may only use the placeholder {{trigger}} ({e})") from e
        if not isinstance(self.keep_tokens, int) or not 0 <= self.keep_tokens <= 32:
            raise ConfigError("keep_tokens", f"must be an integer from 0 to 32, got {self.keep_tokens!r}")
        for name in ("tag_dropout", "caption_dropout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ConfigError(name, f"must be a number from 0 to below 1, got {v!r}")
        return self


def split_tags(caption):
    return [t.strip() for t in caption.split(",") if t.strip()]


def with_trigger_first(caption, trigger, prefix="", suffix=""):
    """Put ``trigger`` (and the prefix tags) first, once; append the suffix tags."""
    tags = split_tags(caption)
    if trigger and not (tags and re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", tags[0], re.IGNORECASE)):
        # unless the first tag already names the trigger ("photo of pipchr"), it goes first, once
        tags = [t for t in tags if t.lower() != trigger.lower()]
        tags.insert(0, trigger)
    head = 1 if trigger else 0
    extra = [t for t in split_tags(prefix) if t not in tags]
    tags[head:head] = extra
    tags += [t for t in split_tags(suffix) if t not in tags]
    return ", ".join(tags)


def base_caption(given, sidecar, image, options, provider: Optional[Callable] = None):
    """-> (caption with the trigger first, source name)."""
    if given is not None and given.strip():
        text, source = given, "given"
    elif sidecar is not None and sidecar.strip():
        text, source = sidecar, "sidecar"
    else:
        text = provider(image) if provider is not None else None
        if text and text.strip():
            source = "provider"
        else:
            text, source = options.template.format(trigger=options.trigger), "template"
    return with_trigger_first(text, options.trigger, options.prefix, options.suffix), source


def render(caption, options, generator):
    """The caption one training step sees (kohya's shuffle / keep_tokens / dropout semantics)."""
    if options.caption_dropout and torch.rand(1, generator=generator).item() < options.caption_dropout:
        return ""
    tags = split_tags(caption)
    keep, rest = tags[:options.keep_tokens], tags[options.keep_tokens:]
    if options.tag_dropout and rest:
        draws = torch.rand(len(rest), generator=generator).tolist()
        rest = [t for t, d in zip(rest, draws) if d >= options.tag_dropout]
    if options.shuffle_tags and len(rest) > 1:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    return ", ".join(keep + rest)


def is_static(options):
    """True when every step sees the same caption (conditioning can be cached)."""
    return not (options.shuffle_tags or options.tag_dropout or options.caption_dropout)


def tag_frequency(captions):
    counts = collections.Counter()
    for c in captions:
        counts.update(split_tags(c))
    return dict(counts)


def trigger_warnings(trigger, known_names=()):
    """Advice about a trigger word: a common word, or a name the host already uses."""
    out = []
    if not trigger:
        return ["no trigger word: the LoRA will act on every prompt; a rare word (e.g. 'pip_chr') "
                "lets you switch the character on and off"]
    words = trigger.lower().replace("_", " ").replace("-", " ").split()
    common = [w for w in words if w in COMMON_WORDS]
    if common and len(words) == len(common):
        out.append(f"the trigger '{trigger}' is a common word the model already knows; a rare made-up "
                   "word (e.g. 'pip_chr') keeps the character separate from that meaning")
    clashes = sorted({n for n in known_names if n.lower() == trigger.lower()})
    if clashes:
        out.append(f"the trigger '{trigger}' is also the name of an existing embedding or LoRA ({clashes[0]}); "
                   "prompts using it would trigger both")
    return out
