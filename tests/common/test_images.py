"""The one image decoder and folder walker (common/images.py): EXIF orientation, colour modes, files
that are not regular files, and folder links walked once each."""
from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from patchscope.common.errors import InputError
from patchscope.common.images import BadImageError, image_size, read_image, walk_images


def pattern(height: int = 6, width: int = 4) -> np.ndarray:
    """An image no flip or turn maps onto itself: every pixel differs."""
    values = np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3)
    return values * 5


def save_with_orientation(path: Path, pixels: np.ndarray, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    return path


def finishes_within(seconds: float, job, fifo: Path):
    """job() run in a thread; fails the test if it is still running after `seconds` (then a writer
    opens the FIFO, so a reader stuck in open() returns and the thread ends)."""
    box: dict = {}

    def target():
        try:
            box["value"] = job()
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"still blocked on the FIFO {fifo} after {seconds} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ----------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_like_imageops(tmp_path, orientation):
    path = save_with_orientation(tmp_path / "o.png", pattern(), orientation)
    with Image.open(path) as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    image = read_image(path)
    np.testing.assert_array_equal(image, expected)
    assert image_size(path) == (image.shape[1], image.shape[0])  # what eval's cache-free probe reports
    if orientation == 6:  # a phone's portrait photo: stored sideways, shown turned a quarter clockwise
        np.testing.assert_array_equal(image, np.rot90(pattern(), k=-1))


def test_an_orientation_that_is_no_number_leaves_the_pixels_as_stored(tmp_path):
    def le(value: int, size: int) -> bytes:
        return value.to_bytes(size, "little")

    # One IFD entry: tag 0x0112 (orientation) of type ASCII holding "ab" instead of a SHORT.
    exif = b"Exif\x00\x00II*\x00" + le(8, 4) + le(1, 2) + le(0x0112, 2) + le(2, 2) + le(3, 4) + b"ab\x00\x00" + le(0, 4)
    path = tmp_path / "e.jpg"
    Image.fromarray(pattern(16, 8)).save(path, quality=100, exif=exif)
    assert read_image(path).shape == (16, 8, 3) and image_size(path) == (8, 16)


@pytest.mark.parametrize("image, expected", [
    (Image.fromarray(np.array([[0, 32768, 65535, 257]], dtype=np.uint16)), [0, 128, 255, 1]),  # 16-bit grey
    (Image.new("L", (4, 1), 77), [77] * 4),
    (Image.new("RGBA", (4, 1), (9, 9, 9, 0)), [9] * 4),  # alpha dropped, not composited
])
def test_modes_become_8_bit_rgb(tmp_path, image, expected):
    image.save(tmp_path / "m.png")
    pixels = read_image(tmp_path / "m.png")
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 4, 3)
    assert pixels[0, :, 0].tolist() == expected and (pixels == pixels[..., :1]).all()


def test_palette_with_transparency_gives_its_colours_without_a_warning(tmp_path):
    palette = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), mode="P")
    palette.putpalette([200, 10, 20, 5, 150, 250, 1, 2, 3])
    palette.save(tmp_path / "p.png", transparency=bytes([0, 255, 128]))  # per-entry alpha: a tRNS chunk
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = read_image(tmp_path / "p.png")
    assert pixels[0].tolist() == [[200, 10, 20], [5, 150, 250], [1, 2, 3]]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert np.abs(read_image(tmp_path / "c.jpg").astype(int) - (255, 0, 0)).max() <= 2


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("reader", [read_image, image_size])
def test_a_fifo_named_png_is_refused_at_once(tmp_path, reader):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(BadImageError, match=r"x\.png: not a regular file: a FIFO \(named pipe\)") as caught:
        finishes_within(10, lambda: reader(fifo), fifo)
    assert isinstance(caught.value, InputError) and caught.value.path == fifo


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.mkdir(), r"not a regular file: a directory"),
    (lambda p: p.write_bytes(b""), r"empty file \(0 bytes\)"),
    (lambda p: None, "file not found"),
    (lambda p: p.write_text("no image"), "not an image file"),
])
def test_each_unreadable_file_has_one_reason(tmp_path, make, reason):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(BadImageError, match=f"x.png: {reason}"):
        read_image(path)


# ----------------------------------------------------------------------------- walking

def touch_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2)).save(path)
    return path


def test_walk_lists_files_before_subfolders_sorted_and_skips_hidden_entries(tmp_path):
    b, a_x = touch_image(tmp_path / "b.png"), touch_image(tmp_path / "a" / "x.JPG")
    touch_image(tmp_path / "._b.png")
    touch_image(tmp_path / ".cache" / "y.png")
    (tmp_path / "notes.txt").write_text("not an image")
    assert walk_images(tmp_path) == [b, a_x]
    assert walk_images(tmp_path, {".png"}) == [b]


def test_walk_follows_folder_links_but_visits_each_real_folder_once(tmp_path, caplog):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    a = touch_image(root / "a.png")
    e = touch_image(root / "sub" / "e.png")
    linked = touch_image(elsewhere / "f.png")
    (root / "loop").symlink_to(root)               # a link back to the root: a loop
    (root / "sub" / "up").symlink_to(root / "sub")  # a second loop, one level down
    (root / "twin").symlink_to(root / "sub")        # a second name for a folder already walked
    (root / "more").symlink_to(elsewhere)           # a linked dataset: followed
    with caplog.at_level(logging.WARNING, logger="patchscope.images"):
        found = walk_images(root)
    assert found == [a, root / "more" / linked.name, e]
    assert "skipped 3 linked folder(s)" in caplog.text and str(root) in caplog.text
