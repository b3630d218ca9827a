"""Sampling a generator into PNG folders: byte-identical whatever the batch size, resumable without
duplicates or overwrites, the paper's split seeds and rounding, a manifest that refuses mismatches."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchscope.common.errors import DatasetError
from patchscope.generators import checkpoint_sha256, load_generator
from patchscope.generators.pgan.zoo import build_pgan_zoo, save_pgan_zoo
from patchscope.generators.sampling import LatentSource, SampleConfig, sample_dataset

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "generators"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"generator fixtures not found at {FIXTURES}")


def _tiny_pgan(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    generator, discriminator = build_pgan_zoo(16, latent_dim=8, depth_scale0=8, depth_other_scales=[8, 8])
    generator.discriminator = discriminator
    return save_pgan_zoo(generator, path)


@pytest.fixture(scope="module")
def pgan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_pgan(tmp_path_factory.mktemp("pgan") / "tiny16.pt", seed=0)


@pytest.fixture(scope="module")
def reference(pgan_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run, batch size 8: train 13 (not a whole number of chunks), test 5."""
    out = tmp_path_factory.mktemp("reference") / "set"
    sample_dataset(SampleConfig(generator=str(pgan_file), out=str(out), counts={"train": 13, "test": 5},
                                seed=0, batch_size=8, chunk=4), progress=False)
    return out


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_same_seed_gives_byte_identical_pngs_whatever_the_batch_size(
        batch_size: int, pgan_file: Path, reference: Path, tmp_path: Path) -> None:
    summary = sample_dataset(SampleConfig(generator=str(pgan_file), out=str(tmp_path), counts={"train": 13,
                                          "test": 5}, batch_size=batch_size, chunk=4), progress=False)
    assert _pngs(tmp_path) == _pngs(reference)
    expected = [f"test/{i:06d}.png" for i in range(5)] + [f"train/{i:06d}.png" for i in range(13)]
    assert sorted(_pngs(tmp_path)) == expected
    assert summary["splits"]["train"] == {"seed": 0, "count": 13, "existing": 0, "written": 13}


def test_image_i_is_latent_row_i_rounded_as_the_paper_does(pgan_file: Path, reference: Path) -> None:
    generator = load_generator(pgan_file)
    with torch.no_grad():  # the chunk holding images 8..11, as sampling ran it
        x = generator(generator.sample_latents(4, seed=0, start=8)).numpy()
    expected = np.clip(np.rint((x + 1) / 2 * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    for row in range(4):
        assert np.array_equal(_pixels(reference / "train" / f"{8 + row:06d}.png"), expected[row])
    assert _pixels(reference / "train" / "000008.png").shape == (16, 16, 3)


def test_network_always_runs_on_whole_chunks_aligned_to_absolute_indices(pgan_file: Path, tmp_path: Path) -> None:
    """Kernels round differently for other batch shapes, so every call must see the same rows."""
    generator = load_generator(pgan_file)
    calls: list[torch.Tensor] = []
    generator.register_forward_pre_hook(lambda module, args: calls.append(args[0].clone()))
    sample_dataset(SampleConfig(out=str(tmp_path / "a"), counts={"train": 6}, batch_size=3, chunk=4),
                                generator, progress=False)
    (tmp_path / "a" / "train" / "000001.png").unlink()
    sample_dataset(SampleConfig(out=str(tmp_path / "a"), counts={"train": 13}, batch_size=3, chunk=4),
                                generator, progress=False)
    starts = [0, 4, 0, 4, 8, 12]  # 0..5 padded to 0..7; then 1 again, 6..7, 8..11, and 12 padded to 12..15
    assert [len(z) for z in calls] == [4] * len(starts)
    for z, start in zip(calls, starts):
        assert torch.equal(z, generator.sample_latents(4, seed=0, start=start))


def test_asking_for_fewer_images_does_not_change_the_first_ones(pgan_file: Path, reference: Path,
                                                                 tmp_path: Path) -> None:
    sample_dataset(SampleConfig(generator=str(pgan_file), out=str(tmp_path), counts={"train": 10},
                                batch_size=2, chunk=4), progress=False)
    wanted = {name: data for name, data in _pngs(reference).items() if name.startswith("train/")
              and int(name[6:12]) < 10}
    assert _pngs(tmp_path) == wanted


def test_interrupted_run_resumes_without_duplicates_or_overwrites(pgan_file: Path, reference: Path,
                                                                  tmp_path: Path) -> None:
    def stop_after_two_steps(split: str, done: int, to_do: int) -> None:
        if done >= 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_dataset(SampleConfig(generator=str(pgan_file), out=str(tmp_path), counts={"train": 13,
                                    "test": 5}, batch_size=3, chunk=4), progress=stop_after_two_steps)
    first = {p: os.stat(p) for p in tmp_path.rglob("*.png")}
    assert sorted(p.name for p in first) == [f"{i:06d}.png" for i in range(8)]
    summary = sample_dataset(SampleConfig(generator=str(pgan_file), out=str(tmp_path), counts={"train": 13,
                                          "test": 5}, batch_size=5, chunk=4), progress=False)
    assert _pngs(tmp_path) == _pngs(reference)
    assert summary["splits"]["train"]["existing"] == 8 and summary["splits"]["train"]["written"] == 5
    for path, before in first.items():
        after = os.stat(path)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def test_leftover_temp_file_is_removed_and_a_truncated_png_is_made_again(pgan_file: Path, reference: Path,
                                                                         tmp_path: Path) -> None:
    sample_dataset(SampleConfig(generator=str(pgan_file), out=str(tmp_path), counts={"train": 13, "test": 5},
                                chunk=4), progress=False)
    (tmp_path / "train" / ".000003.png.x1y2.tmp").write_bytes(b"\x89PNG half")
    whole = (tmp_path / "train" / "000004.png").read_bytes()
    (tmp_path / "train" / "000004.png").write_bytes(whole[: len(whole) // 2])
    summary = sample_dataset(SampleConfig(generator=str(pgan_file), out=str(tmp_path), counts={"train": 13,
                                          "test": 5}, chunk=4), progress=False)
    assert summary["splits"]["train"]["written"] == 1
    assert _pngs(tmp_path) == _pngs(reference)
    assert not (tmp_path / "train" / ".000003.png.x1y2.tmp").exists()


def test_manifest_records_generator_options_seeds_counts_and_size(pgan_file: Path, tmp_path: Path) -> None:
    sample_dataset(SampleConfig(generator=str(pgan_file), out=str(tmp_path), counts={"train": 2, "val": 1,
                                "test": 1}, seed=5, size=8), progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["generator_sha256"] == checkpoint_sha256(pgan_file)
    assert manifest["generator_file"] == str(pgan_file)
    assert manifest["generator"] == json.loads(json.dumps(load_generator(pgan_file).describe()))
    assert manifest["options"] == {"alpha": 0.0}
    assert manifest["split_seeds"] == {"train": 5, "test": 6, "val": 7}
    assert manifest["counts"] == {"train": 2, "val": 1, "test": 1}
    assert (manifest["size"], manifest["resolution"], manifest["chunk"], manifest["precision"]) == (8, 16, 8, "fp32")


@pytest.mark.parametrize("change, word", [({"seed": 1}, "seed"), ({"size": 8}, "size"),
                                          ({"opts": {"alpha": 0.5}}, "options"), ({"chunk": 2}, "chunk"),
                                          ({"other_weights": True}, "sha256")])
def test_rerun_with_other_settings_is_refused_in_one_line(change: dict, word: str, pgan_file: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "set"
    sample_dataset(SampleConfig(generator=str(pgan_file), out=str(out), counts={"train": 3}), progress=False)
    before = _pngs(out)
    generator = _tiny_pgan(tmp_path / "other.pt", seed=1) if change.pop("other_weights", False) else pgan_file
    with pytest.raises(DatasetError) as caught:
        sample_dataset(SampleConfig(generator=str(generator), out=str(out), counts={"train": 5}, **change),
                       progress=False)
    message = str(caught.value)
    assert word in message and str(out) in message and "\n" not in message
    assert _pngs(out) == before


def test_counts_may_grow_but_not_drop_below_the_images_already_made(pgan_file: Path, reference: Path,
                                                                    tmp_path: Path) -> None:
    sample_dataset(SampleConfig(generator=str(pgan_file), out=str(tmp_path), counts={"train": 6}, chunk=4),
                                progress=False)
    sample_dataset(SampleConfig(generator=str(pgan_file), out=str(tmp_path), counts={"train": 13, "test": 5},
                                chunk=4), progress=False)
    assert _pngs(tmp_path) == _pngs(reference)
    with pytest.raises(DatasetError, match="000012.png"):
        sample_dataset(SampleConfig(generator=str(pgan_file), out=str(tmp_path), counts={"train": 4}, chunk=4),
                                    progress=False)


def test_splits_use_the_papers_seeds_train_s_test_s_plus_1_val_s_plus_2(pgan_file: Path, tmp_path: Path) -> None:
    sample_dataset(SampleConfig(generator=str(pgan_file), out=str(tmp_path / "a"), counts={"train": 3,
                                "test": 3, "val": 3}, seed=0), progress=False)
    sample_dataset(SampleConfig(generator=str(pgan_file), out=str(tmp_path / "b"), counts={"train": 3},
                                seed=1), progress=False)
    sample_dataset(SampleConfig(generator=str(pgan_file), out=str(tmp_path / "c"), counts={"train": 3},
                                seed=2), progress=False)
    a = _pngs(tmp_path / "a")
    assert [a[f"test/{i:06d}.png"] for i in range(3)] == list(_pngs(tmp_path / "b").values())
    assert [a[f"val/{i:06d}.png"] for i in range(3)] == list(_pngs(tmp_path / "c").values())
    assert len(set(a.values())) == 9


def test_size_lanczos_resizes_the_rounded_image(pgan_file: Path, reference: Path, tmp_path: Path) -> None:
    sample_dataset(SampleConfig(generator=str(pgan_file), out=str(tmp_path), counts={"train": 13}, size=8,
                                chunk=4), progress=False)
    for i in (0, 12):
        with Image.open(reference / "train" / f"{i:06d}.png") as full:
            expected = np.asarray(full.resize((8, 8), Image.Resampling.LANCZOS))
        assert np.array_equal(_pixels(tmp_path / "train" / f"{i:06d}.png"), expected)


def test_unknown_option_or_split_is_refused_before_anything_is_written(pgan_file: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"psi.*PGANZooGenerator.*alpha"):
        sample_dataset(SampleConfig(generator=str(pgan_file), out=str(tmp_path / "a"), counts={"train": 2},
                                    opts={"psi": 0.7}), progress=False)
    with pytest.raises(DatasetError, match="holdout"):
        sample_dataset(SampleConfig(generator=str(pgan_file), out=str(tmp_path / "b"), counts={"holdout": 2}),
                                    progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_non_empty_folder_without_a_manifest_is_refused(pgan_file: Path, tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "000000.png").write_bytes(b"someone else's picture")
    with pytest.raises(DatasetError, match="manifest.json"):
        sample_dataset(SampleConfig(generator=str(pgan_file), out=str(tmp_path), counts={"train": 2}), progress=False)


def test_latent_stream_equals_sample_latents_slices(pgan_file: Path) -> None:
    generator = load_generator(pgan_file)
    source = LatentSource(generator, seed=3)
    rows = [source.take(n)[0] for n in (3, 1, 5)]
    assert torch.equal(torch.cat(rows), generator.sample_latents(9, seed=3))
    assert torch.equal(rows[2], generator.sample_latents(5, seed=3, start=4))


@needs_fixtures
def test_glow_split_noise_stream_equals_the_generators_own(tmp_path: Path) -> None:
    generator = load_generator(FIXTURES / "glow_y0ast" / "glow_y0ast_tiny16.pt")
    source = LatentSource(generator, seed=2)
    source.take(3)
    z, extra = source.take(2)
    assert torch.equal(z, generator.sample_latents(2, seed=2, start=3))
    for mine, theirs in zip(extra["split_noise"], generator.sample_split_noise(2, seed=2, start=3), strict=True):
        assert torch.equal(mine, theirs)
    sample_dataset(SampleConfig(out=str(tmp_path / "a"), counts={"train": 3}, batch_size=1, chunk=2),
                                generator, progress=False)
    sample_dataset(SampleConfig(out=str(tmp_path / "b"), counts={"train": 3}, batch_size=3, chunk=2),
                                generator, progress=False)
    assert _pngs(tmp_path / "a") == _pngs(tmp_path / "b")
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["options"] == {"temperature": 0.7}


@needs_fixtures
def test_style_generators_sample_with_constant_noise_by_default(tmp_path: Path) -> None:
    checkpoint = FIXTURES / "sg2_rosinality" / "sg2_rosinality_tiny32.pt"
    sample_dataset(SampleConfig(generator=str(checkpoint), out=str(tmp_path / "a"), counts={"train": 2},
                                batch_size=1, chunk=2), progress=False)
    sample_dataset(SampleConfig(generator=str(checkpoint), out=str(tmp_path / "b"), counts={"train": 2},
                                batch_size=2, chunk=2), progress=False)
    assert _pngs(tmp_path / "a") == _pngs(tmp_path / "b")
    options = json.loads((tmp_path / "a" / "manifest.json").read_text())["options"]
    assert options == {"noise_mode": "const", "psi": 1.0, "truncation_cutoff": None}
