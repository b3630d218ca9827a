"""`patchscope demo --quick` end to end: every stage's artifacts, a summary in range, a cached re-run,
and the bundled generator's provenance."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from patchscope.analysis.demo import BUNDLED_GENERATOR, DEFAULT_CONFIG, Demo, DemoConfig, load_demo_config
from patchscope.cli import main
from patchscope.generators.io.formats import checkpoint_sha256, load_generator
from tests.browser import chromium_or_skip, console_lines, image_states, render

ARTIFACTS = ("stages.json", "data/real/dataset.json", "data/real/train/00000.png", "fakes/manifest.json",
             "fakes/test/000000.png", "classifier/best.safetensors", "eval/metrics.json", "eval/pr_curve.png",
             "eval/heatmaps/builtin/heatmaps.html", "patches/patches.json", "patches/sheet_fake.png",
             "exaggerate/shift.pt", "exaggerate/metrics.json", "exaggerate/grid.png", "finetune/generator.pt",
             "finetune/before_after.json", "finetune/grid.png", "retrain/comparison.json", "retrain/comparison.png",
             "retrain/summary.txt", "demo_summary.json", "report.html")
STAGES = ("data", "generator", "fakes", "classifier", "eval", "patches", "exaggerate", "finetune", "retrain")


# CPU and fp32 whatever the machine (auto would pick bf16 on CUDA and on CPUs with native bf16), so the
# asserted numbers are the same on every CI machine.
PINNED = "device: cpu\nprecision: fp32\n"


def _demo(out):
    config = out.parent / "pinned.yaml"
    config.write_text(PINNED)
    return CliRunner().invoke(main, ["demo", "--out", str(out), "--quick", "--config", str(config)],
                              catch_exceptions=False)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    result = _demo(out)
    assert result.exit_code == 0, result.output
    return out, result.stdout


def _summary(stdout: str) -> dict[str, float]:
    """The closing table: `name  value` lines between the last stage line and the report path."""
    rows = {}
    for line in stdout.split("\n\n")[-2].strip().splitlines():
        name, value = line.rsplit(maxsplit=1)
        rows[name.strip()] = float(value)
    return rows


@pytest.mark.slow
def test_every_stage_leaves_its_artifacts(quick_demo):
    out, stdout = quick_demo
    missing = [name for name in ARTIFACTS if not (out / name).is_file()]
    assert not missing
    for stage in STAGES:
        assert f"[{stage:>10}]" in stdout
    assert f"report: {out / 'report.html'}" in stdout


@pytest.mark.slow
def test_the_summary_numbers_are_finite_probabilities_and_match_the_files(quick_demo):
    out, stdout = quick_demo
    rows = _summary(stdout)
    ks = load_demo_config(None, quick=True).exaggerate["ks"]
    assert len(rows) == 6 + 2 * len(ks)
    logits = {name: rows.pop(name) for name in list(rows) if name.startswith("its logit")}
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in rows.values())
    shift_rows = json.loads((out / "exaggerate" / "metrics.json").read_text())["rows"]
    for row in shift_rows:  # the logit rows are the stage's logits, rising with P(fake)
        assert logits[f"its logit (mean log-odds), k = {row['k']:+g}"] == pytest.approx(row["logit"], abs=5e-5)
    along = [logits[f"its logit (mean log-odds), k = {k:+g}"] for k in (-2, 0, 2)]
    assert along == sorted(along)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["results"]["builtin"]["after_softmax"]
    assert rows["AP of the patch classifier (original fakes)"] == pytest.approx(metrics["ap"], abs=5e-5)
    comparison = json.loads((out / "retrain" / "comparison.json").read_text())["metrics"]
    assert rows["AP of the retrained classifier (finetuned fakes)"] == pytest.approx(
        comparison["new"]["finetuned"]["ap"], abs=5e-5)
    shift = json.loads((out / "exaggerate" / "metrics.json").read_text())["rows"]
    assert [r["k"] for r in shift] == load_demo_config(None, quick=True).exaggerate["ks"]


@pytest.mark.slow
def test_the_quick_run_tells_the_papers_story(quick_demo):
    """Detectable at first, fooled by the finetuned generator, detectable again after retraining, and the
    learned shift moves P(fake) up in its direction and down against it. (The full run's margins are wider.)"""
    rows = _summary(quick_demo[1])
    assert rows["AP of the patch classifier (original fakes)"] >= 0.95
    assert rows["its accuracy on finetuned fakes + reals"] < rows["its accuracy on original fakes + reals"] - 0.15
    assert rows["its AP on finetuned fakes"] < rows["AP of the patch classifier (original fakes)"]
    assert rows["AP of the retrained classifier (finetuned fakes)"] >= 0.9
    along = [rows[f"P(fake) along the exaggeration, k = {k:+g}"] for k in (-2, 0, 2)]
    assert along[0] < along[1] < along[2]


@pytest.mark.slow
def test_a_second_run_reuses_every_stage(quick_demo):
    out, stdout = quick_demo
    before = {p: p.stat().st_mtime_ns for p in (out / "classifier").iterdir()}
    again = _demo(out)
    assert again.exit_code == 0, again.output
    assert again.stdout.count("(cached)") == len(STAGES)
    assert _summary(again.stdout) == _summary(stdout)
    assert {p: p.stat().st_mtime_ns for p in (out / "classifier").iterdir()} == before


def test_the_bundled_generator_is_what_its_record_says():
    record = json.loads(BUNDLED_GENERATOR.with_suffix(".json").read_text())
    assert record["sha256"] == checkpoint_sha256(BUNDLED_GENERATOR)
    assert "patchscope train-gan" in record["command"] and "configs/demo_gan.yaml" in record["command"]
    generator = load_generator(BUNDLED_GENERATOR)
    assert generator.resolution == load_demo_config(None).size == record["resolution"]
    assert generator.discriminator is not None  # finetuning needs it


def test_the_default_config_is_the_one_in_configs():
    assert DEFAULT_CONFIG.name == "demo.yaml" and DEFAULT_CONFIG.parent.name == "configs"
    cfg = load_demo_config(None)
    assert cfg.generator is None and cfg.train_gan is None  # the bundled PGAN by default


@pytest.mark.slow
def test_the_report_opens_in_a_browser_with_the_summary_first(quick_demo, tmp_path):
    out, _ = quick_demo
    report = out / "report.html"
    page = report.read_text()
    assert page.index("<h2>Demo summary</h2>") < page.index("<h2>Training: classifier</h2>")
    for title in ("Exaggeration: exaggerate", "Finetuning: finetune", "Retrain study: retrain",
                  "Most predictive patches: patches", "Heatmaps: eval/heatmaps/builtin"):
        assert f"<h2>{title}</h2>" in page
    chromium = chromium_or_skip()
    shown = render(chromium, report, tmp_path, f"--screenshot={tmp_path / 'shot.png'}", "--window-size=1280,1600")
    assert shown.returncode == 0 and console_lines(shown) == []
    assert image_states(chromium, report, tmp_path) == {"images": page.count("<img "), "broken": []}


def test_the_generator_can_be_grown_in_the_demo_folder_and_is_then_cached(tmp_path, capsys):
    cfg = DemoConfig(counts={"train": 32, "val": 0, "test": 0}, size=8,
                     train_gan={"scale_images": 16, "fade_images": 8, "batch_size": 8, "latent_dim": 16,
                                "snapshot_images": 0, "log_images": 16, "device": "cpu"})
    demo = Demo(cfg, tmp_path)
    demo.data()
    grown = demo.gan()
    assert grown["grown"] and load_generator(grown["generator"]).resolution == 8
    assert Path(grown["generator"]).parent == tmp_path / "gan"
    again = Demo(cfg, tmp_path)
    again.data()
    assert again.gan() == grown and str(again.generator) == grown["generator"]
    assert capsys.readouterr().out.count("(cached)") == 2


def test_a_missing_generator_is_a_one_line_error_with_exit_code_2(tmp_path):
    (tmp_path / "mine.yaml").write_text(f"generator: {tmp_path / 'nope.pt'}\ncounts: {{train: 4, val: 0, test: 0}}\n")
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "run"), "--config", str(tmp_path / "mine.yaml")])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: ") and "nope.pt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
