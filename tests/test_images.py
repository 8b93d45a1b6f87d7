"""Image reading: every PIL mode to the right 8-bit RGB, and the bad-image policy's pieces."""
from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data.images import (
    BadImageCounter,
    BadSample,
    SkipBadImages,
    check_bad_fraction,
    collate_skipping,
    decode_rgb,
    load_rgb,
    to_rgb,
    upright,
)
from utils.errors import DataError


def rgb(img: Image.Image) -> np.ndarray:
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out).astype(np.int64)


def saved(img: Image.Image, fmt: str) -> Image.Image:
    """``img`` written to and read back from an in-memory file of format ``fmt``."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    buf.seek(0)
    return Image.open(buf)


def test_rgb_is_unchanged():
    a = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    assert np.array_equal(rgb(Image.fromarray(a)), a)


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16B", "TIFF")])
def test_16_bit_grayscale_is_scaled_not_clipped(mode, fmt):
    values = np.random.default_rng(0).integers(0, 65536, (32, 32)).astype(np.uint16)
    img = Image.frombytes(mode, (32, 32), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    img = saved(img, fmt)
    assert img.mode.startswith("I;16") or img.mode == "I"  # Pillow < 10 opens 16-bit PNG as 32-bit "I"
    out = rgb(img)
    assert np.array_equal(out[..., 0], np.rint(values / 257.0))  # 65535 -> 255, 257 -> 1
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    assert abs(out.mean() - 127.5) < 5  # uniform noise stays mid-grey (PIL's own conversion: about 254)


def test_32_bit_integer_holds_16_bit_values():
    values = np.array([[0, 257, 65535, 70000, -5]], dtype=np.int32)
    assert rgb(Image.fromarray(values, mode="I"))[0, :, 0].tolist() == [0, 1, 255, 255, 0]


def test_float_images_in_0_1_and_0_255():
    def grey(values: list[float]) -> list[int]:
        return rgb(Image.fromarray(np.array([values], dtype=np.float32), mode="F"))[0, :, 0].tolist()

    assert grey([0.0, 0.5, 1.0]) == [0, 128, 255]
    assert grey([0.0, 100.0, 300.0]) == [0, 100, 255]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_grayscale(fmt):
    values = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    img = saved(Image.fromarray(values, mode="L"), fmt)
    out = rgb(img)
    assert np.array_equal(out[..., 0], np.asarray(img)) and np.array_equal(out[..., 2], np.asarray(img))


def test_bilevel():
    img = saved(Image.fromarray(np.array([[0, 255, 0]], dtype=np.uint8)).convert("1"), "PNG")
    assert img.mode == "1"
    assert rgb(img)[0].tolist() == [[0, 0, 0], [255, 255, 255], [0, 0, 0]]


def test_palette_and_palette_transparency():
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    assert rgb(saved(img, "PNG"))[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    img.info["transparency"] = 1  # index 1 is transparent: white, not green
    back = saved(img, "PNG")
    assert "transparency" in back.info
    assert rgb(back)[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 0, 255]]
    gif = saved(img, "GIF")
    assert gif.mode == "P" and rgb(gif)[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 0, 255]]


def test_rgba_is_composited_over_white():
    a = np.array([[[200, 0, 0, 255], [200, 0, 0, 0], [0, 0, 100, 128]]], dtype=np.uint8)
    out = rgb(saved(Image.fromarray(a, mode="RGBA"), "PNG"))
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]  # fully transparent: the hidden red does not show
    assert np.abs(out[0, 2] - np.array([127, 127, 177])).max() <= 1  # half way between blue-ish and white


def test_grayscale_with_alpha():
    a = np.array([[[10, 255], [10, 0]]], dtype=np.uint8)
    img = saved(Image.fromarray(a, mode="LA"), "PNG")
    assert img.mode == "LA"
    assert rgb(img)[0].tolist() == [[10, 10, 10], [255, 255, 255]]
    assert rgb(Image.fromarray(a, mode="LA").convert("La"))[0].tolist() == [[10, 10, 10], [255, 255, 255]]


def test_premultiplied_rgba():
    a = np.array([[[200, 100, 0, 255], [0, 0, 0, 0]]], dtype=np.uint8)
    assert rgb(Image.fromarray(a, mode="RGBA").convert("RGBa"))[0].tolist() == [[200, 100, 0], [255, 255, 255]]


def test_cmyk():
    a = np.array([[[0, 255, 255, 0], [0, 0, 0, 255], [0, 0, 0, 0]]], dtype=np.uint8)  # red, black, white
    img = saved(Image.fromarray(a, mode="CMYK"), "TIFF")
    assert img.mode == "CMYK"
    assert rgb(img)[0].tolist() == [[255, 0, 0], [0, 0, 0], [255, 255, 255]]
    jpeg = saved(Image.fromarray(np.repeat(a, 8, axis=0).repeat(8, axis=1), mode="CMYK"), "JPEG")
    assert jpeg.mode == "CMYK"
    assert np.abs(rgb(jpeg)[4, 4] - np.array([255, 0, 0])).max() <= 8  # JPEG is lossy


@pytest.mark.parametrize("mode, tolerance", [("YCbCr", 3), ("HSV", 6), ("LAB", 16)])  # 8-bit quantisation
def test_other_colour_spaces_round_trip(mode, tolerance):
    a = np.random.default_rng(2).integers(30, 220, (6, 6, 3), dtype=np.uint8)
    back = rgb(Image.fromarray(a).convert(mode))
    assert np.abs(back - a).max() <= tolerance and np.abs(back - a).mean() < 3


def test_16_bit_rgb_png():
    a = (np.random.default_rng(3).integers(0, 256, (4, 4, 3)) * 257).astype(">u2")
    raw = Image.frombytes("RGB", (4, 4), a.tobytes(), "raw", "RGB;16B")
    assert rgb(saved(raw, "PNG")).max() > 200  # read as 8 bits, not clipped to white


# EXIF orientation tag -> the stored pixels (H, W, 3) as a viewer shows them
AS_SHOWN = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
            5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
            7: lambda a: np.rot90(a, 2).transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}


def tagged_png(pixels: np.ndarray, orientation) -> io.BytesIO:
    """A PNG of ``pixels`` whose EXIF block holds ``orientation`` (raw bytes: written as they are)."""
    exif = orientation
    if isinstance(orientation, int):
        exif = Image.Exif()
        exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", exif=exif)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("orientation", sorted(AS_SHOWN))
def test_exif_orientation_turns_the_image_only_where_asked(orientation):
    a = np.random.default_rng(orientation).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    shown = decode_rgb(tagged_png(a, orientation), "tagged.png", exif_orientation=True)
    assert np.array_equal(np.asarray(shown), AS_SHOWN[orientation](a))
    assert np.array_equal(np.asarray(decode_rgb(tagged_png(a, orientation), "tagged.png")), a)  # datasets
    assert np.array_equal(np.asarray(to_rgb(upright(Image.open(tagged_png(a, orientation))))), AS_SHOWN[orientation](a))


@pytest.mark.parametrize("exif", [0, 9, b"Exif\x00\x00not a tiff header"], ids=["zero", "nine", "damaged"])
def test_an_unknown_orientation_keeps_the_stored_pixels(exif):
    a = np.random.default_rng(0).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(decode_rgb(tagged_png(a, exif), "tagged.png", exif_orientation=True)), a)


@functools.lru_cache(maxsize=None)
def photo(width: int, height: int, fmt: str) -> bytes:
    """A smooth photo-like image with noise, as a file of format ``fmt``."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(xx / 40.0), np.cos(yy / 30.0), np.sin((xx + yy) / 70.0)], -1) * 90 + 128
    pixels = np.clip(base + np.random.default_rng(0).normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("draft,size", [(496, (1000, 750)), (300, (500, 375)), (180, (500, 375)),
                                        (800, (2000, 1500)), (None, (2000, 1500))])
def test_a_large_jpeg_is_decoded_at_the_smallest_scale_that_keeps_the_draft_size(draft, size):
    """At 1/2 or 1/4 of its size, never 1/8 (each 8x8 block's mean alone: about 2 levels off)."""
    img = decode_rgb(io.BytesIO(photo(2000, 1500, "JPEG")), "photo.jpg", draft=draft)
    assert img.mode == "RGB" and img.size == size
    full = decode_rgb(io.BytesIO(photo(2000, 1500, "JPEG")), "photo.jpg").resize((100, 75), Image.BICUBIC)
    diff = np.abs(np.asarray(img.resize((100, 75), Image.BICUBIC)).astype(int) - np.asarray(full).astype(int))
    assert diff.mean() < 1.0  # pixel levels: shrunk 2x or more further (as --predict does), the same picture
    assert decode_rgb(io.BytesIO(photo(2000, 1500, "PNG")), "photo.png", draft=draft).size == (2000, 1500)  # JPEG only


def test_the_bomb_limit_applies_to_the_pixels_a_reduced_jpeg_decode_makes(monkeypatch):
    """A 200-megapixel phone photo, scaled down to 12000 pixels under a limit of 1000 (refused
    over 2000): at 1/4 scale it decodes; at full size, at 1/2, or as a PNG it stays refused."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    jpeg, png = photo(120, 100, "JPEG"), photo(120, 100, "PNG")
    assert decode_rgb(io.BytesIO(jpeg), "big.jpg", draft=12).size == (30, 25)  # 750 pixels decoded
    for data, draft in ((jpeg, None), (jpeg, 40), (png, 12)):  # 12000, 3000 and 12000 pixels decoded
        with pytest.raises(DataError, match=r"big.jpg: Image size \(\d+ pixels.*MAX_IMAGE_PIXELS"):
            decode_rgb(io.BytesIO(data), "big.jpg", draft=draft)


def test_unreadable_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="broken.jpg") as caught:
        load_rgb(str(bad))
    # the file named once, without Pillow's name for its stream object
    assert str(caught.value) == (f"cannot read image {bad}: cannot identify image file (not an image, or a kind "
                                 f"this Pillow does not read)")
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match="cut.png"):
        load_rgb(str(cut))
    with pytest.raises(DataError, match="missing.png"):
        load_rgb(str(tmp_path / "missing.png"))
    assert load_rgb(str(good)).getpixel((0, 0)) == (1, 2, 3)


def test_decompression_bomb_names_the_file(monkeypatch):
    buf = io.BytesIO()
    Image.new("L", (100, 100)).save(buf, format="PNG")
    buf.seek(0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="bomb.png.*MAX_IMAGE_PIXELS"):
        decode_rgb(buf, "bomb.png")


class Items(torch.utils.data.Dataset):
    """Sample i is (tensor [i], i), except the listed indices, whose image cannot be read."""

    def __init__(self, bad: set[int]) -> None:
        self.bad = bad

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        if i in self.bad:
            raise DataError(f"cannot read image /data/{i}.jpg: broken")
        return torch.tensor([float(i)]), i


def test_skip_policy_costs_one_sample_and_one_log_line(caplog):
    data = SkipBadImages(Items({2}))
    assert isinstance(data[2], BadSample) and "/data/2.jpg" in data[2].reason
    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=collate_skipping)
    counter = BadImageCounter(loader, rank=1)
    with caplog.at_level("WARNING", logger="dvt.train"):
        batches = list(counter)
    assert counter.count == 1 and len(counter) == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "rank 1" in lines[0] and "/data/2.jpg" in lines[0]
    (x0, y0), (x1, y1) = batches
    assert y0.tolist() == [0, 1, 0] and y1.tolist() == [3, 4, 5]  # the batch keeps its size
    images, targets, reasons = collate_skipping([data[i] for i in range(3)], fill=False)
    assert targets.tolist() == [0, 1] and len(reasons) == 1  # evaluation drops it instead
    with pytest.raises(DataError, match="every image of a batch"):
        collate_skipping([data[2], data[2]])


def test_bad_fraction_limit():
    check_bad_fraction(1, 100, 0.01)
    with pytest.raises(DataError, match="2 of the 100 training images.*--bad-images-max-fraction 0.01"):
        check_bad_fraction(2, 100, 0.01)


def test_uint8_batches_are_normalised_on_the_device_as_in_the_workers():
    from torchvision import transforms

    from utils.data.transforms import DeviceNormalize
    from utils.train.rng import seed_all

    imgs = [Image.fromarray(np.random.default_rng(k).integers(0, 256, (8, 8, 3), dtype=np.uint8)) for k in range(2)]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    host = torch.stack([transforms.Normalize(mean, std)(transforms.ToTensor()(im)) for im in imgs])
    batch = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in imgs])
    assert torch.allclose(DeviceNormalize(mean, std)(batch), host, atol=1e-6)
    erase = DeviceNormalize(mean, std, re_prob=1.0)
    seed_all(3)  # as the training loop before every step
    first = erase(batch)
    seed_all(3)
    assert torch.equal(erase(batch), first) and not torch.allclose(first, host)  # seeded: the same erasing
