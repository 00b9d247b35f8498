"""Dataset intake: every messy real-world input is handled with a clear message, the rest stays usable."""
import io
import math
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lib_charlora.engine.buckets import bucket_resolutions, resize_and_crop, select_bucket
from lib_charlora.engine.dataset import (BACKGROUND, DatasetError, decode_caption, decode_image, load_folder,
                                         load_uploads, RejectedFile)


def _png(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(im, **kw):
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _photo(seed, size=(96, 80)):
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1] // 8, size[0] // 8, 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr).resize(size, Image.NEAREST)


def _bomb_png(width=30000, height=30000):
    data = bytearray(_png(Image.new("RGB", (10, 10))))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:12 + 4 + 13]))
    data[12 + 4 + 13:12 + 4 + 13 + 4] = struct.pack(">I", crc)
    return bytes(data)


def _decode(data, name="x"):
    return decode_image(data, name, max_side=1024)


# -- decoding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (_jpeg(_photo(0))[:400], "corrupt or truncated"),
    (os.urandom(2000), "not an image"),
    (b"hello, this is a text file named like a jpeg\n" * 20, "not an image"),
    (_bomb_png(), "too large to decode safely"),
])
def test_rejected_bytes(data, reason):
    with pytest.raises(RejectedFile, match=reason):
        _decode(data)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    rgb, size, notes = _decode(buf.getvalue())
    assert rgb.mode == "RGB" and size == (64, 64)
    assert rgb.getpixel((5, 5))[0] > 200 and rgb.getpixel((5, 5))[2] < 50
    assert any("animated (3 frames)" in n for n in notes)


def test_cmyk_jpeg_becomes_rgb():
    im = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # pure red in CMYK
    rgb, _, _ = _decode(_jpeg(im))
    r, g, b = rgb.getpixel((32, 32))
    assert rgb.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16bit_png_is_scaled_not_clipped():
    arr = np.zeros((64, 64), dtype=np.uint16)
    arr[:, :16], arr[:, 16:32], arr[:, 32:48], arr[:, 48:] = 0, 1000, 32768, 65535
    data = _png(Image.fromarray(arr))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    rgb, _, _ = _decode(data)
    assert [rgb.getpixel((x, 5))[0] for x in (8, 24, 40, 56)] == [0, 4, 128, 255]


def test_transparency_goes_on_neutral_grey():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 32, 64))
    rgb, _, _ = _decode(_png(rgba))
    assert rgb.getpixel((48, 10)) == BACKGROUND and rgb.getpixel((10, 10)) == (0, 0, 255)
    pal = Image.new("P", (64, 64), 1)
    pal.putpalette([255, 255, 255, 200, 30, 30] + [0] * 762)
    pal.paste(0, (0, 0, 32, 64))
    pal.info["transparency"] = 0
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    rgb, _, _ = _decode(buf.getvalue())
    assert rgb.getpixel((10, 10)) == BACKGROUND and rgb.getpixel((48, 10)) == (200, 30, 30)


def test_exif_rotation_is_applied():
    stored = Image.new("RGB", (80, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 40, 40))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    rgb, size, _ = _decode(_jpeg(stored, exif=exif.tobytes()))
    assert rgb.size == size == (40, 80)
    top, bottom = rgb.getpixel((20, 10)), rgb.getpixel((20, 70))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # upright: red on top


def test_grayscale_and_large_photo_downscaled_early():
    rgb, _, _ = _decode(_png(Image.new("L", (64, 64), 90)))
    assert rgb.getpixel((1, 1)) == (90, 90, 90)
    big = _jpeg(_photo(1, (4000, 3000)))
    rgb, size, _ = decode_image(big, "big.jpg", max_side=1024)
    assert size == (4000, 3000) and max(rgb.size) <= 1024


def test_caption_encodings():
    assert decode_caption("sks, café".encode("utf-8")) == ("sks, café", None)
    assert decode_caption(b"\xef\xbb\xbfsks, girl\n") == ("sks, girl", None)
    assert decode_caption("sks, girl".encode("utf-16")) == ("sks, girl", None)
    text, warning = decode_caption(b"sks, caf\xe9")
    assert text == "sks, café" and "Latin-1" in warning
    text, warning = decode_caption(b"first line\nsecond line\n")
    assert text == "first line" and "first is used" in warning


# -- folders and uploads -------------------------------------------------------------------------

def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_mixed_folder_reports_every_file(tmp_path):
    for i in range(6):
        _write(tmp_path / f"img{i}.png", _png(_photo(10 + i, (640, 640))))
    _write(tmp_path / "img0.txt", b"sks, red scarf")
    _write(tmp_path / "img1.caption", b"\xef\xbb\xbfsks, smiling")
    _write(tmp_path / "img2.txt", b"sks, caf\xe9")
    _write(tmp_path / "copy.png", (tmp_path / "img3.png").read_bytes())
    _write(tmp_path / "ñandú_画像.png", _png(_photo(30, (600, 600))))
    _write(tmp_path / "empty.jpg", b"")
    _write(tmp_path / "notes.jpg", b"just text\n")
    _write(tmp_path / "line.png", _png(Image.new("RGB", (1, 1000))))
    _write(tmp_path / "small.png", _png(_photo(40, (200, 300))))
    _write(tmp_path / "readme.md", b"# hi")
    _write(tmp_path / "3_pip" / "a.png", _png(_photo(50, (512, 768))))
    _write(tmp_path / "other" / "b.png", _png(_photo(51)))
    _write(tmp_path / "0_none" / "c.png", _png(_photo(52)))
    os.symlink(tmp_path, tmp_path / "2_loop")
    os.symlink(tmp_path / "y.png", tmp_path / "x.png")
    os.symlink(tmp_path / "x.png", tmp_path / "y.png")

    images, report = load_folder(str(tmp_path), resolution=512)
    fates = {f.name: f for f in report.files}
    assert set(fates) == {"img0.png", "img1.png", "img2.png", "img3.png", "img4.png", "img5.png", "copy.png",
                          "ñandú_画像.png", "empty.jpg", "notes.jpg", "line.png", "small.png", "readme.md",
                          "3_pip/a.png", "other/", "0_none/", "2_loop/", "x.png", "y.png"}
    assert "empty file" in fates["empty.jpg"].reason and "not an image" in fates["notes.jpg"].reason
    assert "too small (1x1000)" in fates["line.png"].reason
    assert "not a picture file type" in fates["readme.md"].reason
    assert "N_name" in fates["other/"].reason and "already read" in fates["2_loop/"].reason
    assert "0 repeats" in fates["0_none/"].reason
    assert "symbolic links" in fates["x.png"].reason and "symbolic links" in fates["y.png"].reason
    assert any("same file as copy.png" in w for w in fates["img3.png"].warnings)  # names are read sorted
    assert any("will be upscaled" in w for w in fates["small.png"].warnings)
    assert any("Latin-1" in w for w in fates["img2.png"].warnings)
    by_name = {im.name: im for im in images}
    assert by_name["img0.png"].caption == "sks, red scarf" and by_name["img0.png"].caption_source == "sidecar"
    assert by_name["img1.png"].caption == "sks, smiling" and by_name["img2.png"].caption == "sks, café"
    assert by_name["img4.png"].caption is None
    assert by_name["3_pip/a.png"].repeats == 3 and by_name["img4.png"].repeats == 1
    assert "ñandú_画像.png" in by_name
    assert len(images) == len(report.accepted) == 10 and report.errors == []
    assert "ñandú_画像.png" in report.text() and report.to_dict()["rejected"] == 9

    images, report = load_folder(str(tmp_path), resolution=512, drop_duplicates=True)
    assert "duplicate of copy.png" in {f.name: f for f in report.files}["img3.png"].reason


def test_near_duplicate_is_reported():
    a = _photo(7, (256, 256))
    b = a.resize((250, 250)).resize((256, 256))  # re-scaled copy: different bytes, same picture
    files = [(f"p{i}.png", _png(_photo(60 + i, (256, 256))), None) for i in range(5)]
    files += [("a.png", _png(a), "sks"), ("b.jpg", _jpeg(b), None)]
    images, report = load_uploads(files, resolution=256)
    fates = {f.name: f for f in report.files}
    assert any("near-duplicate of a.png" in w for w in fates["b.jpg"].warnings)
    assert fates["a.png"].caption_source == "given" and len(images) == 7
    assert any("20-50" in w for w in report.warnings)


def test_too_few_and_empty_and_missing_folders(tmp_path, monkeypatch):
    for i in range(3):
        _write(tmp_path / "few" / f"{i}.png", _png(_photo(i, (256, 256))))
    _, report = load_folder(str(tmp_path / "few"), resolution=256)
    assert any("only 3 usable pictures" in e for e in report.errors)
    os.makedirs(tmp_path / "empty")
    _, report = load_folder(str(tmp_path / "empty"))
    assert any("has no pictures" in e for e in report.errors)
    with pytest.raises(DatasetError, match="does not exist"):
        load_folder(str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="not a folder"):
        load_folder(str(tmp_path / "few" / "0.png"))

    def denied(path):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(DatasetError, match="not readable"):
        load_folder(str(tmp_path / "few"))


# -- buckets ----------------------------------------------------------------------------------------

def _kohya_buckets(reso, lo, hi, step):
    """kohya's documented rule, written out independently: squares + (w, area/w) pairs on the grid."""
    area = reso * reso
    out = {(math.isqrt(area) // step * step, math.isqrt(area) // step * step)}
    for w in range(lo, hi + 1, step):
        h = min(hi, area // w // step * step)
        if h >= lo:
            out |= {(w, h), (h, w)}
    return sorted(out)


@pytest.mark.parametrize("reso,lo,hi", [(512, 256, 1024), (768, 256, 1024), (1024, 512, 2048), (640, 320, 960)])
def test_bucket_table_equals_kohya_rule(reso, lo, hi):
    assert bucket_resolutions(reso, lo, hi, 64) == _kohya_buckets(reso, lo, hi, 64)
    assert all(w * h <= reso * reso for w, h in bucket_resolutions(reso, lo, hi, 64))


def test_bucket_assignment_table():
    b = bucket_resolutions(512, 256, 1024, 64)
    # (image size) -> (bucket, resized size): closest aspect ratio, scaled to cover, then cropped
    table = {(4000, 3000): ((576, 448), (597, 448)), (1000, 1000): ((512, 512), (512, 512)),
             (600, 1200): ((320, 704), (352, 704)), (3000, 4000): ((448, 576), (448, 597)),
             (1920, 1080): ((640, 384), (683, 384))}
    for (w, h), (bucket, resized) in table.items():
        got = select_bucket(w, h, b, 512)
        assert got[:2] == (bucket, resized), (w, h, got)
    # no_upscale: small pictures keep their size (rounded down to the step); large ones shrink to the area
    assert select_bucket(300, 200, b, 512, no_upscale=True)[:2] == ((256, 192), (300, 200))
    assert select_bucket(4000, 3000, b, 512, no_upscale=True)[:2] == ((512, 384), (512, 384))


def test_resize_and_crop():
    import torch
    im = _photo(3, (4000, 3000))
    out, (top, left) = resize_and_crop(im, (576, 448), (597, 448))
    assert out.size == (576, 448) and (top, left) == (0, 10)
    crops = {resize_and_crop(im, (576, 448), (597, 448), True, torch.Generator().manual_seed(s))[1] for s in range(8)}
    assert len(crops) > 1 and all(t == 0 and 0 <= l <= 21 for t, l in crops)
    same = [resize_and_crop(im, (576, 448), (597, 448), True, torch.Generator().manual_seed(3))[1] for _ in range(3)]
    assert len(set(same)) == 1


def test_colour_profiles():
    from PIL import ImageCms
    im = _photo(5, (64, 64))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buf = io.BytesIO()
    im.save(buf, format="PNG", icc_profile=srgb)
    rgb, _, notes = _decode(buf.getvalue())
    diff = np.abs(np.asarray(rgb, dtype=int) - np.asarray(im, dtype=int)).max()
    assert notes == [] and diff <= 2  # sRGB -> sRGB is (nearly) the identity
    buf = io.BytesIO()
    im.save(buf, format="PNG", icc_profile=b"not a profile at all")
    rgb, _, notes = _decode(buf.getvalue())
    assert rgb.size == (64, 64) and any("colour profile could not be applied" in n for n in notes)


def test_no_link_is_followed_out_of_the_folder(tmp_path):
    """A request names a folder; links in it must not read the server's other files into a LoRA (a caption
    file linked to a secret would land in the LoRA's metadata)."""
    root, outside = tmp_path / "pics", tmp_path / "elsewhere"
    for i in range(5):
        _write(root / f"img{i}.png", _png(_photo(60 + i, (256, 256))))
    _write(outside / "secret.png", _png(_photo(70, (256, 256))))
    _write(outside / "secret.txt", b"password=hunter2")
    _write(outside / "2_more" / "m.png", _png(_photo(71, (256, 256))))
    os.symlink(outside / "secret.png", root / "linked.png")                 # a picture outside
    os.symlink(outside / "secret.txt", root / "img0.txt")                   # a caption file outside
    os.symlink(outside / "2_more", root / "2_more")                         # a repeats folder outside
    os.symlink(root / "img1.png", root / "inside.png")                      # a link within the folder: fine
    _write(root / "3_sub" / "a.png", _png(_photo(72, (256, 256))))
    os.symlink(outside / "secret.png", root / "3_sub" / "b.png")            # outside, one level down

    images, report = load_folder(str(root), resolution=256)
    fates = {f.name: f for f in report.files}
    for name in ("linked.png", "2_more/", "3_sub/b.png"):
        assert not fates[name].accepted and "outside the folder" in fates[name].reason
    assert fates["inside.png"].accepted and fates["3_sub/a.png"].accepted
    by_name = {im.name: im for im in images}
    assert by_name["img0.png"].caption is None  # the linked caption was not read
    assert any("outside the folder" in w for w in fates["img0.png"].warnings)
    assert not any("hunter2" in (im.caption or "") for im in images)
    assert sorted(by_name) == ["3_sub/a.png", "img0.png", "img1.png", "img2.png", "img3.png", "img4.png",
                               "inside.png"]


def test_too_many_pictures_in_a_folder_stop_the_scan(tmp_path):
    from lib_charlora.engine.dataset import TooManyPictures
    for i in range(4):
        _write(tmp_path / f"{i}.png", b"not even decoded")
    with pytest.raises(TooManyPictures) as e:
        load_folder(str(tmp_path), max_pictures=3)
    assert e.value.limit == 3
    assert load_folder(str(tmp_path), max_pictures=4)[1].errors  # 4 fit the limit (and are then rejected)
