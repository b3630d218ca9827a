"""What researchers expect of a command line: --dry-run everywhere, --threads, eval's extras in its config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from patchscope.cli import main
from patchscope.common import config as configs
from patchscope.common.errors import InputError
from patchscope.forensics.checkpoint import save_classifier
from patchscope.forensics.evaluate import EvalConfig
from patchscope.forensics.models import build_model


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_offers_dry_run(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "--dry-run" in result.output


# command line (OUT and CONFIG filled in), --config contents, settings expected in the printed YAML
DRY_RUNS = {
    "train": (["train", "--config", "CONFIG", "--out", "OUT", "--model", "xception_block1", "--lr", "0.01"],
              "train:\n  model: resnet18_layer1\n  max_epochs: 7\n",
              {"out": "OUT", "model": "xception_block1", "lr": 0.01, "max_epochs": 7}),
    "eval": (["eval", "RUN", "--config", "CONFIG", "--out", "OUT", "--heatmaps", "3", "--test", "a=r,f"],
             "eval:\n  perturb: [jpeg:75, 'blur:1,2']\n  heatmaps: 1\n  batch_size: 8\n",
             {"out": "OUT", "run": "RUN", "heatmaps": 3, "perturb": ["jpeg:75", "blur:1,2"], "batch_size": 8,
              "tests": ["a=r,f"]}),
    "patches": (["patches", "RUN", "--config", "CONFIG", "--out", "OUT", "--seed", "5"],
                "patches:\n  n: 17\n", {"out": "OUT", "seed": 5, "n": 17}),
    "exaggerate": (["exaggerate", "--config", "CONFIG", "--out", "OUT", "--lam", "0.5", "--ks", "-1,1"],
                   "exaggerate:\n  steps: 9\n", {"out": "OUT", "lam": 0.5, "steps": 9, "ks": [-1.0, 1.0]}),
    "finetune": (["finetune", "--config", "CONFIG", "--out", "OUT", "--batch-size", "4"],
                 "finetune:\n  steps: 11\n", {"out": "OUT", "batch_size": 4, "steps": 11}),
    "retrain": (["retrain", "--config", "CONFIG", "--out", "OUT", "--train", "5"],
                "retrain:\n  n: 13\n", {"out": "OUT", "counts": {"train": 5}, "n": 13}),
    "invert": (["invert", "--config", "CONFIG", "--out", "OUT", "--lr", "0.2"],
               "invert:\n  steps: 12\n", {"out": "OUT", "lr": 0.2, "steps": 12}),
    "train-gan": (["train-gan", "--config", "CONFIG", "--out", "OUT", "--latent-dim", "8"],
                  "train_gan:\n  resolution: 16\n", {"out": "OUT", "latent_dim": 8, "resolution": 16}),
    "demo": (["demo", "--config", "CONFIG", "--out", "OUT", "--quick"],
             "seed: 3\n", {"out": "OUT", "quick": True}),
    "sample": (["sample", "gen.pt", "--out", "OUT", "--train", "4", "--psi", "0.5"], None,
               {"out": "OUT", "counts": {"train": 4}, "opts": {"psi": 0.5}, "chunk": 8}),
    "prepare": (["prepare", "src", "--out", "OUT", "--resolution", "32", "--test", "2"], None,
                {"out": "OUT", "sources": ["src"], "resolution": 32, "counts": {"test": 2}}),
    "spectra": (["spectra", "--real", "r", "--fake", "f", "--out", "OUT", "--size", "16"], None,
                {"out": "OUT", "size": 16, "max_images": 2000}),
    "report": (["report", "RUN", "--out", "OUT", "--title", "t"], None, {"run_dir": "RUN", "out": "OUT", "title": "t"}),
    "score": (["score", "RUN", "img.png", "--config", "CONFIG", "--out", "OUT", "--batch-size", "4"],
              "score:\n  workers: 1\n  batch_size: 2\n",
              {"out": "OUT", "run": "RUN", "inputs": ["img.png"], "batch_size": 4, "workers": 1}),
    "study": (["study", "CONFIG", "--out", "OUT"],
              "study:\n  models: {xception_block1: {}}\n  train_sets: {a: {real: r, fake: f}}\n"
              "  test_sets: {t: {real: r, fake: f}}\n",
              {"out": "OUT", "todo": ["train xception_block1__a", "eval xception_block1__a on t"]}),
    "import-checkpoint": (["import-checkpoint", "x.pth", "--config", "CONFIG", "--out", "OUT", "--crop-size", "128"],
                          "import_checkpoint:\n  load_size: 150\n",
                          {"out": "OUT", "file": "x.pth", "model": "auto", "load_size": 150, "crop_size": 128}),
    "table": (["table", "r1", "--out", "OUT", "--metric", "ap"], None,
              {"out": "OUT", "results": ["r1"], "metric": "ap", "aggregation": "after_softmax"}),
}


@pytest.mark.parametrize("command", sorted(DRY_RUNS))
def test_dry_run_prints_the_resolved_settings_and_writes_nothing(command, tmp_path):
    args, config_text, expected = DRY_RUNS[command]
    out, config = tmp_path / "out", tmp_path / "config.yaml"
    if config_text is not None:
        config.write_text(config_text)
    names = {"OUT": str(out), "CONFIG": str(config), "RUN": str(tmp_path / "run")}
    result = run(*[names.get(arg, arg) for arg in args], "--dry-run")
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    settings = printed["settings"] if command == "demo" else printed
    for key, value in expected.items():
        assert printed[key] == (names.get(value, value) if isinstance(value, str) else value), key
    if command == "demo":
        assert settings["seed"] == 3  # the --config value over configs/demo.yaml
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["config.yaml"] if config_text else [])


def test_dry_run_of_models_prints_its_empty_arguments_and_lists_nothing():
    result = run("models", "--dry-run")
    assert result.exit_code == 0 and yaml.safe_load(result.stdout) == {}
    assert "xception_block1" not in result.output


def test_a_dry_run_still_refuses_bad_settings(tmp_path):
    result = run("eval", str(tmp_path), "--test", "a=r,f", "--perturb", "jpeg:200", "--dry-run")
    assert result.exit_code == 2 and "setting perturb=['jpeg:200']" in result.stderr and "JPEG quality" in result.stderr
    config = tmp_path / "c.yaml"
    config.write_text("eval:\n  heatmaps: -2\n")
    result = run("eval", str(tmp_path), "--test", "a=r,f", "--config", str(config), "--dry-run")
    assert result.exit_code == 2 and "setting heatmaps=-2" in result.stderr


def test_threads_sets_torchs_thread_count_and_refuses_zero():
    before = torch.get_num_threads()
    wanted = before + 2
    try:
        result = run("--threads", str(wanted), "models", "--dry-run")
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)
    result = run("--threads", "0", "models", "--dry-run")
    assert result.exit_code == 2 and "--threads" in result.output
    assert torch.get_num_threads() == before


def test_eval_settings_round_trip_through_yaml(tmp_path):
    cfg = EvalConfig(run="r", tests=["a=r,f"], heatmaps=4, perturb=["jpeg:95,50", "blur:1.5"])
    path = tmp_path / "config.yaml"
    path.write_text(configs.to_yaml(cfg))
    assert configs.resolve(EvalConfig, configs.read_yaml(path)) == cfg
    # A single spec in YAML is one --perturb.
    assert configs.resolve(EvalConfig, {"perturb": "jpeg:90"}).perturb == ["jpeg:90"]


@pytest.mark.parametrize("settings, message", [
    ({"heatmaps": -1}, "setting heatmaps=-1: expected an integer >= 0"),
    ({"heatmaps": 1.5}, "setting heatmaps=1.5"),
    ({"perturb": ["jpeg:101"]}, r"setting perturb=\['jpeg:101'\]: expected KIND:LEVEL.* \(perturbation 'jpeg:101'"),
    ({"perturb": ["jpeg:90", "jpeg:90"]}, r"setting perturb=.*\(perturbation jpeg:90 given more than once\)"),
    ({"perturb": [90]}, "setting perturb=\\[90\\]: expected a list"),
])
def test_eval_settings_are_checked_where_they_are_built(settings, message):
    with pytest.raises(InputError, match=message):
        EvalConfig(**settings)


@pytest.fixture(scope="module")
def random_run(tmp_path_factory) -> Path:
    """A random-weight classifier saved as a run (scores are arbitrary; the outputs' existence is tested)."""
    run_dir = tmp_path_factory.mktemp("habits") / "run"
    save_classifier(run_dir / "best", build_model("xception_block1", seed=0),
                    {"config": {"load_size": 32, "crop_size": 32}})
    return run_dir


def test_heatmaps_and_perturb_from_the_config_file_produce_their_outputs(random_run, builtin_dataset, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"eval": {
        "tests": [f"b={builtin_dataset / 'real'},{builtin_dataset / 'fake'}"], "heatmaps": 1,
        "perturb": ["jpeg:75"], "batch_size": 32, "device": "cpu", "precision": "fp32"}}))
    out = tmp_path / "eval"
    result = run("eval", str(random_run), "--config", str(config), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "heatmaps" / "b" / "heatmaps.html").is_file()
    sweep = json.loads((out / "robustness" / "b" / "robustness.json").read_text())
    assert [(row["perturbation"], row["level"]) for row in sweep["rows"]] == [("none", None), ("jpeg", 75)]
    saved = configs.read_yaml(out / "config.yaml")
    assert saved["heatmaps"] == 1 and saved["perturb"] == ["jpeg:75"]
    assert f"heatmaps (b): {out / 'heatmaps' / 'b' / 'heatmaps.html'}" in result.stdout
    assert "robustness (b):" in result.stdout and "\njpeg:75 " in result.stdout


def test_flags_replace_the_config_files_heatmaps_and_perturb(random_run, builtin_dataset, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"eval": {"heatmaps": 2, "perturb": ["jpeg:75"]}}))
    out = tmp_path / "eval"
    result = run("eval", str(random_run), "--config", str(config), "--out", str(out), "--heatmaps", "0",
                 "--perturb", "blur:1", "--test", f"b={builtin_dataset / 'real'},{builtin_dataset / 'fake'}",
                 "--device", "cpu", "--batch-size", "32")
    assert result.exit_code == 0, result.output
    assert not (out / "heatmaps").exists()
    sweep = json.loads((out / "robustness" / "b" / "robustness.json").read_text())
    assert [row["perturbation"] for row in sweep["rows"]] == ["none", "blur"]
    saved = configs.read_yaml(out / "config.yaml")
    assert saved["heatmaps"] == 0 and saved["perturb"] == ["blur:1"]
