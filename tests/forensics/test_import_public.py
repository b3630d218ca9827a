"""Specification of forensics.import_public and `patchscope import-checkpoint`.

A checkpoint in the public patch-forensics format is built here without the library's table: the public key
names are written out by hand from chail/patch-forensics (models/networks/customnet.py CustomXceptionNet and
CustomResNet with `convout`, models/networks/xception.py Block and SeparableConv2d, torchvision's BasicBlock),
filled from a random patchscope model, the head's class rows put in the public order (fake = 0, real = 1), and
saved as models/base_model.py save_networks saves it. Importing it must score exactly as the patchscope run.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from patchscope.cli import main
from patchscope.common.errors import CheckpointError
from patchscope.forensics.checkpoint import save_classifier
from patchscope.forensics.import_public import ImportConfig, import_checkpoint, map_state_dict
from patchscope.forensics.models import build_model


def bn(name: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (channels,), f"{name}.bias": (channels,), f"{name}.running_mean": (channels,),
            f"{name}.running_var": (channels,), f"{name}.num_batches_tracked": ()}


def separable(name: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.conv1.weight": (cin, 1, 3, 3), f"{name}.pointwise.weight": (cout, cin, 1, 1)}


XCEPTION_STEM = {"conv1.weight": (32, 3, 3, 3), **bn("bn1", 32), "conv2.weight": (64, 32, 3, 3), **bn("bn2", 64)}
# block1 = Block(64, 128, 2, 2, start_with_relu=False): rep = [sep, bn, relu, sep, bn, maxpool]
BLOCK1 = {**separable("block1.rep.0", 64, 128), **bn("block1.rep.1", 128), **separable("block1.rep.3", 128, 128),
          **bn("block1.rep.4", 128), "block1.skip.weight": (128, 64, 1, 1), **bn("block1.skipbn", 128)}
# block2 = Block(128, 256, 2, 2, start_with_relu=True): rep = [relu, sep, bn, relu, sep, bn, maxpool]
BLOCK2 = {**separable("block2.rep.1", 128, 256), **bn("block2.rep.2", 256), **separable("block2.rep.4", 256, 256),
          **bn("block2.rep.5", 256), "block2.skip.weight": (256, 128, 1, 1), **bn("block2.skipbn", 256)}
BASIC = lambda name: {f"{name}.conv1.weight": (64, 64, 3, 3), **bn(f"{name}.bn1", 64),  # noqa: E731
                      f"{name}.conv2.weight": (64, 64, 3, 3), **bn(f"{name}.bn2", 64)}
# public key -> (shape, patchscope key): the names agree, so the inverse table is the identity, by hand
PUBLIC_KEYS = {
    "xception_block1": {**XCEPTION_STEM, **BLOCK1, "convout.weight": (2, 128, 1, 1), "convout.bias": (2,)},
    "xception_block2": {**XCEPTION_STEM, **BLOCK1, **BLOCK2, "convout.weight": (2, 256, 1, 1), "convout.bias": (2,)},
    "resnet18_layer1": {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64), **BASIC("layer1.0"), **BASIC("layer1.1"),
                        "convout.weight": (2, 64, 1, 1), "convout.bias": (2,)},
}


def random_model(name: str, seed: int = 0):
    """A patchscope model with every tensor random, BN statistics and the head bias included."""
    model = build_model(name, seed=seed, init="kaiming")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif key.endswith(("running_mean", "bias")):
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
            elif key.endswith("weight") and tensor.dim() == 1:  # BN scale
                tensor.copy_(1 + 0.3 * torch.randn(tensor.shape, generator=generator))
            elif key.endswith("num_batches_tracked"):
                tensor.fill_(1234)
        model.convout.bias.copy_(torch.tensor([0.4, -0.3]))
    return model.eval()


def public_state_dict(model, name: str) -> dict[str, torch.Tensor]:
    ours = model.state_dict()
    public = {}
    for key, shape in PUBLIC_KEYS[name].items():
        tensor = ours[key].clone()
        assert tuple(tensor.shape) == shape, key
        if key.startswith("convout."):  # patchscope rows [real, fake] -> public rows [fake, real]
            tensor = torch.stack([tensor[1], tensor[0]])
        public[key] = tensor
    return public


def save_public(path, state: dict[str, torch.Tensor], *, wrapper: bool = True, legacy: bool = False):
    """What save_networks writes: the net's state dict with the optimizer, scheduler and epoch counters."""
    record = state
    if wrapper:
        params = [v for k, v in state.items() if "running" not in k and "num_batches" not in k]
        optimizer = {"state": {i: {"step": 7, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                               for i, p in enumerate(params)},
                     "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0,
                                       "amsgrad": False, "params": list(range(len(params)))}]}
        scheduler = {"factor": 0.1, "patience": 1000, "mode": "max", "threshold": 0.0001, "best": 0.97,
                     "mode_worse": -float("inf"), "eps": 0.001, "last_epoch": 12, "min_lrs": [0]}
        record = {"state_dict": state, "optimizer": optimizer, "scheduler": scheduler, "epoch": 12,
                  "best_val_metric": 0.97, "best_val_ep": 12}
    torch.save(record, path, _use_new_zipfile_serialization=not legacy)
    return path


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """6 real and 6 fake 48 px PNGs of random texture (flat folders)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for kind in ("real", "fake"):
        (root / kind).mkdir()
        for i in range(6):
            pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
            if kind == "fake":
                pixels = (pixels // 64 * 64).astype(np.uint8)
            Image.fromarray(pixels).save(root / kind / f"{i}.png")
    return root


@pytest.mark.parametrize("name", sorted(PUBLIC_KEYS))
def test_the_hand_written_public_names_are_the_ones_the_table_maps(name):
    public = public_state_dict(random_model(name), name)
    fit = map_state_dict(public, name)
    assert fit.ok, fit.problems()
    assert sorted(fit.state) == sorted(build_model(name).state_dict())


@pytest.mark.parametrize("name", sorted(PUBLIC_KEYS))
def test_an_imported_checkpoint_scores_exactly_as_the_patchscope_run(name, images, tmp_path):
    model = random_model(name, seed=3)
    save_classifier(tmp_path / "ours" / "best", model, {"epoch": 12, "config": {"load_size": 48, "crop_size": 48}})
    public = save_public(tmp_path / "bestval_net_D.pth", public_state_dict(model, name))
    result = run("import-checkpoint", public, "--model", name, "--out", tmp_path / "imported",
                 "--load-size", 48, "--crop-size", 48)
    assert result.exit_code == 0, result.output
    assert name in result.stdout and "classes swapped" in result.stdout
    ours = load_file(tmp_path / "ours" / "best.safetensors")
    imported = load_file(tmp_path / "imported" / "best.safetensors")
    assert ours.keys() == imported.keys() and all(torch.equal(ours[k], imported[k]) for k in ours)
    meta = json.loads((tmp_path / "imported" / "best.json").read_text())
    assert meta["model"] == name and meta["epoch"] == 12
    assert (meta["config"]["load_size"], meta["config"]["crop_size"], meta["config"]["model"]) == (48, 48, name)
    digest = hashlib.sha256(public.read_bytes()).hexdigest()
    assert meta["imported_from"]["file"] == "bestval_net_D.pth" and meta["imported_from"]["sha256"] == digest
    scores = {}
    for run_name in ("ours", "imported"):
        folder = tmp_path / run_name
        result = run("eval", folder, "--test", f"t={images / 'real'},{images / 'fake'}", "--device", "cpu",
                     "--precision", "fp32", "--batch-size", 5)
        assert result.exit_code == 0, result.output
        scores[run_name] = (folder / "eval" / "scores_t.csv").read_text()
        result = run("score", folder, images / "fake", "--csv", tmp_path / f"{run_name}.csv", "--device", "cpu",
                     "--precision", "fp32")
        assert result.exit_code == 0, result.output
    assert scores["ours"] == scores["imported"]
    assert (tmp_path / "ours.csv").read_text() == (tmp_path / "imported.csv").read_text()
    rows = list(csv.DictReader(scores["ours"].splitlines()))
    assert len(rows) == 12 and len({row["score"] for row in rows}) > 1  # a model whose scores tell images apart
    metrics = json.loads((tmp_path / "imported" / "eval" / "metrics.json").read_text())
    assert "patch_ap_real" in metrics["results"]["t"]["after_softmax"]


def test_the_classes_are_swapped_only_for_a_checkpoint_whose_fake_class_is_0(tmp_path):
    model = random_model("xception_block1")
    path = save_public(tmp_path / "x.pth", public_state_dict(model, "xception_block1"))
    swapped = import_checkpoint(ImportConfig(file=str(path), out=str(tmp_path / "a")))
    kept = import_checkpoint(ImportConfig(file=str(path), out=str(tmp_path / "b"), fake_class_id=1))
    assert swapped["imported_from"]["classes_swapped"] and not kept["imported_from"]["classes_swapped"]
    a, b = (load_file(tmp_path / folder / "best.safetensors") for folder in "ab")
    assert torch.equal(a["convout.bias"], model.convout.bias) and torch.equal(b["convout.bias"], model.convout.bias.flip(0))
    assert torch.equal(a["convout.weight"], model.convout.weight)


@pytest.mark.parametrize("variant", ["dataparallel", "legacy", "bare"])
def test_auto_finds_the_model_in_every_way_the_public_code_saves(variant, tmp_path):
    model = random_model("xception_block2")
    state = public_state_dict(model, "xception_block2")
    if variant == "dataparallel":
        state = {f"module.{k}": v for k, v in state.items()}
    path = save_public(tmp_path / "x.pth", state, wrapper=variant != "bare", legacy=variant == "legacy")
    summary = import_checkpoint(ImportConfig(file=str(path), out=str(tmp_path / "run"), load_size=64, crop_size=None))
    assert summary["model"] == "xception_block2"
    imported = load_file(tmp_path / "run" / "best.safetensors")
    assert all(torch.equal(imported[k], v) for k, v in model.state_dict().items())


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_a_wrong_model_is_one_line_naming_the_mismatch_and_the_model_that_fits(tmp_path):
    path = save_public(tmp_path / "x.pth", public_state_dict(random_model("xception_block1"), "xception_block1"))
    line = one_error_line(run("import-checkpoint", path, "--model", "xception_block2", "--out", tmp_path / "run"))
    assert "does not fit xception_block2" in line and "block2.rep.1.conv1.weight" in line
    assert "it fits xception_block1" in line
    line = one_error_line(run("import-checkpoint", path, "--model", "resnet18_layer1", "--out", tmp_path / "run"))
    assert "public tensors unused" in line and "shapes differ: conv1.weight (32, 3, 3, 3) vs" in line
    assert not (tmp_path / "run").exists()


def test_a_state_dict_of_no_known_model_is_refused(tmp_path):
    state = public_state_dict(random_model("xception_block1"), "xception_block1")
    del state["block1.skipbn.running_var"]
    path = save_public(tmp_path / "x.pth", state)
    line = one_error_line(run("import-checkpoint", path, "--out", tmp_path / "run"))
    assert "fits none of the public code's models" in line and "closest xception_block1" in line
    assert "block1.skipbn.running_var" in line


@pytest.mark.parametrize("legacy", [False, True])
def test_a_truncated_file_is_one_line(legacy, tmp_path):
    path = save_public(tmp_path / "x.pth", public_state_dict(random_model("xception_block1"), "xception_block1"),
                       legacy=legacy)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    line = one_error_line(run("import-checkpoint", path, "--out", tmp_path / "run"))
    assert str(path) in line and ("truncated" in line or "damaged" in line)
    assert not (tmp_path / "run").exists()


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "x.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "epoch": RunsCode(marker)}, path)
    line = one_error_line(run("import-checkpoint", path, "--out", tmp_path / "run"))
    assert "refused" in line and "mkdir" in line and "weights_only" in line
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_not_a_checkpoint_and_no_file_are_one_line(tmp_path):
    (tmp_path / "a.pth").write_text("hello")
    assert "truncated or not a torch.save file" in one_error_line(
        run("import-checkpoint", tmp_path / "a.pth", "--out", tmp_path / "run"))
    assert "no such file" in one_error_line(run("import-checkpoint", tmp_path / "b.pth", "--out", tmp_path / "run"))
    torch.save([1, 2, 3], tmp_path / "c.pth")
    assert "no state dict" in one_error_line(run("import-checkpoint", tmp_path / "c.pth", "--out", tmp_path / "run"))


def test_the_out_folder_follows_the_run_folder_rules(tmp_path):
    path = save_public(tmp_path / "x.pth", public_state_dict(random_model("xception_block1"), "xception_block1"))
    out = tmp_path / "run"
    assert run("import-checkpoint", path, "--out", out).exit_code == 0
    assert run("import-checkpoint", path, "--out", out).exit_code == 0  # the same settings rewrite it
    line = one_error_line(run("import-checkpoint", path, "--out", out, "--crop-size", 128))
    assert "crop_size" in line and "--force" in line
    assert run("import-checkpoint", path, "--out", out, "--crop-size", 128, "--force").exit_code == 0
    assert json.loads((out / "best.json").read_text())["config"]["crop_size"] == 128
    trained = tmp_path / "trained"
    save_classifier(trained / "best", build_model("xception_block1"), {"config": {}})
    (trained / "config.yaml").write_text("model: xception_block1\n")
    before = (trained / "best.safetensors").read_bytes()
    one_error_line(run("import-checkpoint", path, "--out", trained, "--force"))
    assert (trained / "best.safetensors").read_bytes() == before


def test_the_library_refuses_with_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        import_checkpoint(ImportConfig(file=str(tmp_path / "none.pth"), out=str(tmp_path / "run")))


def test_a_public_full_resnet18_baseline_scores_as_torchvisions_network(tmp_path):
    # networks.define_D('resnet18'): torchvision's resnet18(num_classes=2), fc rows [fake, real]
    from torchvision.models import resnet18

    from patchscope.common.labels import p_fake
    from patchscope.forensics.checkpoint import load_classifier

    torch.manual_seed(0)
    public = resnet18(num_classes=2)
    with torch.no_grad():
        for module in public.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        public.fc.bias.copy_(torch.tensor([0.2, -0.1]))
    public.eval()
    path = save_public(tmp_path / "bestval_net_D.pth", public.state_dict())
    summary = import_checkpoint(ImportConfig(file=str(path), out=str(tmp_path / "run"), load_size=64, crop_size=64))
    assert summary["model"] == "resnet18"
    ours, _ = load_classifier(tmp_path / "run")
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(p_fake(ours(x)).reshape(-1), torch.softmax(public(x), dim=1)[:, 0])


def test_the_full_xception_takes_cadenes_names_and_its_last_linear():
    # xception.Xception: block12 = Block(728, 1024, 2, 2, grow_first=False), conv3/conv4 separable, last_linear
    from patchscope.forensics.import_public import expected_shapes

    with torch.device("meta"):
        public = {k: torch.empty(s) for k, s in expected_shapes("xception").items() if not k.startswith("convout")}
        public.update({"last_linear.weight": torch.empty(2, 2048), "last_linear.bias": torch.empty(2)})
    hand = {"block12.rep.1.pointwise.weight": (728, 728, 1, 1), "block12.rep.4.pointwise.weight": (1024, 728, 1, 1),
            "block12.skip.weight": (1024, 728, 1, 1), "conv3.conv1.weight": (1024, 1, 3, 3),
            "conv3.pointwise.weight": (1536, 1024, 1, 1), "conv4.pointwise.weight": (2048, 1536, 1, 1),
            "bn4.running_var": (2048,)}
    assert {k: tuple(public[k].shape) for k in hand} == hand
    fit = map_state_dict(public, "xception")
    assert fit.ok, fit.problems()
    assert tuple(fit.state["convout.weight"].shape) == (2, 2048, 1, 1)


def test_patches_and_report_take_the_imported_run(images, tmp_path):
    path = save_public(tmp_path / "x.pth", public_state_dict(random_model("xception_block1"), "xception_block1"))
    out = tmp_path / "run"
    assert run("import-checkpoint", path, "--out", out, "--load-size", 48, "--crop-size", 48).exit_code == 0
    result = run("patches", out, "--real", images / "real", "--fake", images / "fake", "-n", 4, "--device", "cpu")
    assert result.exit_code == 0, result.output
    result = run("report", out)
    assert result.exit_code == 0, result.output
    assert "Most predictive patches" in (out / "report.html").read_text()
