"""Offline LPIPS: backbone weights come from a file or the torch cache (never a download),
land in the right lpips slices, and the frozen distance behaves like a distance."""
from __future__ import annotations

import logging
from pathlib import Path

import lpips
import pytest
import torch
from torchvision import models as tv_models

from patchscope.attacks.perceptual import backbone_key, load_lpips
from patchscope.common.errors import InputError



@pytest.fixture(autouse=True)
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch cache, so no test sees weights the machine happens to hold."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def random_lpips() -> torch.nn.Module:
    return load_lpips("alex", allow_random=True)


def _torchvision_state(net: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    if net == "alex":
        # Only `features.*`: the 37M-weight classifier is not used by LPIPS and would bloat the file.
        state = tv_models.alexnet(weights=None).state_dict()
        return {k: v for k, v in state.items() if k.startswith("features.")}
    return tv_models.squeezenet1_1(weights=None).state_dict()  # whole, classifier included


@pytest.mark.parametrize("net", ["alex", "squeeze"])
def test_backbone_weights_from_a_torchvision_state_dict_fill_the_lpips_slices(net: str, tmp_path: Path) -> None:
    saved = _torchvision_state(net)
    path = tmp_path / "backbone.pth"
    torch.save(saved, path)
    model = load_lpips(net, weights=path)
    trunk = model.model.net.state_dict()
    assert model.source == str(path)
    assert len(trunk) == len([k for k in saved if k.startswith("features.")])
    for key, value in trunk.items():
        torch.testing.assert_close(value, saved[backbone_key(key)], rtol=0, atol=0)
    # the first conv really is torchvision's features.0 (lpips keeps the layer index in the slice)
    assert torch.equal(model.model.net.slice1[0].weight, saved["features.0.weight"])


def test_weights_in_the_torch_hub_cache_are_found(empty_torch_home: Path) -> None:
    cached = empty_torch_home / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
    cached.parent.mkdir(parents=True)
    saved = _torchvision_state("squeeze")
    torch.save(saved, cached)
    model = load_lpips("squeeze")
    assert model.source == str(cached)
    assert torch.equal(model.model.net.slice1[0].weight, saved["features.0.weight"])


@pytest.mark.parametrize("net, file_name", [("alex", "alexnet-owt-7be5be79.pth"),
                                            ("vgg", "vgg16-397923af.pth"),
                                            ("squeeze", "squeezenet1_1-b8a52dc0.pth")])
def test_missing_weights_error_names_the_file_where_it_is_published_and_the_flag(net: str, file_name: str) -> None:
    with pytest.raises(InputError) as error:
        load_lpips(net)
    message = str(error.value)
    assert "\n" not in message
    assert f"https://download.pytorch.org/models/{file_name}" in message
    assert "--lpips-weights" in message
    assert str(Path("hub") / "checkpoints") in message
    # the way out without the file, and what it costs
    assert "--lpips-random (lpips_random: true in a YAML config)" in message
    assert "distances are no longer perceptual" in message
    # the linear layers need no download: the file the message names ships inside the lpips package
    assert f"v0.1/{net}.pth, come with the lpips package" in message
    assert (Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth").is_file()


def test_the_options_the_message_names_exist_on_every_lpips_command() -> None:
    from patchscope.cli import main

    for command in ("exaggerate", "finetune", "invert"):
        flags = {flag for param in main.commands[command].params for flag in param.opts}
        assert {"--lpips-random", "--lpips-weights"} <= flags, command


def test_a_weights_path_that_does_not_exist_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nowhere\.pth: LPIPS backbone weights not found .*alexnet-owt"):
        load_lpips("alex", weights=tmp_path / "nowhere.pth")


def test_a_file_of_other_tensors_is_refused_with_the_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    expected = r"other\.pth: not a torchvision alexnet state dict \(missing features\.0\.weight"
    with pytest.raises(InputError, match=expected):
        load_lpips("alex", weights=path)


def test_a_file_that_is_not_torch_weights_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("not weights")
    with pytest.raises(InputError, match=r"notes\.pth: not a torch weights file"):
        load_lpips("alex", weights=path)


def test_an_unknown_network_is_refused() -> None:
    with pytest.raises(InputError, match="expected one of alex, vgg, squeeze"):
        load_lpips("resnet", allow_random=True)


def test_random_backbone_is_allowed_only_on_request_and_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="patchscope.perceptual"):
        model = load_lpips("alex", allow_random=True)
    assert model.source == "random"
    assert "RANDOM backbone" in caplog.text


def test_distance_of_an_image_to_itself_is_zero_and_the_distance_is_symmetric(random_lpips) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1
    y = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1
    assert torch.equal(random_lpips(x, x), torch.zeros(3))
    d_xy, d_yx = random_lpips(x, y), random_lpips(y, x)
    assert d_xy.shape == (3,) and bool((d_xy > 0).all())
    torch.testing.assert_close(d_xy, d_yx)


def test_lpips_is_frozen_and_deterministic_even_after_train(random_lpips) -> None:
    random_lpips.train()
    assert not random_lpips.training and not any(m.training for m in random_lpips.modules())
    assert not any(p.requires_grad for p in random_lpips.parameters())
    x, y = torch.zeros(2, 3, 32, 32), torch.full((2, 3, 32, 32), 0.5)
    assert torch.equal(random_lpips(x, y), random_lpips(x, y))  # dropout would make these differ


def test_gradients_flow_to_the_images(random_lpips) -> None:
    x = torch.zeros(1, 3, 32, 32)
    y = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_(True)
    random_lpips(x, y).sum().backward()
    assert y.grad is not None and bool(y.grad.abs().sum() > 0) and bool(torch.isfinite(y.grad).all())


def test_images_smaller_than_the_trunk_accepts_are_upsampled(random_lpips) -> None:
    assert random_lpips.min_side == 32  # alexnet's pooling leaves nothing of a 16 px image
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    y = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    up = lambda t: torch.nn.functional.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False)  # noqa: E731
    torch.testing.assert_close(random_lpips(x, y), random_lpips(up(x), up(y)))


def test_the_random_backbone_is_the_same_in_every_run_and_leaves_the_callers_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = load_lpips("squeeze", allow_random=True)
    assert torch.equal(torch.rand(1), expected_next)
    second = load_lpips("squeeze", allow_random=True)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
