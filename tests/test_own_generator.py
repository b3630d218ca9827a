"""A generator of your own through the command line: a module in the current folder (not a patchscope class) named
MODULE:CALLABLE is sampled, exaggerated, finetuned without a discriminator, reloaded with --weights and inverted."""
from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from patchscope.attacks.finetune_anchor import default_ema_beta
from patchscope.attacks.retrain import RetrainConfig, _as_generator
from patchscope.cli import main
from patchscope.forensics.checkpoint import save_classifier
from patchscope.generators.custom import generator_sha256
from patchscope.generators.sampling import to_pixels
from tests.attacks.test_finetune import detector

MYGEN = '''
import torch
from torch import nn


class TinyGenerator(nn.Module):
    """Latents [N, latent_dim] -> images [N, 3, R, R] in [-1, 1]."""

    def __init__(self, latent_dim, resolution, width=16):
        super().__init__()
        self.start, self.width = resolution // 4, width
        self.fc = nn.Linear(latent_dim, width * self.start * self.start)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.to_rgb = nn.Conv2d(width, 3, 1)

    def forward(self, z):
        x = torch.relu(self.fc(z)).view(-1, self.width, self.start, self.start)
        x = nn.functional.interpolate(x, scale_factor=4, mode="nearest")
        return torch.tanh(self.to_rgb(torch.relu(self.conv(x))))


class Sized(TinyGenerator):
    latent_dim, resolution = 8, 16

    def __init__(self):
        super().__init__(8, 16)


class Styled(Sized):
    def __init__(self):
        super().__init__()
        self.map = nn.Linear(8, 8)

    def mapping(self, z):
        return self.map(z)

    def synthesis(self, w):
        return super().forward(w)

    def forward(self, z):
        return self.synthesis(self.mapping(z))


def make():
    torch.manual_seed(1)
    return Sized()


def make24():  # no size attributes: --latent-dim 5, the resolution (24 px) measured
    torch.manual_seed(2)
    return TinyGenerator(5, 24)


def make_styled():
    torch.manual_seed(3)
    return Styled()
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A folder holding mygen.py, real crops at 16 and 24 px, and a classifier that calls bright patches fake."""
    from patchscope.forensics.builtin_images import builtin_photos, random_crops

    root = tmp_path_factory.mktemp("own")
    (root / "mygen.py").write_text(textwrap.dedent(MYGEN))
    for size in (16, 24):
        (root / f"real{size}").mkdir()
        for i, crop in enumerate(random_crops(builtin_photos(), 24, size, seed=0)):
            Image.fromarray(crop).save(root / f"real{size}" / f"{i:03d}.png")
    save_classifier(root / "classifier" / "best", detector(), {"config": {"load_size": 16, "crop_size": 16}})
    return root


@pytest.fixture
def here(world, monkeypatch) -> Path:
    monkeypatch.chdir(world)
    monkeypatch.delitem(sys.modules, "mygen", raising=False)
    yield world
    sys.modules.pop("mygen", None)


def cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output + repr(result.exception)
    return result.output


def pngs(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)) for path in sorted(folder.glob("*.png"))]


FAST = ("--device", "cpu", "--precision", "fp32")
FINETUNE = ("--classifier", "classifier", "--checkpoint-every", "2", "--log-every", "2", "--eval-n", "4",
            "--compare-n", "4", "--grid-rows", "2", "--lr", "0.01", *FAST)


def test_sample_exaggerate_finetune_and_reload_a_generator_of_your_own(here, caplog) -> None:
    for out in ("s1", "s1_again"):
        cli("sample", "mygen:make", "--out", out, "--train", "5", "--seed", "3", "--device", "cpu")
    first, again = pngs(here / "s1" / "train"), pngs(here / "s1_again" / "train")
    assert len(first) == 5 and first[0].shape == (16, 16, 3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    manifest = json.loads((here / "s1" / "manifest.json").read_text())
    assert manifest["generator_source"]["spec"] == "mygen:make" and manifest["generator"]["class"] == "ModuleGenerator"

    cli("exaggerate", "--generator", "mygen:make", "--classifier", "classifier", "--out", "ex", "--steps", "3",
        "--batch-size", "4", "--eval-n", "4", "--ks", "-1,0,1", "--grid-rows", "2", "--lpips-random", *FAST)
    shift = json.loads((here / "ex" / "shift.json").read_text())
    assert shift["space"] == "z" and shift["generator_source"]["spec"] == "mygen:make"
    assert (here / "ex" / "grid.png").is_file()

    caplog.set_level(logging.INFO, logger="patchscope.finetune")
    cli("finetune", "--generator", "mygen:make", "--real", "real16", "--out", "ft", "--steps", "4", "--batch-size", "4",
        "--lpips-random", *FINETUNE)
    assert "no discriminator: keeping G near the original with LPIPS to G0(z), weight 1" in caplog.text
    table = json.loads((here / "ft" / "before_after.json").read_text())
    settings = table["settings"]
    assert (settings["objective"], settings["anchor"], settings["anchor_weight"]) == ("anchor", "lpips", 1.0)
    assert settings["ema_beta"] == default_ema_beta(4) == 0.9 and settings["ema_beta_auto"] is True
    assert table["generator_source"]["spec"] == "mygen:make" and table["rows"][1]["p_fake"] < table["rows"][0]["p_fake"]
    config = yaml.safe_load((here / "ft" / "config.yaml").read_text())
    assert config["anchor"] == "lpips" and config["ema_beta"] is None and not (here / "ft" / "generator.pt").exists()
    tuned = load_file(str(here / "ft" / "generator.safetensors"))
    import mygen

    original = mygen.make().state_dict()
    assert tuned.keys() == original.keys() and not torch.equal(tuned["fc.weight"], original["fc.weight"])

    cli("finetune", "--generator", "mygen:make", "--real", "real16", "--out", "ft", "--steps", "6", "--batch-size", "4",
        "--lpips-random", "--resume", *FINETUNE)  # a resume without a discriminator goes on
    assert json.loads((here / "ft" / "before_after.json").read_text())["steps"] == 6

    cli("sample", "mygen:make", "--weights", "ft/generator.safetensors", "--out", "s2", "--train", "5", "--seed", "3",
        "--device", "cpu")
    reloaded = pngs(here / "s2" / "train")
    assert len(reloaded) == 5 and any(not np.array_equal(a, b) for a, b in zip(first, reloaded))
    finetuned = mygen.make()
    finetuned.load_state_dict(load_file(str(here / "ft" / "generator.safetensors")))
    z = torch.from_numpy(np.random.RandomState(3).randn(8, 8).astype(np.float32))  # one chunk: train seed 3
    with torch.no_grad():
        expected = to_pixels(finetuned.eval()(z))[:5]
    assert all(np.array_equal(a, b) for a, b in zip(reloaded, expected))

    # retrain samples the same pair (its classifier training is tested elsewhere)
    generator, spec, digest = _as_generator("mygen:make", RetrainConfig(weights="ft/generator.safetensors"))
    assert spec == "mygen:make" and digest == generator_sha256("mygen:make", generator)
    with torch.no_grad():
        assert torch.equal(generator(z), finetuned(z))

    cli("invert", "--generator", "mygen:make", "--weights", "ft/generator.safetensors", "--images", "s1/train",
        "--out", "inv", "--steps", "2", "--lambda-lpips", "0", "--device", "cpu")
    assert len(pngs(here / "inv")) == 5


def test_another_size_and_batch_with_the_latent_size_as_an_option(here) -> None:
    cli("sample", "mygen:make24", "--latent-dim", "5", "--out", "s24", "--train", "7", "--batch-size", "3",
        "--chunk", "3", "--device", "cpu")
    cli("sample", "mygen:make24", "--latent-dim", "5", "--out", "s24b", "--train", "7", "--batch-size", "5",
        "--chunk", "3", "--device", "cpu")
    first, second = pngs(here / "s24" / "train"), pngs(here / "s24b" / "train")
    assert len(first) == 7 and first[0].shape == (24, 24, 3)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    out = cli("sample", "mygen:make24", "--out", "s24c", "--train", "1", "--device", "cpu", code=2)
    assert out.strip().splitlines() == ["error: mygen:make24: the module has no latent_dim (nor z_dim, nz) attribute; "
                                        "pass --latent-dim N"]

    cli("finetune", "--generator", "mygen:make24", "--latent-dim", "5", "--real", "real24", "--out", "ft24",
        "--steps", "3", "--batch-size", "3", "--anchor", "l2", "--anchor-weight", "2", *FINETUNE)
    settings = json.loads((here / "ft24" / "before_after.json").read_text())["settings"]
    assert (settings["anchor"], settings["anchor_weight"], settings["batch"]) == ("l2", 2.0, 3)
    cli("sample", "mygen:make24", "--latent-dim", "5", "--weights", "ft24/generator.safetensors", "--out", "s24d",
        "--train", "7", "--batch-size", "3", "--chunk", "3", "--device", "cpu")
    assert any(not np.array_equal(a, b) for a, b in zip(first, pngs(here / "s24d" / "train")))
    out = cli("sample", "mygen:make", "--weights", "ft24/generator.safetensors", "--out", "s24e", "--train", "1",
              "--device", "cpu", code=2)
    assert len(out.strip().splitlines()) == 1 and "weights do not fit the network" in out


def test_mapping_and_synthesis_let_the_shift_live_in_w(here) -> None:
    args = ("--classifier", "classifier", "--steps", "2", "--batch-size", "4", "--eval-n", "4", "--ks", "0,1",
            "--grid-rows", "0", "--lam", "0", *FAST)
    cli("exaggerate", "--generator", "mygen:make_styled", "--space", "w", "--out", "exw", *args)
    shift = json.loads((here / "exw" / "shift.json").read_text())
    assert shift["space"] == "w" and len(shift["k_metrics"]) == 2
    out = cli("exaggerate", "--generator", "mygen:make", "--space", "w", "--out", "exz", *args, code=2)
    assert out.strip().splitlines() == ["error: --space w: space 'w' needs a style generator (mapping/synthesis); "
                                        "ModuleGenerator has only z"]


def test_prepare_takes_the_resolution_of_a_generator_of_your_own(here) -> None:
    cli("prepare", "real24", "--generator", "mygen:make", "--out", "prepared", "--test", "3")
    images = [np.asarray(Image.open(path)) for path in sorted((here / "prepared").rglob("*.png"))]
    assert images and all(image.shape == (16, 16, 3) for image in images)  # Sized: 16 px, from 24 px crops
