"""Dataset intake: real-world pictures -> decoded RGB images + captions, with a report on every file.

Sources are a folder (top-level images, and kohya-style ``N_name`` sub-folders read as N repeats)
or uploaded files (bytes + original name). Every file ends up in the report as accepted (maybe
with warnings) or rejected with the reason; nothing is skipped silently. Decoding applies EXIF
orientation, converts every Pillow mode to RGB correctly (alpha composited on neutral grey, 16-bit
scaled, CMYK and embedded ICC profiles converted to sRGB), refuses decompression bombs before
decoding, and downscales large pictures during decoding, so memory stays bounded.
"""
import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from .errors import CharLoraError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
CAPTION_EXTENSIONS = (".txt", ".caption")
MAX_PIXELS = 100_000_000          # refuse before decoding: a 10000 x 10000 picture is the most we read
MIN_SIDE = 64                     # shorter side below this is useless for training
MAX_ASPECT = 4.0                  # beyond this the picture is mostly cropped away
MIN_IMAGES, RECOMMENDED_IMAGES = 5, 15
BACKGROUND = (127, 127, 127)      # neutral grey behind transparent pixels
_REPEATS_DIR = re.compile(r"^(\d+)_(.*)$")  # kohya: the number before the first "_"


class DatasetError(CharLoraError):
    """The dataset cannot be used; ``report`` says why, per file."""

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


@dataclass
class FileReport:
    name: str
    accepted: bool
    reason: Optional[str] = None          # why it was rejected
    warnings: list = field(default_factory=list)
    size: Optional[tuple] = None          # (width, height) as stored, after EXIF rotation
    caption_source: Optional[str] = None  # "given", "sidecar", "template"


@dataclass
class IntakeReport:
    files: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    @property
    def accepted(self):
        return [f for f in self.files if f.accepted]

    @property
    def rejected(self):
        return [f for f in self.files if not f.accepted]

    def to_dict(self):
        return {"accepted": len(self.accepted), "rejected": len(self.rejected), "errors": list(self.errors),
                "warnings": list(self.warnings),
                "files": [{"name": f.name, "accepted": f.accepted, "reason": f.reason, "warnings": list(f.warnings),
                           "size": list(f.size) if f.size else None, "caption_source": f.caption_source}
                          for f in self.files]}

    def text(self):
        lines = [f"{len(self.accepted)} pictures accepted, {len(self.rejected)} rejected"]
        lines += [f"error: {e}" for e in self.errors] + [f"warning: {w}" for w in self.warnings]
        for f in self.files:
            state = "ok      " if f.accepted else "REJECTED"
            detail = f.reason or ""
            if f.warnings:
                detail = "; ".join(([detail] if detail else []) + f.warnings)
            lines.append(f"  {state} {f.name}" + (f" — {detail}" if detail else ""))
        return "\n".join(lines)


@dataclass
class DatasetImage:
    """One accepted picture: RGB, at most ``max_side`` pixels on its longer side."""
    name: str
    image: Image.Image
    original_size: tuple                 # (width, height) before downscaling, after EXIF rotation
    caption: Optional[str]
    caption_source: Optional[str]
    repeats: int = 1
    sha256: str = ""
    dhash: int = 0


# -- decoding ------------------------------------------------------------------------------------

class RejectedFile(Exception):
    pass


def _to_8bit(arr):
    arr = arr.astype(np.float64)
    top = 65535.0 if arr.max(initial=0) > 255 else 255.0
    return np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)


def _flatten_alpha(im):
    rgba = im.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def _apply_icc(im, notes):
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "CMYK", "RGBA", "L"):
        return im
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if im.mode == "RGBA":
            alpha = im.getchannel("A")
            rgb = ImageCms.profileToProfile(im.convert("RGB"), src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            rgb.putalpha(alpha)
            return rgb
        return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception as e:  # a broken profile must not cost the picture
        notes.append(f"its colour profile could not be applied ({type(e).__name__}); colours may be off")
        return im


def to_rgb(im, notes):
    """Any Pillow image -> RGB, the way a person would expect it to look."""
    im = _apply_icc(im, notes)
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_to_8bit(np.asarray(im)), "L").convert("RGB")
    if mode == "P":
        return _flatten_alpha(im) if "transparency" in im.info else im.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _flatten_alpha(im)
    if mode == "RGB":
        return im
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(source, name, max_side=2048, max_pixels=MAX_PIXELS):
    """Decode a file (path or bytes) -> (RGB image at most ``max_side`` px, original (w, h), notes).

    Raises ``RejectedFile`` with a user-facing reason.
    """
    notes = []
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise RejectedFile("empty file (0 bytes)")
        fp = io.BytesIO(source)
    else:
        try:
            if os.path.getsize(source) == 0:
                raise RejectedFile("empty file (0 bytes)")
        except OSError as e:
            raise RejectedFile(f"cannot be read ({e.strerror or e})") from e
        fp = source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
            w, h = im.size
            if w * h > max_pixels:
                raise RejectedFile(f"too large to decode safely ({w}x{h} = {w * h / 1e6:.0f} megapixels; "
                                   f"the limit is {max_pixels / 1e6:.0f})")
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                notes.append(f"animated ({frames} frames): only the first frame is used")
                im.seek(0)
            if im.format == "JPEG":
                im.draft("RGB" if im.mode != "CMYK" else im.mode, (max_side, max_side))  # decode at 1/2..1/8 scale
            im.load()
    except RejectedFile:
        raise
    except UnidentifiedImageError as e:
        raise RejectedFile("not an image, or a format Pillow cannot read") from e
    except Image.DecompressionBombError as e:
        raise RejectedFile(f"too large to decode safely ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise RejectedFile(f"corrupt or truncated image ({e})") from e
    try:
        exif_orientation = im.getexif().get(0x0112, 1)
    except Exception:
        exif_orientation = 1
    if exif_orientation not in (1, None):
        im = ImageOps.exif_transpose(im)
    # the size the picture had, upright (draft() may have decoded it smaller)
    orig = (w, h) if exif_orientation in (1, 2, 3, 4, None) else (h, w)
    rgb = to_rgb(im, notes)
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.LANCZOS, reducing_gap=3.0)
    return rgb, orig, notes


def dhash(image, size=8):
    """64-bit difference hash: near-identical pictures differ in few bits."""
    g = np.asarray(image.convert("L").resize((size + 1, size), Image.BILINEAR), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


# -- captions --------------------------------------------------------------------------------------

def decode_caption(data):
    """Caption bytes -> (text, warning or None). BOMs are honoured; non-UTF-8 is read as Latin-1."""
    warning = None
    if data.startswith(b"\xef\xbb\xbf"):
        text = data[3:].decode("utf-8", errors="replace")
    elif data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = data.decode("utf-16", errors="replace")
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
            warning = "caption file is not UTF-8; read as Latin-1"
    lines = [ln.strip() for ln in text.replace("\r\n", "\n").split("\n") if ln.strip()]
    if len(lines) > 1:
        warning = (warning + "; " if warning else "") + "caption file has several lines; the first is used"
    return (lines[0] if lines else ""), warning


def _sidecar(path):
    stem = os.path.splitext(path)[0]
    for ext in CAPTION_EXTENSIONS:
        if os.path.isfile(stem + ext):
            return stem + ext
    return None


# -- intake ------------------------------------------------------------------------------------------

@dataclass
class _Item:
    name: str
    source: object            # path or bytes
    caption: Optional[str]
    caption_source: Optional[str]
    repeats: int = 1
    caption_warning: Optional[str] = None


def _intake(items, report, resolution, max_side, drop_duplicates, max_pixels=MAX_PIXELS):
    images, by_sha, hashes = [], {}, []
    for it in items:
        try:
            rgb, orig, notes = decode_image(it.source, it.name, max_side, max_pixels)
        except RejectedFile as e:
            report.files.append(FileReport(it.name, False, str(e)))
            continue
        raw = it.source if isinstance(it.source, (bytes, bytearray)) else None
        if raw is None:
            with open(it.source, "rb") as f:
                sha = hashlib.sha256(f.read()).hexdigest()
        else:
            sha = hashlib.sha256(raw).hexdigest()
        w, h = orig
        if min(w, h) < MIN_SIDE:
            report.files.append(FileReport(it.name, False, f"too small ({w}x{h}); the shorter side must be at "
                                                           f"least {MIN_SIDE} pixels", size=orig))
            continue
        if it.caption_warning:
            notes.append(it.caption_warning)
        if min(w, h) < resolution:
            notes.append(f"smaller than the training resolution ({w}x{h} < {resolution}): will be upscaled")
        if max(w, h) / min(w, h) > MAX_ASPECT:
            notes.append(f"extreme aspect ratio ({max(w, h) / min(w, h):.1f}:1): much of it will be cropped away")
        if sha in by_sha:
            if drop_duplicates:
                report.files.append(FileReport(it.name, False, f"duplicate of {by_sha[sha]}", size=orig))
                continue
            notes.append(f"same file as {by_sha[sha]}")
        else:
            dh = dhash(rgb)
            near = next((n for n, d in hashes if bin(d ^ dh).count("1") <= 4), None)
            if near is not None:
                if drop_duplicates:
                    report.files.append(FileReport(it.name, False, f"near-duplicate of {near}", size=orig))
                    continue
                notes.append(f"near-duplicate of {near}")
            hashes.append((it.name, dh))
            by_sha[sha] = it.name
        images.append(DatasetImage(it.name, rgb, orig, it.caption, it.caption_source, it.repeats, sha,
                                   hashes[-1][1] if hashes else 0))
        report.files.append(FileReport(it.name, True, None, notes, orig, it.caption_source))
    n = len(images)
    if n < MIN_IMAGES:
        report.errors.append(f"only {n} usable picture{'s' if n != 1 else ''}; at least {MIN_IMAGES} are needed "
                             "(20-50 varied pictures of the character work best)")
    elif n < RECOMMENDED_IMAGES:
        report.warnings.append(f"{n} usable pictures; 20-50 varied pictures of the character work best")
    return images


class TooManyPictures(DatasetError):
    def __init__(self, count, limit):
        super().__init__(f"the folder has more than {limit} pictures")
        self.count, self.limit = count, limit


def _inside(root, path):
    """Whether ``path``, its links resolved, is ``root`` or inside it."""
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def load_folder(path, resolution=512, max_side=None, drop_duplicates=False, max_pixels=MAX_PIXELS,
                max_pictures=None):
    """Read a folder: its images (with ``.txt`` / ``.caption`` sidecars) and ``N_name`` sub-folders
    (N repeats, as kohya). Only pictures and their caption files are read, and no link is followed out of
    the folder. Returns (images, report); raises ``DatasetError`` if the folder cannot be read, and
    ``TooManyPictures`` past ``max_pictures`` (before decoding any)."""
    max_side = max_side or max(1024, 2 * resolution)
    if not os.path.exists(path):
        raise DatasetError(f"the folder {path} does not exist")
    if not os.path.isdir(path):
        raise DatasetError(f"{path} is not a folder")
    report = IntakeReport()
    root = os.path.realpath(path)
    items, seen_dirs = [], {root}

    def scan(directory, prefix, repeats):
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except PermissionError as e:
            raise DatasetError(f"the folder {directory} is not readable ({e.strerror})") from e
        except OSError as e:
            raise DatasetError(f"the folder {directory} cannot be read ({e.strerror or e})") from e
        subdirs = []
        for entry in entries:
            shown = prefix + entry.name
            try:
                is_dir = entry.is_dir()
                is_file = entry.is_file()
            except OSError as e:
                report.files.append(FileReport(shown, False, f"cannot be read ({e.strerror or e})"))
                continue
            if (is_dir or is_file) and entry.is_symlink() and not _inside(root, entry.path):
                report.files.append(FileReport(shown + ("/" if is_dir else ""), False,
                                               "not read: a link to outside the folder"))
                continue
            if is_dir:
                subdirs.append(entry)
                continue
            ext = os.path.splitext(entry.name)[1].lower()
            if ext in CAPTION_EXTENSIONS:
                continue  # read with its picture; an orphan caption is reported below
            if not is_file:
                report.files.append(FileReport(shown, False, "not a regular file (broken link or link loop?)"))
                continue
            if ext not in IMAGE_EXTENSIONS:
                report.files.append(FileReport(shown, False, f"not a picture file type ({ext or 'no extension'})"))
                continue
            caption, source, warning = None, None, None
            side = _sidecar(entry.path)
            if side and not _inside(root, side):
                side, warning = None, "its caption file links to outside the folder: not read"
            if side:
                try:
                    with open(side, "rb") as f:
                        caption, warning = decode_caption(f.read())
                    source = "sidecar"
                except OSError as e:
                    warning = f"caption file {os.path.basename(side)} cannot be read ({e.strerror or e})"
            items.append(_Item(shown, entry.path, caption, source, repeats, warning))
            if max_pictures is not None and len(items) > max_pictures:
                raise TooManyPictures(len(items), max_pictures)
        return subdirs

    for sub in scan(path, "", 1):
        m = _REPEATS_DIR.match(sub.name)
        if not m:
            report.files.append(FileReport(sub.name + "/", False, "sub-folder not read: only kohya-style "
                                                                  "'N_name' folders (N = repeats) are used"))
            continue
        if int(m.group(1)) < 1:
            report.files.append(FileReport(sub.name + "/", False, "sub-folder not read: 0 repeats"))
            continue
        real = os.path.realpath(sub.path)
        if real in seen_dirs:
            report.files.append(FileReport(sub.name + "/", False, "sub-folder not read: it links to a folder "
                                                                  "that is already read"))
            continue
        seen_dirs.add(real)
        for deeper in scan(sub.path, sub.name + "/", int(m.group(1))):
            report.files.append(FileReport(f"{sub.name}/{deeper.name}/", False,
                                           "sub-folder not read: folders are read one level deep"))
    images = _intake(items, report, resolution, max_side, drop_duplicates, max_pixels)
    if not items and not report.files:
        report.errors.insert(0, f"the folder {path} has no pictures ({', '.join(IMAGE_EXTENSIONS)})")
    return images, report


def load_uploads(files, resolution=512, max_side=None, drop_duplicates=False, max_pixels=MAX_PIXELS):
    """``files``: [(original name, bytes, caption or None)] -> (images, report)."""
    max_side = max_side or max(1024, 2 * resolution)
    report = IntakeReport()
    items = []
    for name, data, caption in files:
        items.append(_Item(name, bytes(data), caption, "given" if caption is not None else None))
    images = _intake(items, report, resolution, max_side, drop_duplicates, max_pixels)
    return images, report
