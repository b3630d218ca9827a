"""The full-image baselines: their structure against published code and counts, their 1x1 logit maps, their
losses, and a few training steps of each evaluated through the shared scoring."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from click.testing import CliRunner
from torch import nn

from patchscope.cli import main
from patchscope.forensics import checkpoint
from patchscope.forensics.builtin_images import write_builtin_dataset
from patchscope.forensics.evaluate import EvalConfig, evaluate
from patchscope.forensics.losses import loss_for, patch_squared_error
from patchscope.forensics.meso import InceptionLayer
from patchscope.forensics.models import build_model, count_parameters, model_names
from patchscope.forensics.receptive import patch_boxes, receptive_field
from patchscope.forensics.scoring import image_scores, patch_cross_entropy
from patchscope.forensics.train import TrainConfig, fit

BASELINES = ["resnet18", "resnet50", "xception", "mesoinception4", "wang2020_resnet50"]

# MesoInception-4 as its authors' Keras code builds it (DariusAf/MesoNet, classifiers.py, class MesoInception4),
# counted by hand from that code, layer by layer (weights + biases):
#   InceptionLayer(1, 4, 4, 2) on 3 channels: 1x1 3->1 (4); 1x1 3->4 + 3x3 4->4 (16 + 148);
#     1x1 3->4 + 3x3 dil 2 4->4 (16 + 148); 1x1 3->2 + 3x3 dil 3 2->2 (8 + 38)           =   378
#   BatchNorm(11), gamma and beta                                                           =    22
#   InceptionLayer(2, 4, 4, 2) on 11 channels: 24 + (48 + 148) + (48 + 148) + (24 + 38)    =   478
#   BatchNorm(12)                                                                           =    24
#   Conv2D(16, 5x5) on 12 (4816), BatchNorm(16) (32), Conv2D(16, 5x5) on 16 (6416), BatchNorm(16) (32)
#   Dense(16) on 8 x 8 x 16 = 1024 features (16400), Dense(1) (17)
# = 28,615 trainable parameters; Keras' model.summary() adds the 110 moving means and variances of the four
# batch norms (2 x (11 + 12 + 16 + 16)) for 28,725 in all. The same arithmetic on the file's Meso4 gives
# 27,977, the trainable count the MesoNet paper (Afchar et al., WIFS 2018) states for Meso-4.
MESO_TRAINABLE = 28_615
MESO_MOVING_STATISTICS = 110
# Keras' Xception (Chollet 2017; keras.applications) and Cadene's PyTorch port: 22,855,952 trainable parameters
# with its 1000-class fc (2048 x 1000 + 1000).
XCEPTION_IMAGENET_TRAINABLE = 22_855_952


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """Two real and two fake 64 px images per split: two training steps of batch 2 make an epoch."""
    return write_builtin_dataset(tmp_path_factory.mktemp("tiny64"), {"train": 2, "val": 2, "test": 2}, size=64)


def test_baselines_are_registered_and_listed_as_whole_image_classifiers():
    assert set(BASELINES) <= set(model_names())
    result = CliRunner().invoke(main, ["models"], catch_exceptions=False)
    assert result.exit_code == 0
    rows = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    for name in BASELINES:
        assert "whole image" in rows[name] and "1x1" in rows[name], rows[name]
    assert rows["mesoinception4"].split()[-1] == "mse" and rows["resnet18"].split()[-1] == "ce"
    assert "43 px" in rows["xception_block2"] and "37x37" in rows["xception_block2"]


def test_mesoinception4_has_its_authors_layers_and_parameter_count():
    model = build_model("mesoinception4")
    assert count_parameters(model) == MESO_TRAINABLE
    stats = [b for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var"))]
    assert sum(b.numel() for b in stats) == MESO_MOVING_STATISTICS
    for layer, (cin, widths) in ((model.inception1, (3, (1, 4, 4, 2))), (model.inception2, (11, (2, 4, 4, 2)))):
        assert isinstance(layer, InceptionLayer) and layer.out_channels == sum(widths)
        convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
        assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.dilation[0]) for c in convs] == [
            (cin, widths[0], 1, 1), (cin, widths[1], 1, 1), (widths[1], widths[1], 3, 1),
            (cin, widths[2], 1, 1), (widths[2], widths[2], 3, 2), (cin, widths[3], 1, 1), (widths[3], widths[3], 3, 3)]
        assert all(c.bias is not None for c in convs)
    assert (model.conv3.in_channels, model.conv3.out_channels, model.conv3.kernel_size) == (12, 16, (5, 5))
    assert (model.conv4.in_channels, model.conv4.out_channels, model.conv4.kernel_size) == (16, 16, (5, 5))
    assert [bn.eps for bn in (model.bn1, model.bn2, model.bn3, model.bn4)] == [1e-3] * 4  # Keras' defaults
    assert [bn.momentum for bn in (model.bn1, model.bn2, model.bn3, model.bn4)] == [0.01] * 4
    assert (model.dense1.in_features, model.dense1.out_features, model.convout.out_features) == (1024, 16, 1)
    assert model.dropout1.p == model.dropout2.p == 0.5 and model.leaky.negative_slope == 0.1
    assert model.loss == "mse" and loss_for(model) is patch_squared_error
    # At the authors' 256 px the last pool is their 4x4 one: 32 x 32 -> 8 x 8 x 16 features.
    seen = {}
    model.pool4.register_forward_hook(lambda m, i, o: seen.update(before=i[0].shape, after=o.shape))
    with torch.no_grad():
        out = model.eval()(torch.rand(2, 3, 256, 256) * 2 - 1)
    assert seen == {"before": (2, 16, 32, 32), "after": (2, 16, 8, 8)} and out.shape == (2, 2, 1, 1)
    torch.testing.assert_close(F.max_pool2d(torch.arange(32.0 * 32).view(1, 1, 32, 32), 4),
                               model.pool4(torch.arange(32.0 * 32).view(1, 1, 32, 32)))


@pytest.mark.parametrize("name, depth", [("resnet18", 18), ("resnet50", 50), ("wang2020_resnet50", 50)])
def test_resnet_baselines_are_torchvisions_networks_with_a_new_head(name, depth):
    ours = build_model(name).state_dict()
    theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None).state_dict()
    backbone = {k: v.shape for k, v in ours.items() if not k.startswith("convout.")}
    assert backbone == {k: v.shape for k, v in theirs.items() if not k.startswith("fc.")}
    logits = 1 if name.startswith("wang") else 2
    assert ours["convout.weight"].shape == (logits, theirs["fc.weight"].shape[1], 1, 1)


def test_full_xception_has_the_published_parameter_count_and_the_patch_models_keys_as_prefix():
    model = build_model("xception")
    head = model.convout.weight.numel() + model.convout.bias.numel()
    assert count_parameters(model) - head + 2048 * 1000 + 1000 == XCEPTION_IMAGENET_TRAINABLE
    assert len([n for n in dict(model.named_children()) if n.startswith("block")]) == 12
    full = {k: v.shape for k, v in model.state_dict().items()}
    for patch in ("xception_block1", "xception_block5"):
        prefix = {k: v.shape for k, v in build_model(patch).state_dict().items() if not k.startswith("convout.")}
        assert prefix.items() <= full.items()
    assert model.block12.rep[1].pointwise.out_channels == 728 and model.block12.rep[4].pointwise.out_channels == 1024


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("batch, size", [(1, 64), (3, 67), (2, 96)])
def test_each_baseline_gives_a_one_cell_map_of_two_logits_that_sees_the_whole_image(name, batch, size):
    model = build_model(name, seed=0).eval()
    with torch.no_grad():
        out = model(torch.rand(batch, 3, size, size) * 2 - 1)
    assert out.shape == (batch, 2, 1, 1) and model.output_size(size) == 1 and model.whole_image
    boxes = patch_boxes(model, size)
    assert boxes.shape == (1, 1, 4) and boxes[0, 0, :2].tolist() == [0, 0]
    assert boxes[0, 0, 2] >= size - 1 and boxes[0, 0, 3] >= size - 1  # Xception's unpadded conv drops one row
    assert receptive_field(model).size > 8192


@pytest.mark.parametrize("name", ["mesoinception4", "wang2020_resnet50"])
def test_a_single_logit_is_the_pair_0_z_so_scores_and_losses_are_the_authors(name):
    model = build_model(name, seed=1).eval()
    x, labels = torch.rand(4, 3, 64, 64) * 2 - 1, torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        logits = model(x)
    z = logits[:, 1, 0, 0]
    assert torch.count_nonzero(logits[:, 0]) == 0
    torch.testing.assert_close(image_scores(logits), torch.sigmoid(z))
    # Cross entropy on [0, z] is CNNDetection's BCE-with-logits on z; the squared error is Keras' MSE on sigmoid(z).
    torch.testing.assert_close(patch_cross_entropy(logits, labels),
                               F.binary_cross_entropy_with_logits(z, labels.float()))
    torch.testing.assert_close(patch_squared_error(logits, labels), ((torch.sigmoid(z) - labels) ** 2).mean())


def test_wang_detector_normalises_its_inputs_as_imagenet_models_expect():
    model = build_model("wang2020_resnet50")
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.imagenet_norm(x), ((x + 1) / 2 - mean) / std)
    assert not any(k.startswith("imagenet_norm") for k in model.state_dict())


@pytest.mark.parametrize("name", BASELINES)
def test_each_baseline_trains_and_is_evaluated_through_the_shared_scoring(name, tiny64, tmp_path):
    run = tmp_path / "run"
    summary = fit(TrainConfig(real=str(tiny64 / "real"), fake=str(tiny64 / "fake"), out=str(run), model=name,
                              load_size=64, crop_size=64, batch_size=2, max_epochs=1, device="cpu", precision="fp32",
                              workers=0, seed=0))
    assert summary["epochs"] == 1
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert record["images"] == 4 and 0 <= record["val_patch_acc"] <= 1
    if name == "mesoinception4":
        assert 0 <= record["train_loss"] <= 1  # a squared error of probabilities
    before = build_model(name, seed=0).state_dict()
    trained, meta = checkpoint.load_classifier(run, "last")
    assert meta["model"] == name
    assert any(not torch.equal(before[k], v) for k, v in trained.state_dict().items() if v.is_floating_point())
    result = evaluate(EvalConfig(run=str(run), which="last", device="cpu", batch_size=3, workers=0,
                                 tests=[f"tiny={tiny64 / 'real'},{tiny64 / 'fake'}"]))
    metrics = result["results"]["tiny"]["after_softmax"]
    assert metrics["n_real"] == metrics["n_fake"] == 2 and 0 <= metrics["ap"] <= 1 and metrics["patch_ap"] == metrics["ap"]


def test_a_baseline_trains_and_evaluates_from_the_command_line(tiny64, tmp_path):
    runner, run = CliRunner(), tmp_path / "meso"
    result = runner.invoke(main, ["train", "--real", str(tiny64 / "real"), "--fake", str(tiny64 / "fake"),
                                  "--out", str(run), "--model", "mesoinception4", "--load-size", "64", "--crop-size",
                                  "48", "--batch-size", "2", "--max-epochs", "2", "--device", "cpu", "--precision",
                                  "fp32", "--augment", "blur_jpeg_0.5", "--random-resized-crop"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["eval", str(run), "--test", f"t={tiny64 / 'real'},{tiny64 / 'fake'}",
                                  "--device", "cpu", "--heatmaps", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (run / "eval" / "metrics.json").is_file() and (run / "eval" / "heatmaps").is_dir()
