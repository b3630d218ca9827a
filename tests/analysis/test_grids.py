"""The shared grid renderer: exact layout, nearest enlargement, labels, captions, frames and clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from patchscope.analysis.grids import (BACKGROUND, GAP, HIGHLIGHT, MIN_TILE, ColourBar, colour_lut, grid_layout, image_grid,
                            save_grid, to_uint8)
from patchscope.common.errors import InputError


def _tiles(rows: int, cols: int, height: int = 32, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (rows, cols, height, width, 3), dtype=np.uint8)


def _crop(image: Image.Image, x: int, y: int, width: int, height: int) -> np.ndarray:
    return np.asarray(image)[y:y + height, x:x + width]


def test_grid_without_labels_is_exactly_the_tiles_and_gaps():
    grid = image_grid(_tiles(2, 3))
    side = MIN_TILE  # 32 px tiles are enlarged 4x by default
    assert grid.size == (GAP + 3 * (side + GAP), GAP + 2 * (side + GAP))
    assert grid.mode == "RGB"


def test_every_tile_is_enlarged_with_nearest_and_drawn_at_its_layout_origin():
    tiles = _tiles(2, 3)
    options = dict(row_labels=["k = -1", "k = +1"], col_labels=["a", "b", "c"], title="a title",
                   captions=[["P(fake) 0.93"] * 3, ["x", None, "two\nlines"]])
    grid = image_grid(tiles, **options)
    layout = grid_layout(2, 3, 128, 128, **options)
    assert grid.size == (layout.width, layout.height)
    for r in range(2):
        for c in range(3):
            x, y = layout.tile_origin(r, c)
            expected = np.repeat(np.repeat(tiles[r, c], 4, axis=0), 4, axis=1)
            np.testing.assert_array_equal(_crop(grid, x, y, 128, 128), expected)


def test_row_labels_widen_and_column_labels_heighten_the_grid_only():
    plain = image_grid(_tiles(2, 2))
    with_rows = image_grid(_tiles(2, 2), row_labels=["first row", "second row"])
    with_cols = image_grid(_tiles(2, 2), col_labels=["original", "finetuned"])
    assert with_rows.height == plain.height and with_rows.width > plain.width
    assert with_cols.width == plain.width and with_cols.height > plain.height
    layout = grid_layout(2, 2, 128, 128, row_labels=["first row", "second row"])
    assert with_rows.width == plain.width + layout.left


def test_captions_are_drawn_under_the_tiles_and_leave_the_tiles_alone():
    tiles = _tiles(1, 2)
    first = image_grid(tiles, captions=[["P(fake) 0.93", "P(fake) 0.12"]])
    second = image_grid(tiles, captions=[["P(fake) 0.05", "P(fake) 0.12"]])
    uncaptioned = image_grid(tiles)
    assert first.size == second.size and first.height > uncaptioned.height
    layout = grid_layout(1, 2, 128, 128, captions=[["P(fake) 0.93", "P(fake) 0.12"]])
    x, y = layout.tile_origin(0, 0)
    band = lambda img: _crop(img, x, y + 128, 128, layout.caption)  # noqa: E731
    assert (band(first) != BACKGROUND).any()  # the text is there
    assert (band(first) != band(second)).any()  # and it is the caption's text
    np.testing.assert_array_equal(_crop(first, x, y, 128, 128), _crop(uncaptioned, x, y, 128, 128))


def test_tile_size_sets_the_longer_side_and_shrinks_with_a_filter():
    wide = image_grid(_tiles(1, 1, height=16, width=32), tile_size=64)
    assert wide.size == (GAP + 64 + GAP, GAP + 32 + GAP)
    big = image_grid(_tiles(1, 1, height=256, width=256), tile_size=64)
    assert big.size == (GAP + 64 + GAP, GAP + 64 + GAP)
    unchanged = image_grid(_tiles(1, 1, height=200, width=200))
    assert unchanged.size == (GAP + 200 + GAP, GAP + 200 + GAP)


def test_highlighted_column_is_framed_in_the_gap_and_others_are_not():
    grid = np.asarray(image_grid(_tiles(2, 3), highlight_col=1))
    layout = grid_layout(2, 3, 128, 128)
    for r in range(2):
        x, y = layout.tile_origin(r, 1)
        assert tuple(grid[y - 2, x + 60]) == HIGHLIGHT and tuple(grid[y + 60, x + 128 + 1]) == HIGHLIGHT
        x0, y0 = layout.tile_origin(r, 0)
        assert tuple(grid[y0 + 60, x0 - 2]) == BACKGROUND


def test_a_title_wider_than_the_tiles_widens_the_canvas():
    narrow = image_grid(_tiles(1, 1))
    titled = image_grid(_tiles(1, 1), title="a rather long title that is wider than one tile of the grid")
    assert titled.width > narrow.width


def test_colour_bar_runs_from_vmax_at_the_top_to_vmin_at_the_bottom():
    bar = ColourBar(cmap="jet")
    grid = np.asarray(image_grid(_tiles(1, 2), colour_bar=bar))
    layout = grid_layout(1, 2, 128, 128, colour_bar=bar)
    x = layout.tile_origin(0, 2)[0] + 6 + 9  # the middle of the bar, right of the last column
    _, y = layout.tile_origin(0, 0)
    lut = colour_lut("jet")
    np.testing.assert_array_equal(grid[y, x], lut[255])
    np.testing.assert_array_equal(grid[y + 127, x], lut[0])


def test_nested_lists_tensors_and_blank_tiles_are_accepted():
    tiles = _tiles(1, 2)
    from_lists = image_grid([[tiles[0, 0], torch.from_numpy(tiles[0, 1])]])
    np.testing.assert_array_equal(np.asarray(from_lists), np.asarray(image_grid(torch.from_numpy(tiles))))
    blank = np.asarray(image_grid([[tiles[0, 0], None]]))
    x, y = grid_layout(1, 2, 128, 128).tile_origin(0, 1)
    assert (blank[y:y + 128, x:x + 128] == BACKGROUND).all()


@pytest.mark.parametrize("images, options, message", [
    (np.zeros((2, 32, 32, 3), np.uint8), {}, "R x C x H x W x 3"),
    ([[np.zeros((8, 8, 3), np.uint8)], [np.zeros((8, 8, 3), np.uint8)] * 2], {}, "rows must be equally long"),
    ([[np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)]], {}, "differ in size"),
    ([[np.zeros((8, 8, 3), np.float32)]], {}, "expected uint8.*to_uint8"),
    ([[np.zeros((8, 8), np.uint8)]], {}, r"expected H x W x 3"),
    ([[np.zeros((8, 8, 3), np.uint8)]], {"row_labels": ["a", "b"]}, "2 row labels for 1 rows"),
    ([[np.zeros((8, 8, 3), np.uint8)]], {"col_labels": []}, "0 column labels for 1 columns"),
    ([[np.zeros((8, 8, 3), np.uint8)]], {"captions": [["a", "b"]]}, "captions must be 1 rows of 1"),
    ([[np.zeros((8, 8, 3), np.uint8)]], {"highlight_col": 1}, "outside the 1 columns"),
    ([], {}, "at least one row"),
    ([[None]], {}, "every tile is blank"),
    ([np.zeros((8, 8, 3), np.uint8)], {}, "single image"),
])
def test_bad_shapes_raise_a_clear_value_error(images, options, message):
    with pytest.raises(ValueError, match=message):
        image_grid(images, **options)


def test_to_uint8_inverts_the_dataset_scaling_exactly():
    pixels = np.arange(256, dtype=np.float32).reshape(1, 16, 16).repeat(3, axis=0)
    as_tensor = torch.from_numpy(pixels).div(127.5).sub(1.0)  # what RealFakeDataset feeds the model
    back = to_uint8(as_tensor)
    assert back.shape == (16, 16, 3) and back.dtype == np.uint8
    np.testing.assert_array_equal(back[..., 0], pixels[0].astype(np.uint8))
    batch = to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).reshape(1, 1, 1, 5).expand(2, 3, 1, 5))
    assert batch.shape == (2, 1, 5, 3)
    np.testing.assert_array_equal(batch[1, 0, :, 2], [0, 0, 128, 255, 255])  # rint(127.5) -> 128, clipped


def test_to_uint8_refuses_channels_last_input():
    with pytest.raises(ValueError, match="3 x H x W"):
        to_uint8(np.zeros((8, 8, 3)))


def test_save_grid_writes_a_png_and_refuses_other_names(tmp_path):
    path = tmp_path / "sub" / "grid.png"
    image = save_grid(path, _tiles(1, 2), col_labels=["a", "b"])
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == image.size
        np.testing.assert_array_equal(np.asarray(saved.convert("RGB")), np.asarray(image))
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary file left behind
    with pytest.raises(InputError, match="grid.jpg: expected a file name ending in .png"):
        save_grid(tmp_path / "grid.jpg", _tiles(1, 1))
