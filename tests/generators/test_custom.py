"""Generators of your own (`generators.custom`): MODULE:CALLABLE opened beside checkpoint files, the adapter of a
plain module (sizes, latents by seed, w space, discriminator), --weights, provenance, and one-line errors."""
from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from patchscope.attacks.shift import ShiftExaggeration, latent_batch, resolve_space
from patchscope.cli import main
from patchscope.common.errors import CheckpointError, InputError
from patchscope.generators.base import Generator, StyleGenerator
from patchscope.generators.custom import (ModuleGenerator, generator_sha256, is_module_spec, open_generator,
                                          user_state_dict)
from tests.attacks.test_shift import brightness_classifier

NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, latent_dim=6, resolution=16, scale=1.0):
        super().__init__()
        self.fc = nn.Linear(latent_dim, 8 * 4 * 4)
        self.conv = nn.Conv2d(8, 3, 3, padding=1)
        self.size, self.scale = resolution, scale

    def forward(self, z):
        x = self.fc(z).view(-1, 8, 4, 4)
        x = nn.functional.interpolate(x, size=self.size, mode="nearest")
        return torch.tanh(self.conv(x)) * self.scale


def plain():  # sizes as attributes
    torch.manual_seed(0)
    net = Net()
    net.latent_dim, net.resolution = 6, 16
    return net


def bare():  # no size attributes: --latent-dim, resolution measured
    torch.manual_seed(0)
    return Net(5, 12)


def with_discriminator():
    net = plain()
    net.discriminator = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 1))
    return net


class Styled(Net):
    latent_dim, resolution = 6, 16

    def __init__(self):
        super().__init__()
        self.map = nn.Linear(6, 6)

    def mapping(self, z):
        return self.map(z)

    def synthesis(self, w):
        return super().forward(w)

    def forward(self, z):
        return self.synthesis(self.mapping(z))


def styled():
    torch.manual_seed(0)
    return Styled()


class OwnLatents(Net):
    latent_dim, resolution = 6, 16

    def sample_latents(self, n, seed, start=0):
        return torch.full((n, 6), float(seed)) + torch.arange(start, start + n).float()[:, None]


def own_latents():
    torch.manual_seed(0)
    return OwnLatents()


def raises():
    raise RuntimeError("no GPU here\\nsecond line")


def not_a_module():
    return 42


def wrong_shape():
    net = Net()
    net.latent_dim, net.resolution = 6, 16
    net.forward = lambda z: torch.zeros(z.shape[0], 1, 16, 16)
    return net


def bytes_range():
    net = Net(scale=255.0)
    net.latent_dim, net.resolution = 6, 16
    return net


def no_sizes():
    return Net()


def patchscope_generator():
    from patchscope.generators.base import Generator

    class Mine(Generator):
        latent_dim, resolution = 6, 16

        def __init__(self):
            super().__init__()
            self.net = Net()

        def forward(self, z):
            return self.net(z)

    torch.manual_seed(0)
    return Mine()


VALUE = 3
'''


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """The current folder holds owngen.py; the module is imported afresh in every test."""
    (tmp_path / "owngen.py").write_text(textwrap.dedent(NET))
    (tmp_path / "broken.py").write_text("import torch\nraise ValueError('bad module body')\n")
    monkeypatch.chdir(tmp_path)
    for name in ("owngen", "broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield tmp_path
    for name in ("owngen", "broken"):
        sys.modules.pop(name, None)


def test_a_plain_module_becomes_a_generator_with_the_stock_latent_stream(folder) -> None:
    generator = open_generator("owngen:plain")
    assert isinstance(generator, ModuleGenerator) and not isinstance(generator, StyleGenerator)
    assert (generator.latent_dim, generator.resolution, generator.format) == (6, 16, "module")
    assert generator.discriminator is None and not generator.training
    reference = Generator.sample_latents(generator, 5, seed=7, start=2)
    torch.testing.assert_close(generator.sample_latents(5, seed=7, start=2), reference, rtol=0, atol=0)
    with torch.no_grad():
        images = generator(generator.sample_latents(3, seed=1))
    assert images.shape == (3, 3, 16, 16) and images.abs().max() <= 1


def test_sizes_come_from_options_and_the_resolution_from_one_forward_pass(folder) -> None:
    with pytest.raises(InputError, match=r"no latent_dim \(nor z_dim, nz\) attribute; pass --latent-dim N"):
        open_generator("owngen:bare")
    generator = open_generator("owngen:bare", latent_dim=5)
    assert (generator.latent_dim, generator.resolution) == (5, 12)
    with pytest.raises(InputError, match="--resolution 32 disagrees with the module's resolution = 16"):
        open_generator("owngen:plain", resolution=32)
    with pytest.raises(InputError, match=r"returned \[1, 3, 12, 12\] for one latent; expected \[1, 3, 16, 16\]"):
        open_generator("owngen:bare", latent_dim=5, resolution=16)


def test_the_discriminator_moves_beside_the_network_and_back_into_its_state_dict(folder) -> None:
    generator = open_generator("owngen:with_discriminator")
    assert isinstance(generator.discriminator, torch.nn.Sequential)
    assert not any(name.startswith("net.discriminator") for name, _ in generator.named_parameters())
    state = user_state_dict(generator)
    assert {"fc.weight", "conv.bias", "discriminator.1.weight"} <= set(state)
    fresh = open_generator("owngen:with_discriminator")
    assert torch.equal(user_state_dict(fresh)["discriminator.1.weight"], state["discriminator.1.weight"])


def test_weights_load_strictly_and_change_the_provenance_digest(folder) -> None:
    original = open_generator("owngen:plain")
    state = {k: v + 0.01 for k, v in user_state_dict(original).items()}
    save_file(state, str(folder / "tuned.safetensors"))
    tuned = open_generator("owngen:plain", weights="tuned.safetensors")
    z = original.sample_latents(2, seed=3)
    with torch.no_grad():
        assert not torch.equal(tuned(z), original(z))
    assert torch.equal(tuned.net.fc.weight, state["fc.weight"])
    again = open_generator("owngen:plain")
    assert generator_sha256("owngen:plain", again) == generator_sha256("owngen:plain", original)
    assert generator_sha256("owngen:plain", tuned) != generator_sha256("owngen:plain", original)
    assert tuned.module_source.weights_sha256 is not None and tuned.module_source.module_sha256 is not None
    save_file({"fc.weight": state["fc.weight"]}, str(folder / "partial.safetensors"))
    with pytest.raises(InputError, match=r"partial\.safetensors \(for owngen:plain\): weights do not fit the network "
                                         r"\(Error\(s\) in loading state_dict for Net:"):
        open_generator("owngen:plain", weights="partial.safetensors")
    (folder / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="junk.safetensors: not a safetensors state dict"):
        open_generator("owngen:plain", weights="junk.safetensors")


def test_own_latent_samplers_and_patchscope_generators_are_taken_as_they_are(folder) -> None:
    generator = open_generator("owngen:own_latents")
    assert not generator.stock_latents
    torch.testing.assert_close(generator.sample_latents(2, seed=4, start=1)[:, 0], torch.tensor([5.0, 6.0]))
    mine = open_generator("owngen:patchscope_generator")
    assert type(mine).__name__ == "Mine" and mine.format == "module" and mine.module_source.spec.endswith("generator")


def test_mapping_and_synthesis_give_a_w_space(folder) -> None:
    generator = open_generator("owngen:styled")
    assert isinstance(generator, StyleGenerator) and (generator.num_ws, generator.w_dim) == (1, 6)
    assert resolve_space(generator, "auto") == "w"
    latents, render = latent_batch(generator, "w", 3, seed=2, start=0, device=torch.device("cpu"))
    assert latents.shape == (3, 1, 6)
    with torch.no_grad():
        torch.testing.assert_close(render(latents), generator(generator.sample_latents(3, seed=2)))
    attack = ShiftExaggeration(generator, brightness_classifier(), None, lam=0.0, space="w", precision="fp32")
    assert attack.fit(2, 4, 0.01, 0).shift.shape == (6,)
    with pytest.raises(ValueError, match="space 'w' needs a style generator"):
        resolve_space(open_generator("owngen:plain"), "w")
    with pytest.raises(InputError, match="has no truncation"):
        generator(generator.sample_latents(1), psi=0.7)


def test_a_spec_is_a_module_only_when_no_such_file_exists(folder) -> None:
    assert is_module_spec("owngen:plain") and not is_module_spec("owngen.py") and not is_module_spec("a b:c")
    (folder / "owngen:plain").write_bytes(b"")  # a file of that name wins, and is read as a checkpoint
    assert not is_module_spec("owngen:plain")
    with pytest.raises(CheckpointError, match="empty file"):
        open_generator("owngen:plain")
    with pytest.raises(CheckpointError, match="missing.pt: no such checkpoint file"):
        open_generator("missing.pt")
    with pytest.raises(InputError, match="--weights only apply to a MODULE:CALLABLE generator"):
        open_generator("owngen.py", weights="w.safetensors")


def test_the_module_is_imported_from_the_current_folder_only_while_it_is_opened(folder) -> None:
    open_generator("owngen:plain")
    assert str(folder) not in sys.path or "" in sys.path


ERRORS = [
    ("nosuchmodule:make", "nosuchmodule:make: no such file, and no module 'nosuchmodule' to import"),
    ("broken:make", "broken:make: importing broken raised ValueError: bad module body"),
    ("owngen:missing", "owngen:missing: owngen (" ),
    ("owngen:VALUE", "owngen:VALUE: VALUE is a int, not a callable"),
    ("owngen:raises", "owngen:raises: calling it raised RuntimeError: no GPU here"),
    ("owngen:not_a_module", "owngen:not_a_module: not_a_module() returned int; expected a patchscope Generator or a "
                            "torch.nn.Module"),
    ("owngen:wrong_shape", "owngen:wrong_shape: returned [1, 1, 16, 16] for one latent; expected [1, 3, 16, 16] images"),
    ("owngen:bytes_range", "expected images in [-1, 1] (e.g. tanh), not [0, 255]"),
    ("owngen:no_sizes", "owngen:no_sizes: the module has no latent_dim (nor z_dim, nz) attribute; pass --latent-dim N"),
    ("nosuchfile.pt", "nosuchfile.pt: no such checkpoint file"),
]


@pytest.mark.parametrize("spec, message", ERRORS, ids=[spec for spec, _ in ERRORS])
def test_every_mistake_is_one_line_with_exit_code_2(folder, spec, message) -> None:
    result = CliRunner().invoke(main, ["sample", spec, "--out", str(folder / "out"), "--train", "1", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output and not (folder / "out").exists()


@pytest.mark.parametrize("body, expected", [
    ("nn.Linear(3, 4)", "one latent [1, 8] through it raised RuntimeError"),           # latent_dim 8 does not fit
    ("TupleOut()", "returned tuple for one latent"),                                   # forward returns a tuple
])
def test_a_module_that_fails_on_its_first_latent_is_one_line(tmp_path, monkeypatch, body, expected):
    """Measuring the resolution runs the user's forward before the output check did: its errors are one line too."""
    from patchscope.common.errors import InputError
    from patchscope.generators.custom import open_generator

    (tmp_path / "badgen.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class TupleOut(nn.Module):\n"
        "    def forward(self, z):\n        return (torch.zeros(z.shape[0], 3, 8, 8),)\n\n"
        f"def make():\n    net = {body}\n    net.latent_dim = 8\n    return net\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "badgen", raising=False)
    with pytest.raises(InputError, match=re.escape(expected)):
        open_generator("badgen:make")
    sys.modules.pop("badgen", None)


def test_finetuned_non_persistent_buffers_survive_weights_round_trip(tmp_path):
    """StyleGAN2's w_avg is not in state_dict, but finetuning's average moves it: --weights must bring it back."""
    import torch

    from patchscope.generators.custom import load_user_weights, user_state_dict
    from patchscope.generators.stylegan2.model import StyleGAN2Config, StyleGAN2Generator

    config = StyleGAN2Config(size=8, style_dim=8, n_mlp=1, channels=(4, 4))
    trained = StyleGAN2Generator(config)
    with torch.no_grad():
        trained.w_avg.add_(1.5)
    fresh = StyleGAN2Generator(config)
    assert not torch.equal(fresh.w_avg, trained.w_avg)
    load_user_weights(fresh, user_state_dict(trained), "weights")
    assert torch.equal(fresh.w_avg, trained.w_avg)


def test_a_settings_file_cannot_name_code_to_run(tmp_path, monkeypatch):
    """MODULE:CALLABLE imports and calls code: only the command line may name it, never a --config file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shared.yaml").write_text("exaggerate:\n  generator: os:getcwd\n")
    result = CliRunner().invoke(main, ["exaggerate", "--config", "shared.yaml", "--classifier", "c", "--out", "o"])
    assert result.exit_code == 2 and "names code to import and run" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()
