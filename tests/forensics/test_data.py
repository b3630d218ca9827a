"""Specification of the real/fake data layer: listing, decoding, bad-file policy, batching, augmentation.

Images are made on the fly in tmp_path; everything is tiny so the file runs in seconds.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from patchscope.common.errors import InputError
from patchscope.forensics.data import (BadImageError, BalancedBatchSampler, ImageSet, RealFakeDataset, list_images,
                            load_split, make_loader, read_image, resize_image, set_epoch)


def pixels(seed: int, height: int = 24, width: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def normalised(image: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3 -> the float32 3 x H x W values in [-1, 1] the dataset must produce."""
    return image.transpose(2, 0, 1).astype(np.float32) / np.float32(127.5) - np.float32(1)


def save(path: Path, image: np.ndarray | Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path)
    return path


def make_folder(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (24, 24)) -> list[Path]:
    return [save(folder / f"img{i:02d}.png", pixels(seed + i, *size)) for i in range(count)]


def write_bad_files(folder: Path) -> dict[str, Path]:
    """One file for each way an image can be unreadable."""
    folder.mkdir(parents=True, exist_ok=True)
    good = save(folder / "whole.png", pixels(99, 32, 32)).read_bytes()
    files = {"zero": folder / "zero.png", "text": folder / "text.png",
             "garbage": folder / "garbage.png", "truncated": folder / "truncated.png"}
    files["zero"].write_bytes(b"")
    files["text"].write_text("this is not an image\n")
    middle = len(good) // 2  # inside the compressed pixel data: the header still identifies a PNG
    files["garbage"].write_bytes(good[:middle] + bytes(range(64)) + good[middle + 64:])
    files["truncated"].write_bytes(good[: len(good) // 2])
    (folder / "whole.png").unlink()
    return files


# ----------------------------------------------------------------------------- listing

def test_split_folders_list_the_requested_split_recursively_and_sorted(tmp_path):
    save(tmp_path / "train" / "b.png", pixels(0))
    save(tmp_path / "train" / "sub" / "a.JPG", pixels(1))
    save(tmp_path / "val" / "c.png", pixels(2))
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    save(tmp_path / "train" / "._hidden.png", pixels(3))
    assert list_images(tmp_path, "train") == [tmp_path / "train" / "b.png", tmp_path / "train" / "sub" / "a.JPG"]
    assert list_images(tmp_path, "val") == [tmp_path / "val" / "c.png"]


def test_split_layout_without_a_split_asks_for_one(tmp_path):
    make_folder(tmp_path / "train", 1)
    with pytest.raises(InputError, match="holds split folders \\(train\\); choose a split"):
        list_images(tmp_path)
    with pytest.raises(InputError, match=r"test.*no 'test' split folder \(found train\)"):
        list_images(tmp_path, "test")


def test_flat_folder_lists_all_images_whatever_the_split(tmp_path):
    paths = make_folder(tmp_path, 3)
    assert list_images(tmp_path) == paths
    assert list_images(tmp_path, "val") == paths


def test_txt_manifest_resolves_relative_paths_and_ignores_comments(tmp_path):
    a = save(tmp_path / "imgs" / "a.png", pixels(0))
    b = save(tmp_path / "elsewhere" / "b.png", pixels(1))
    manifest = tmp_path / "imgs" / "list.txt"
    manifest.write_text(f"# reals\n\na.png\n  {b}  \n")
    assert list_images(manifest) == [a, b]


def test_csv_manifest_uses_path_column_and_filters_by_split(tmp_path):
    paths = make_folder(tmp_path / "imgs", 3)
    manifest = tmp_path / "list.csv"
    manifest.write_text("label,path,split\n0,imgs/img00.png,train\n0,imgs/img01.png,test\n0,imgs/img02.png,train\n")
    assert list_images(manifest, "train") == [paths[0], paths[2]]
    assert list_images(manifest) == paths
    with pytest.raises(InputError, match=r"list\.csv: no rows with split 'val' \(splits present: test, train\)"):
        list_images(manifest, "val")


def test_csv_manifest_without_header_uses_first_column(tmp_path):
    paths = make_folder(tmp_path, 2)
    manifest = tmp_path / "list.csv"
    manifest.write_text("img01.png,whatever\nimg00.png,x\n")
    assert list_images(manifest, "train") == [paths[1], paths[0]]


def test_missing_source_is_named_with_the_accepted_layouts(tmp_path):
    with pytest.raises(InputError, match=r"nowhere: no such file or folder \(expected a folder of images"):
        list_images(tmp_path / "nowhere", "train")


def test_empty_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no images found \(expected files ending in .*\.png"):
        list_images(tmp_path / "empty")


def test_manifest_entry_that_does_not_exist_is_named(tmp_path):
    make_folder(tmp_path, 1)
    manifest = tmp_path / "list.txt"
    manifest.write_text("img00.png\nghost.png\n")
    with pytest.raises(InputError, match=r"list\.txt: 1 listed image\(s\) do not exist, e\.g\. .*ghost\.png"):
        list_images(manifest)


# ----------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("mode, value, expected", [
    ("L", 77, (77, 77, 77)),
    ("LA", (77, 0), (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
    ("RGBA", (10, 20, 30, 0), (10, 20, 30)),  # alpha is dropped, not composited
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
])
def test_colour_modes_become_rgb(tmp_path, mode, value, expected):
    path = save(tmp_path / "x.png" if mode != "CMYK" else tmp_path / "x.jpg", Image.new(mode, (5, 4), value))
    image = read_image(path)
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - expected).max() <= (2 if mode == "CMYK" else 0)  # JPEG rounding


def test_palette_image_uses_its_palette_colours(tmp_path):
    img = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="P")
    img.putpalette([200, 10, 20, 5, 150, 250])
    img.info["transparency"] = 0
    image = read_image(save(tmp_path / "p.png", img))
    assert image[0, 0].tolist() == [200, 10, 20] and image[0, 1].tolist() == [5, 150, 250]


@pytest.mark.parametrize("name, values", [
    ("g16.png", np.array([[0, 32768, 65535, 257]], dtype=np.uint16)),  # opens as I;16
    ("g32.tif", np.array([[0, 32768, 65535, 257]], dtype=np.int32)),  # opens as I
])
def test_16_bit_images_are_rescaled_not_clipped(tmp_path, name, values):
    image = read_image(save(tmp_path / name, Image.fromarray(values)))
    assert image[0, :, 0].tolist() == [0, 128, 255, 1]
    assert (image == image[..., :1]).all()


@pytest.mark.parametrize("values, expected", [([0.0, 0.5, 1.0], [0, 128, 255]), ([0.0, 100.0, 300.0], [0, 100, 255])])
def test_float_images_map_unit_range_to_8_bit(tmp_path, values, expected):
    path = save(tmp_path / "f.tif", Image.fromarray(np.array([values], dtype=np.float32)))
    assert read_image(path)[0, :, 1].tolist() == expected


@pytest.mark.parametrize("kind, reason", [
    ("zero", "empty file \\(0 bytes\\)"),
    ("text", "not an image file"),
    ("garbage", "corrupt or truncated"),
    ("truncated", "corrupt or truncated .*truncated"),
])
def test_unreadable_files_raise_bad_image_error_naming_file_and_reason(tmp_path, kind, reason):
    path = write_bad_files(tmp_path)[kind]
    with pytest.raises(BadImageError, match=f"{path.name}: {reason}") as info:
        read_image(path)
    assert info.value.path == path and isinstance(info.value, InputError)


def test_resize_sets_shorter_side_like_torchvision_resize_with_lanczos():
    image = pixels(5, 30, 41)
    resized = resize_image(image, 20)
    reference = T.Resize(20, interpolation=T.InterpolationMode.LANCZOS)(Image.fromarray(image))
    assert resized.shape == (20, 27, 3)  # int(20 * 41 / 30) = 27, torchvision's rounding
    np.testing.assert_array_equal(resized, np.asarray(reference))
    assert resize_image(pixels(5, 41, 30), 20).shape == (27, 20, 3)
    assert resize_image(image, None) is image


# ----------------------------------------------------------------------------- image sets

@pytest.mark.parametrize("cache", [True, False])
def test_bad_files_are_skipped_counted_and_named_in_one_warning(tmp_path, caplog, cache):
    good = make_folder(tmp_path, 2)
    bad = write_bad_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="patchscope.data"):
        images = ImageSet(list_images(tmp_path), on_bad_image="skip", cache=cache)
    assert images.paths == good and len(images) == 2
    assert sorted(path for path, _ in images.skipped) == sorted(bad.values())
    warnings = [r for r in caplog.records if r.name == "patchscope.data" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 4 of 6 images" in warnings[0].getMessage()
    assert all(str(path) in warnings[0].getMessage() for path in bad.values())


def test_bad_file_under_error_policy_raises_on_the_first_one(tmp_path):
    make_folder(tmp_path, 2)
    bad = write_bad_files(tmp_path)
    with pytest.raises(BadImageError, match=f"{bad['garbage']}: corrupt"):  # garbage.png sorts first
        ImageSet(list_images(tmp_path), on_bad_image="error")


@pytest.mark.parametrize("policy", ["skip", "error"])
@pytest.mark.parametrize("cache", [True, False])
def test_image_below_min_size_raises_whatever_the_policy(tmp_path, policy, cache):
    paths = [save(tmp_path / "big.png", pixels(0, 24, 24)), save(tmp_path / "small.png", pixels(1, 12, 12))]
    expected = f"{paths[1]}: 12x12 px is smaller than the classifier's receptive field/crop (19 px)"
    with pytest.raises(InputError) as info:
        ImageSet(paths, load_size=24, min_size=19, on_bad_image=policy, cache=cache)
    assert str(info.value) == expected


@pytest.mark.parametrize("cache", [True, False])
def test_set_of_only_bad_files_raises_input_error(tmp_path, cache):
    bad = write_bad_files(tmp_path)
    with pytest.raises(InputError, match="none of the 4 images could be read"):
        ImageSet(sorted(bad.values()), cache=cache)


def test_images_of_different_sizes_are_cached_but_a_batch_without_crop_asks_for_load_size(tmp_path):
    paths = [save(tmp_path / "a.png", pixels(0, 24, 24)), save(tmp_path / "b.png", pixels(1, 30, 30))]
    images = ImageSet(paths)
    assert images.sizes == [(24, 24), (30, 30)] and images[1].shape == (30, 30, 3)
    with pytest.raises(InputError, match=r"b\.png: 30x30 px .* set load_size \(--load-size.* crop_size \(--crop-size"):
        RealFakeDataset(images, images, crop_size=None, train=False)
    assert RealFakeDataset(*[ImageSet(paths, load_size=24)] * 2, None, train=False)[1][0].shape == (3, 24, 24)


def test_cache_pool_and_no_cache_give_identical_images(tmp_path):
    paths = make_folder(tmp_path, 5, size=(30, 36))
    cached = ImageSet(paths, load_size=20, workers=2)
    lazy = ImageSet(paths, load_size=20, cache=False)
    assert lazy.sizes == cached.sizes == [(20, 24)] * 5
    for i in range(5):
        np.testing.assert_array_equal(cached[i], lazy[i])
        np.testing.assert_array_equal(cached[i], resize_image(read_image(paths[i]), 20))


# ----------------------------------------------------------------------------- dataset

def make_dataset(tmp_path: Path, n_real: int, n_fake: int, crop: int | None, train: bool,
                 size: tuple[int, int] = (24, 24), cache: bool = True) -> RealFakeDataset:
    real = ImageSet(make_folder(tmp_path / "real", n_real, 0, size), cache=cache)
    fake = ImageSet(make_folder(tmp_path / "fake", n_fake, 100, size), cache=cache)
    return RealFakeDataset(real, fake, crop_size=crop, train=train, seed=3)


def test_items_list_real_first_then_fake_with_labels_and_indices(tmp_path):
    data = make_dataset(tmp_path, 2, 3, None, train=False)
    assert (data.n_real, data.n_fake, len(data)) == (2, 3, 5) and data.cached
    assert data.paths == [tmp_path / "real" / "img00.png", tmp_path / "real" / "img01.png",
                          *(tmp_path / "fake" / f"img0{i}.png" for i in range(3))]
    assert data.labels.tolist() == [0, 0, 1, 1, 1]
    assert [data[i][1:] for i in range(5)] == [(0, 0), (0, 1), (1, 2), (1, 3), (1, 4)]
    np.testing.assert_array_equal(data[2][0].numpy(), normalised(pixels(100)))


def test_normalisation_maps_0_and_255_to_minus_one_and_one(tmp_path):
    ramp = np.zeros((24, 24, 3), np.uint8)
    ramp[:, 12:] = 255
    real = ImageSet([save(tmp_path / "r.png", ramp)])
    fake = ImageSet([save(tmp_path / "f.png", pixels(1))])
    image = RealFakeDataset(real, fake, None, train=False)[0][0]
    assert image.dtype == torch.float32 and image.shape == (3, 24, 24)
    assert image[:, :, :12].eq(-1).all() and image[:, :, 12:].eq(1).all()
    fake_image = RealFakeDataset(real, fake, None, train=False)[1][0]
    assert fake_image.min() >= -1 and fake_image.max() <= 1


def test_eval_centre_crop_matches_torchvision_center_crop(tmp_path):
    data = make_dataset(tmp_path, 1, 1, 21, train=False, size=(24, 31))
    expected = np.asarray(T.CenterCrop(21)(Image.fromarray(pixels(0, 24, 31))))
    np.testing.assert_array_equal(data[0][0].numpy(), normalised(expected))
    # (24 - 21) / 2 = 1.5 rounds to 2, as in torchvision; (31 - 21) / 2 = 5.
    np.testing.assert_array_equal(data[0][0].numpy(), normalised(pixels(0, 24, 31)[2:23, 5:26]))


def test_train_crops_are_flipped_windows_drawn_from_seed_epoch_and_index(tmp_path):
    data = make_dataset(tmp_path, 1, 1, 16, train=True)
    source = normalised(pixels(0)).transpose(1, 2, 0)
    windows = {(top, left, flip): source[top:top + 16, left:left + 16][:, ::-1] if flip
               else source[top:top + 16, left:left + 16]
               for top in range(9) for left in range(9) for flip in (False, True)}
    seen = set()
    for epoch in range(12):
        crop = data[(epoch, 0)][0].numpy().transpose(1, 2, 0)
        found = [key for key, window in windows.items() if np.array_equal(crop, window)]
        assert len(found) == 1
        seen.add(found[0])
        assert torch.equal(data[(epoch, 0)][0], data[(epoch, 0)][0])
    assert len(seen) > 6 and {flip for _, _, flip in seen} == {False, True}


def test_image_smaller_than_crop_is_named(tmp_path):
    with pytest.raises(InputError, match=r"img00\.png: 24x24 px \(after resizing\) is smaller than the crop \(32 px\)"):
        make_dataset(tmp_path, 1, 1, 32, train=True)


# ----------------------------------------------------------------------------- batching

def test_balanced_batches_are_half_real_half_fake_and_cover_the_larger_class_once():
    sampler = BalancedBatchSampler(n_real=7, n_fake=12, batch_size=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6
    assert all(len(b) == 4 and all(i < 7 for i in b[:2]) and all(7 <= i < 19 for i in b[2:]) for b in batches)
    assert Counter(i for b in batches for i in b[2:]) == Counter(range(7, 19))
    real = [i for b in batches for i in b[:2]]
    assert sorted(real[:7]) == list(range(7)) and len(set(real[7:])) == 5  # next permutation, fresh order


def test_last_batch_is_topped_up_so_every_larger_class_image_appears():
    batches = list(BalancedBatchSampler(n_real=5, n_fake=3, batch_size=4, seed=0))
    assert len(batches) == 3 and all(len(b) == 4 for b in batches)
    real = [i for b in batches for i in b[:2]]
    assert sorted(real[:5]) == list(range(5)) and set(real) == set(range(5))


def test_smaller_class_cycles_through_fresh_permutations():
    batches = list(BalancedBatchSampler(n_real=3, n_fake=30, batch_size=2, seed=0))
    real = [b[0] for b in batches]
    blocks = [tuple(real[i:i + 3]) for i in range(0, 30, 3)]
    assert all(sorted(block) == [0, 1, 2] for block in blocks)
    assert len(set(blocks)) > 1


def test_batch_order_depends_only_on_seed_and_epoch():
    def order(seed, epoch):
        sampler = BalancedBatchSampler(10, 10, 4, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)
    assert order(0, 3) == order(0, 3)
    assert order(0, 3) != order(0, 4) and order(0, 3) != order(1, 3)


def test_odd_batch_size_and_missing_class_are_rejected():
    with pytest.raises(InputError, match="batch_size must be even"):
        BalancedBatchSampler(4, 4, 5)
    with pytest.raises(InputError, match="got 0 real and 4 fake"):
        BalancedBatchSampler(0, 4, 4)


def test_ranks_split_each_epoch_into_disjoint_batches():
    whole = list(BalancedBatchSampler(8, 8, 4, seed=2))
    shards = [list(BalancedBatchSampler(8, 8, 4, seed=2, rank=r, world_size=2)) for r in range(2)]
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_uneven_rank_shards_are_equal_length_and_interleave_back_into_the_epoch(world_size):
    # 10 real / 7 fake, 2 per class and batch: the single-process epoch has 5 batches
    whole = list(BalancedBatchSampler(10, 7, 4, seed=3))
    shards = [BalancedBatchSampler(10, 7, 4, seed=3, rank=r, world_size=world_size) for r in range(world_size)]
    for shard in shards:
        shard.set_epoch(0)
    batches = [list(shard) for shard in shards]
    per_rank = -(-len(whole) // world_size)
    assert [len(b) for b in batches] == [len(s) for s in shards] == [per_rank] * world_size
    # batch i of rank r is batch i*W + r of one long epoch: disjoint positions, the real epoch first, then padding
    merged = [batches[r][i] for i in range(per_rank) for r in range(world_size)]
    assert merged[:len(whole)] == whole
    assert all(len(batch) == 4 for batch in merged)
    assert sorted(i for batch in whole for i in batch[:2]) == list(range(10))  # the larger class exactly once


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_rank_shards_are_disjoint_and_cover_every_index_once(tmp_path, world_size):
    data = make_dataset(tmp_path, 3, 4, None, train=False)
    shards = [[b[2].tolist() for b in make_loader(data, batch_size=2, train=False, rank=r, world_size=world_size)]
              for r in range(world_size)]
    indices = [i for shard in shards for batch in shard for i in batch]
    assert sorted(indices) == list(range(7)) and len(indices) == 7
    for r, shard in enumerate(shards):
        # whole batches r, r+W, ... of the single-process sequence [0, 1], [2, 3], [4, 5], [6]
        assert shard == [[i for i in (2 * b, 2 * b + 1) if i < 7] for b in range(r, 4, world_size)]


def test_eval_loader_is_sequential_and_keeps_the_last_short_batch(tmp_path):
    loader = make_loader(make_dataset(tmp_path, 2, 3, None, train=False), batch_size=2, train=False)
    batches = list(loader)
    assert [b[2].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert [b[1].tolist() for b in batches] == [[0, 0], [1, 1], [1]]
    assert batches[0][0].shape == (2, 3, 24, 24)


def test_train_batches_are_identical_with_0_and_2_workers(tmp_path):
    data = make_dataset(tmp_path, 3, 5, 16, train=True, size=(20, 24))
    loaders = [make_loader(data, batch_size=4, train=True, seed=7, workers=w) for w in (0, 2)]
    assert loaders[1].persistent_workers and not loaders[0].persistent_workers
    passes = {}
    for workers, loader in zip((0, 2), loaders):
        for epoch in (0, 1):
            set_epoch(loader, epoch)
            passes[workers, epoch] = list(loader)
    for epoch in (0, 1):
        assert len(passes[0, epoch]) == 3
        for a, b in zip(passes[0, epoch], passes[2, epoch]):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(passes[0, 0], passes[0, 1]))


def test_load_split_builds_a_dataset_from_split_folders(tmp_path, caplog):
    make_folder(tmp_path / "real" / "train", 2, size=(30, 40))
    make_folder(tmp_path / "fake" / "train", 3, seed=50, size=(30, 40))
    (tmp_path / "fake" / "train" / "broken.png").write_bytes(b"")
    data = load_split(tmp_path / "real", tmp_path / "fake", "train", load_size=20, crop_size=18, min_size=19,
                      on_bad_image="skip", cache=False, workers=0, train=False, seed=0)
    assert (data.n_real, data.n_fake) == (2, 3) and data.fake.skipped[0][0].name == "broken.png"
    assert data[4][0].shape == (3, 18, 18) and data.path(4).name == "img02.png"
    assert [p.parent.parent.name for p in data.paths] == ["real"] * 2 + ["fake"] * 3 and not data.cached
