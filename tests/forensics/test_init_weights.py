"""`train --init-weights FILE`: a torchvision (or Cadene Xception) weight file starts the backbone, matched by key
and shape; a file for another model is refused in one line, exit 2, leaving no run folder."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner
from safetensors.torch import save_file

from patchscope.cli import main
from patchscope.common.errors import InputError
from patchscope.forensics import checkpoint
from patchscope.forensics.builtin_images import write_builtin_dataset
from patchscope.forensics.models import build_model
from patchscope.forensics.pretrained import load_init_weights, matching_tensors
from patchscope.forensics.train import TrainConfig, Training, fit


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One real and one fake training image: an epoch is one step of batch 2."""
    return write_builtin_dataset(tmp_path_factory.mktemp("tiny"), {"train": 1, "val": 2, "test": 2}, size=40)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Random torchvision networks saved as their state dicts, as torchvision publishes ImageNet weights."""
    folder = tmp_path_factory.mktemp("weights")
    files = {}
    for depth in (18, 34, 50):
        torch.manual_seed(depth)
        files[f"resnet{depth}"] = folder / f"resnet{depth}.pth"
        torch.save(getattr(torchvision.models, f"resnet{depth}")(weights=None).state_dict(), files[f"resnet{depth}"])
    return files


def config(data: Path, out: Path, **changes) -> TrainConfig:
    settings = dict(real=str(data / "real"), fake=str(data / "fake"), out=str(out), load_size=40, crop_size=40,
                    batch_size=2, max_epochs=1, device="cpu", precision="fp32", workers=0, init="xavier")
    return TrainConfig(**{**settings, **changes})


def backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("convout.")}


@pytest.mark.parametrize("model", ["resnet18", "resnet18_layer1", "resnet18_layer2"])
def test_a_torchvision_file_starts_the_backbone_exactly_and_the_head_fresh(model, tiny, weights, tmp_path):
    file = torch.load(weights["resnet18"], weights_only=True)
    run = Training(config(tiny, tmp_path / "run", model=model, init_weights=str(weights["resnet18"])))
    run.claim(resume=False)
    try:
        run.build()  # 0 steps
    finally:
        run.finish()
    state = run.model.state_dict()
    for key, value in backbone(state).items():
        assert torch.equal(value, file[key]), key
    fresh = build_model(model, seed=0).state_dict()
    assert torch.equal(state["convout.weight"], fresh["convout.weight"])  # the head keeps the model's own init
    assert not torch.equal(state["conv1.weight"], fresh["conv1.weight"])


def test_one_training_step_moves_the_file_weights_by_about_the_learning_rate(tiny, weights, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--real", str(tiny / "real"), "--fake", str(tiny / "fake"), "--out",
                                       str(out), "--model", "resnet18_layer1", "--init-weights",
                                       str(weights["resnet18"]), "--load-size", "40", "--crop-size", "40",
                                       "--batch-size", "2", "--max-epochs", "1", "--lr", "1e-6", "--device", "cpu",
                                       "--precision", "fp32"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    file = torch.load(weights["resnet18"], weights_only=True)
    trained, meta = checkpoint.load_classifier(out, "last")
    assert meta["config"]["init_weights"] == str(weights["resnet18"])
    for name, param in trained.named_parameters():
        if not name.startswith("convout."):
            torch.testing.assert_close(param, file[name], rtol=0, atol=2e-6)  # one Adam step of lr 1e-6


def test_safetensors_wrapped_and_dataparallel_files_fit_too(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "r18.safetensors")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "wrapped.pth")
    for path in (tmp_path / "r18.safetensors", tmp_path / "wrapped.pth"):
        tensors = load_init_weights(build_model("resnet18"), path)
        assert all(torch.equal(tensors[k], state[k]) for k in tensors) and "fc.weight" not in tensors


def test_cadene_xception_files_fit_the_xception_models_pointwise_matrices_included(tmp_path):
    state = build_model("xception", seed=3).state_dict()
    file = {("fc" + k[len("convout"):] if k.startswith("convout") else k):
            (v[:, :, 0, 0] if k.endswith("pointwise.weight") else v) for k, v in state.items()}
    file["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(file, tmp_path / "xception-43020ad28.pth")
    for model in ("xception", "xception_block2"):
        tensors = load_init_weights(build_model(model), tmp_path / "xception-43020ad28.pth")
        target = backbone(build_model(model).state_dict())
        assert tensors.keys() == target.keys()
        assert all(torch.equal(tensors[k], state[k]) for k in tensors)


@pytest.mark.parametrize("model, file, expected", [
    ("resnet18", "resnet50", r"resnet50\.pth: does not fit resnet18 \(120 tensors besides its head\): "
                             r"\d+ of another shape \(e\.g\. layer1\.0\.conv1\.weight: 64x64x1x1 in the file, "
                             r"64x64x3x3 in the model\), \d+ in the file that it does not have"),
    ("resnet18_layer1", "resnet34", r"does not fit resnet18_layer1 .*in the file that it does not have "
                                    r"\(e\.g\. layer1\.2\.conv1\.weight\); expected torchvision's resnet18-f37072fd"),
    ("resnet34_layer1", "resnet18", r"does not fit resnet34_layer1 .*missing \(e\.g\. layer1\.2\.conv1\.weight\)"),
    ("xception_block1", "resnet18", r"does not fit xception_block1 .*missing \(e\.g\. conv2\.weight\).*"
                                    r"expected xception-43020ad28\.pth"),
    ("mesoinception4", "resnet18", r"does not fit mesoinception4 .*it has no published weights to start from"),
])
def test_a_file_for_another_model_is_refused_in_one_line_with_exit_2(model, file, expected, tiny, weights, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--real", str(tiny / "real"), "--fake", str(tiny / "fake"), "--out",
                                       str(out), "--model", model, "--init-weights", str(weights[file]),
                                       "--device", "cpu"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and re.search(expected, lines[0]), lines
    assert not out.exists()  # refused before the run folder is made


def test_unreadable_files_are_refused_without_executing_anything(tmp_path):
    model = build_model("resnet18")
    (tmp_path / "text.pth").write_text("not a weight file\n")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "no_tensors.pth")

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "executed",))

    torch.save({"conv1.weight": Payload()}, tmp_path / "code.pth", _use_new_zipfile_serialization=True)
    for name, message in (("text.pth", "not a readable weight file"), ("no_tensors.pth", "holds no tensors"),
                          ("code.pth", "not a readable weight file"), ("missing.pth", "no such file")):
        with pytest.raises(InputError, match=message):
            load_init_weights(model, tmp_path / name)
    assert not (tmp_path / "executed").exists()
    nan = {k: v.clone() for k, v in build_model("resnet18").state_dict().items()}
    nan["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="layer1.0.conv1.weight holds NaN"):
        matching_tensors(model, nan, "nan.pth")


def test_a_resumed_run_does_not_need_the_file_once_an_epoch_is_committed(tiny, weights, tmp_path):
    file = tmp_path / "copy.pth"
    file.write_bytes(weights["resnet18"].read_bytes())
    cfg = config(tiny, tmp_path / "run", model="resnet18_layer1", init_weights=str(file))
    fit(cfg)
    file.unlink()
    summary = fit(config(tiny, tmp_path / "run", model="resnet18_layer1", init_weights=str(file), max_epochs=2),
                  resume=True)
    assert summary["epochs"] == 2
    with pytest.raises(InputError, match="cannot resume with different init_weights"):
        fit(config(tiny, tmp_path / "run", model="resnet18_layer1", max_epochs=3), resume=True)

