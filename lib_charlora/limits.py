"""What one request may carry, and who may read folders on the server.

Every limit is a WebUI setting (Settings -> Character LoRA); a request over one is refused with a
message naming the limit, its value and that setting. The defaults fit 20-50 phone pictures with room
to spare and keep one request from filling the WebUI's memory or disk.
"""
from dataclasses import dataclass

from .engine.errors import ConfigError

SECTION_NAME = "Settings > Character LoRA"


@dataclass(frozen=True)
class Limit:
    key: str        # the settings() key; the WebUI option is charlora_<key>
    default: int
    label: str      # the setting's label in the WebUI
    unit: str = ""
    low: int = 1
    high: int = 100_000


LIMITS = (
    Limit("max_request_mb", 1024, "Largest API request body (MB)", "MB", 1, 65536),
    Limit("max_pictures", 1000, "Most pictures in one training request", "pictures", 5, 100_000),
    Limit("max_megapixels", 100, "Largest picture (megapixels)", "megapixels", 1, 1000),
    Limit("max_caption_chars", 2000, "Longest caption (characters)", "characters", 10, 100_000),
    Limit("max_decoded_mb", 768, "Most picture data in one request, decoded (MB)", "MB", 1, 65536),
    Limit("jobs_kept", 100, "Finished jobs kept in the job list (their files stay)", "jobs", 1, 10_000),
)
BY_KEY = {limit.key: limit for limit in LIMITS}


class LimitError(ConfigError):
    """A request over a limit; ``status`` is the HTTP answer (413: too large, 422: too many / too long)."""

    def __init__(self, field, message, status=422):
        super().__init__(field, message)
        self.status = status


def values(settings):
    """The limits from a settings dict (missing or invalid values: the defaults)."""
    out = {}
    for limit in LIMITS:
        value = settings.get(limit.key, limit.default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not limit.low <= value <= limit.high:
            value = limit.default
        out[limit.key] = int(value)
    return out


def over(key, field, got, limit_value, status=422):
    """The LimitError for ``got`` over the limit ``key``."""
    limit = BY_KEY[key]
    return LimitError(field, f"{got}: over the limit of {limit_value} {limit.unit}; change it in "
                             f"{SECTION_NAME} > '{limit.label}'", status)


def folder_refusal(non_local, authenticated, allowed, channel="api"):
    """None if a server folder may be read, else why not. A WebUI reachable from the network (--listen,
    --share, --server-name, --ngrok) without credentials on this channel would let anyone who reaches it
    read the server's pictures (and their caption files) into a LoRA: refused unless allowed in Settings,
    as A1111 refuses installing extensions there unless --enable-insecure-extension-access is given."""
    if not non_local or authenticated or allowed:
        return None
    auth = "--api-auth" if channel == "api" else "--gradio-auth"
    return ("reading a folder on the server is turned off because this WebUI is reachable from the network "
            f"without {auth}; upload the pictures instead, start the WebUI with {auth}, or allow it in "
            f"{SECTION_NAME} > 'Allow training from server folders on a networked WebUI without credentials'")
