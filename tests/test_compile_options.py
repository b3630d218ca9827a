"""`--compile` of eval, exaggerate, finetune and sample, without compiling for real (tests/test_compile_runs.py
does that, slowly): the option reaches each command's settings (flag and YAML key); with a stand-in compiler the
compiled path is what runs, while the saved networks, their key names and the results stay those of an uncompiled
run; without a compiler every command runs uncompiled after one warning per network; a run that would mix compiled
and uncompiled results is refused where the command refuses other arithmetic (precision)."""
from __future__ import annotations

import collections
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from patchscope.analysis.finetune_study import FinetuneConfig, run_finetune
from patchscope.analysis.shift_grid import ExaggerateConfig, run_exaggerate
from patchscope.attacks.perceptual import load_lpips
from patchscope.attacks.shift import ShiftExaggeration, load_shift
from patchscope.cli import main
from patchscope.common import compiled
from patchscope.common.compiled import CompiledOrEager
from patchscope.common.errors import DatasetError, InputError
from patchscope.forensics.checkpoint import save_classifier
from patchscope.forensics.evaluate import EvalConfig, evaluate
from patchscope.forensics.models import build_model
from patchscope.generators.glow.model import Glow, GlowConfig, GlowGenerator
from patchscope.generators.io.safe_pickle import load_torch
from patchscope.generators.pgan.zoo import save_pgan_zoo
from patchscope.generators.sampling import SampleConfig, sample_dataset
from patchscope.generators.stylegan2.model import StyleGAN2Config, StyleGAN2Generator
from tests.attacks.test_finetune import detector
from tests.tiny_models import RESOLUTION, tiny_pgan

NO_COMPILER = "--compile: no C++ compiler (g++, c++, clang++) on PATH, so {} runs uncompiled"


# ----------------------------------------------------------------------------- shared set-up

@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A tiny PGAN with its discriminator, a brightness detector saved as a 16 px classifier run, 16 real crops,
    and a random xception_block1 run trained (its metadata says) at 32 px for eval."""
    from patchscope.forensics.builtin_images import builtin_photos, random_crops

    root = tmp_path_factory.mktemp("compile")
    (root / "real").mkdir()
    for i, crop in enumerate(random_crops(builtin_photos(), 16, RESOLUTION, seed=0)):
        Image.fromarray(crop).save(root / "real" / f"{i:03d}.png")
    generator, discriminator = tiny_pgan()
    save_pgan_zoo(generator, root / "pgan.pt", discriminator=discriminator)
    save_classifier(root / "classifier" / "best", detector(), {"config": {"load_size": RESOLUTION,
                                                                          "crop_size": RESOLUTION}})
    save_classifier(root / "scorer" / "best", build_model("xception_block1", seed=0),
                    {"config": {"load_size": 32, "crop_size": 32}})
    return {"generator": root / "pgan.pt", "classifier": root / "classifier", "real": root / "real",
            "scorer": root / "scorer"}


def eval_config(sources: dict[str, Path], dataset: Path, out: Path, **changes) -> EvalConfig:
    # 48 + 48 test images in batches of 32: every batch has one shape, so a compiled classifier compiles once
    return EvalConfig(**{"run": str(sources["scorer"]), "tests": [f"b={dataset / 'real'},{dataset / 'fake'}"],
                         "out": str(out), "batch_size": 32, "device": "cpu", "precision": "fp32", **changes})


def exaggerate_config(sources: dict[str, Path], out: Path, **changes) -> ExaggerateConfig:
    return ExaggerateConfig(**{"generator": str(sources["generator"]), "classifier": str(sources["classifier"]),
                               "out": str(out), "steps": 3, "batch_size": 4, "lr": 0.05, "eval_n": 4,
                               "eval_batch_size": 4, "ks": [-1.0, 0.0, 1.0], "grid_rows": 0, "lpips_random": True,
                               "device": "cpu", "precision": "fp32", **changes})


def finetune_config(sources: dict[str, Path], out: Path, **changes) -> FinetuneConfig:
    return FinetuneConfig(**{"generator": str(sources["generator"]), "classifier": str(sources["classifier"]),
                             "real": str(sources["real"]), "out": str(out), "steps": 2, "batch_size": 4,
                             "classifier_weight": 10.0, "ema_beta": 0.5, "checkpoint_every": 2, "log_every": 0,
                             "compare_n": 4, "grid_rows": 0, "lpips_random": True, "device": "cpu",
                             "precision": "fp32", **changes})


def sample_config(sources: dict[str, Path], out: Path, **changes) -> SampleConfig:
    return SampleConfig(**{"generator": str(sources["generator"]), "out": str(out), "counts": {"train": 4},
                           "chunk": 2, "batch_size": 2, "device": "cpu", **changes})


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def generator_states(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    checkpoint = load_torch(path)
    return {name: checkpoint[name] for name in ("netG", "netD", "avgG")}


@pytest.fixture
def calls(monkeypatch) -> collections.Counter:
    """Calls through every `CompiledOrEager`, by what it compiles, with the wrappers in `calls.wrappers`: proof
    that a command ran its networks through what `maybe_compile` returned, not merely accepted the option."""
    counter: collections.Counter = collections.Counter()
    counter.wrappers = []
    forward = CompiledOrEager.forward

    def counted(self, *args, **kwargs):
        counter[self._what] += 1
        if self not in counter.wrappers:
            counter.wrappers.append(self)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CompiledOrEager, "forward", counted)
    return counter


def stand_in_compile(module: torch.nn.Module, **options):
    return lambda *args, **kwargs: module(*args, **kwargs)


@pytest.fixture
def stand_in_compiler(monkeypatch) -> None:
    """torch.compile replaced by a compiler whose 'compiled' module is a plain call of the module: every command
    takes its compiled path (CompiledOrEager.compiled is True), with the uncompiled arithmetic, in no time."""
    monkeypatch.setattr(compiled.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(compiled.torch, "compile", stand_in_compile)


@pytest.fixture
def no_compiler(monkeypatch) -> None:
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)


def compile_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "patchscope.compile"]


# ----------------------------------------------------------------------------- (a) the option reaches the settings

def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("command, args", [
    ("eval", ["RUN", "--test", "a=r,f", "--out", "OUT"]),
    ("exaggerate", ["--out", "OUT"]),
    ("finetune", ["--out", "OUT"]),
])
def test_the_flag_and_the_yaml_key_set_compile_and_the_flag_wins(command, args, tmp_path):
    config = tmp_path / "c.yaml"
    args = [str(tmp_path / a) if a in ("RUN", "OUT") else a for a in args]

    def dry(*extra: str, yaml_text: str | None = None) -> dict:
        if yaml_text is not None:
            config.write_text(yaml_text)
        result = run(command, *args, *(["--config", str(config)] if yaml_text is not None else []), *extra,
                     "--dry-run")
        assert result.exit_code == 0, result.output
        return yaml.safe_load(result.stdout)

    assert dry()["compile"] is False
    assert dry("--compile")["compile"] is True
    assert dry(yaml_text=f"{command}:\n  compile: true\n")["compile"] is True
    assert dry("--no-compile", yaml_text=f"{command}:\n  compile: true\n")["compile"] is False
    config.write_text(f"{command}:\n  compile: maybe\n")
    result = run(command, *args, "--config", str(config), "--dry-run")
    assert result.exit_code == 2 and "setting compile='maybe'" in result.stderr


def test_sample_takes_compile_as_a_flag(tmp_path):
    for flags, expected in (([], False), (["--compile"], True), (["--no-compile"], False)):
        result = run("sample", "gen.pt", "--out", str(tmp_path / "o"), "--train", "2", *flags, "--dry-run")
        assert result.exit_code == 0, result.output
        assert yaml.safe_load(result.stdout)["compile"] is expected
    with pytest.raises(InputError, match="setting compile="):
        SampleConfig(out="o", compile="yes")


# ----------------------------------------------------------------------------- eval

def test_eval_scores_through_the_compiled_classifier_and_records_the_setting(sources, builtin_dataset, tmp_path,
                                                                             stand_in_compiler, calls):
    eager = evaluate(eval_config(sources, builtin_dataset, tmp_path / "eager"))
    assert not calls  # uncompiled: no wrapper in the way
    summary = evaluate(eval_config(sources, builtin_dataset, tmp_path / "compiled", compile=True))
    assert calls == {"the classifier": 3} and all(w.compiled for w in calls.wrappers)
    assert summary["results"] == eager["results"]
    assert yaml.safe_load((tmp_path / "compiled" / "config.yaml").read_text())["compile"] is True


def test_eval_without_a_compiler_runs_uncompiled_after_one_warning(sources, builtin_dataset, tmp_path, no_compiler,
                                                                   caplog, calls):
    with caplog.at_level(logging.WARNING):
        summary = evaluate(eval_config(sources, builtin_dataset, tmp_path / "c", compile=True))
    assert compile_warnings(caplog) == [NO_COMPILER.format("the classifier")]
    assert not calls
    assert summary["results"] == evaluate(eval_config(sources, builtin_dataset, tmp_path / "e"))["results"]


# ----------------------------------------------------------------------------- exaggerate

def test_exaggerate_runs_classifier_generator_and_lpips_compiled_and_refuses_a_changed_compile_on_resume(
        sources, tmp_path, stand_in_compiler, calls):
    eager = run_exaggerate(exaggerate_config(sources, tmp_path / "eager"))
    assert not calls
    out = tmp_path / "compiled"
    summary = run_exaggerate(exaggerate_config(sources, out, compile=True))
    assert set(calls) == {"the classifier", "the generator", "LPIPS"} and all(w.compiled for w in calls.wrappers)
    assert summary["rows"] == eager["rows"]
    shift, meta = load_shift(out)
    assert torch.equal(shift, load_shift(tmp_path / "eager")[0])
    assert meta["compile"] is True and load_shift(tmp_path / "eager")[1]["compile"] is False
    # compile changes the float rounding of the fit, like precision: a resume keeps it
    with pytest.raises(InputError, match="cannot resume with different compile"):
        run_exaggerate(exaggerate_config(sources, out), resume=True)
    assert run_exaggerate(exaggerate_config(sources, out, compile=True, ks=[2.0]), resume=True)["fitted"] is False


def test_a_shift_fitted_before_compile_was_recorded_resumes_uncompiled(sources, tmp_path):
    out = tmp_path / "old"
    run_exaggerate(exaggerate_config(sources, out))
    meta_file = out / "shift.json"
    meta = json.loads(meta_file.read_text())
    del meta["compile"]  # as written before the setting existed
    meta_file.write_text(json.dumps(meta))
    assert run_exaggerate(exaggerate_config(sources, out, ks=[2.0]), resume=True)["fitted"] is False


def test_exaggerate_without_a_compiler_runs_uncompiled_after_one_warning_per_network(sources, tmp_path, no_compiler,
                                                                                    caplog, calls):
    with caplog.at_level(logging.WARNING):
        summary = run_exaggerate(exaggerate_config(sources, tmp_path / "c", compile=True))
    assert compile_warnings(caplog) == [NO_COMPILER.format(what) for what in ("the classifier", "the generator",
                                                                               "LPIPS")]
    assert not calls and load_shift(tmp_path / "c")[1]["compile"] is False
    assert summary["rows"] == run_exaggerate(exaggerate_config(sources, tmp_path / "e"))["rows"]



def _stylegan2():
    torch.manual_seed(0)
    return StyleGAN2Generator(StyleGAN2Config(size=16, style_dim=16, n_mlp=2, channels=(16, 16, 16)),
                              noise_mode="random").eval()


def _glow():
    torch.manual_seed(0)
    glow = Glow(GlowConfig(resolution=8, hidden_channels=8, steps=2, levels=2, permutation="reverse"))
    with torch.no_grad():
        for param in glow.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return GlowGenerator(glow).eval()


@pytest.mark.parametrize("build, space", [(_stylegan2, "w"), (_stylegan2, "z"), (_glow, "z")],
                         ids=["stylegan2_w", "stylegan2_z", "glow_z"])
def test_the_compiled_renderer_gets_what_the_generator_gets(build, space, stand_in_compiler, calls):
    """A style generator renders through its compiled synthesis (mapping uncompiled), Glow through its compiled
    forward with its split-level noise: the shift's fit and sweep are the uncompiled ones."""
    generator, lpips = build(), load_lpips("alex", allow_random=True)
    runs = []
    for compile in (False, True):
        attack = ShiftExaggeration(generator, detector(), lpips, space=space, precision="fp32", compile=compile)
        result = attack.fit(steps=2, batch=2, lr=0.05, progress=False)
        runs.append((result.shift, attack.sweep(result.shift, ks=(0, 1), n=2, seed=5).p_fake))
    assert calls["the generator"] > 0 and set(calls) == {"the classifier", "the generator", "LPIPS"}
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# ----------------------------------------------------------------------------- finetune

def test_finetune_steps_through_the_compiled_networks_and_saves_the_networks_themselves(sources, tmp_path,
                                                                                      stand_in_compiler, calls):
    eager, out = tmp_path / "eager", tmp_path / "compiled"
    run_finetune(finetune_config(sources, eager))
    assert not calls
    summary = run_finetune(finetune_config(sources, out, compile=True))
    assert set(calls) == {"the classifier", "the generator"} and all(w.compiled for w in calls.wrappers)
    # the generator's forward of every D and G step (2 steps, n_critic 1), the classifier in the G steps and in
    # the final comparison: the discriminator is never a CompiledOrEager
    assert calls["the generator"] == 4
    # what is saved is the networks, not their wrappers: the same keys ("module." nowhere), the same weights
    states, reference = generator_states(out / "generator.pt"), generator_states(eager / "generator.pt")
    for name in reference:
        assert list(states[name]) == list(reference[name]), name
        assert all(torch.equal(states[name][k], reference[name][k]) for k in reference[name]), name
    resume, reference_resume = load_torch(out / "resume.pt"), load_torch(eager / "resume.pt")
    for part in ("generator", "average", "discriminator"):
        assert list(resume[part]) == list(reference_resume[part]), part
    assert not any("module." in key for part in ("generator", "average") for key in resume[part])
    assert resume["settings"]["compile"] is True and reference_resume["settings"]["compile"] is False
    assert summary["rows"] == run_finetune(finetune_config(sources, tmp_path / "again"))["rows"]
    with pytest.raises(InputError, match="cannot resume with different compile"):
        run_finetune(finetune_config(sources, out, steps=3), resume=True)


def test_finetune_without_a_compiler_runs_uncompiled_after_one_warning_per_network(sources, tmp_path, no_compiler,
                                                                                  caplog, calls):
    with caplog.at_level(logging.WARNING):
        run_finetune(finetune_config(sources, tmp_path / "c", compile=True))
    assert compile_warnings(caplog) == [NO_COMPILER.format(what) for what in ("the generator", "the classifier")]
    assert not calls
    run_finetune(finetune_config(sources, tmp_path / "e"))
    states, reference = generator_states(tmp_path / "c" / "generator.pt"), generator_states(tmp_path / "e" /
                                                                                             "generator.pt")
    for name in reference:
        assert all(torch.equal(states[name][k], reference[name][k]) for k in reference[name]), name


# ----------------------------------------------------------------------------- sample

def test_sample_renders_through_the_compiled_generator_and_records_it_in_the_manifest(sources, tmp_path,
                                                                                      stand_in_compiler, calls):
    sample_dataset(sample_config(sources, tmp_path / "eager"), progress=False)
    assert not calls
    out = tmp_path / "compiled"
    sample_dataset(sample_config(sources, out, compile=True), progress=False)
    assert calls == {"the generator": 3}  # the probe chunk that settles it, then the two chunks of 2 images
    assert pngs(out) == pngs(tmp_path / "eager")
    assert json.loads((out / "manifest.json").read_text())["compile"] is True
    assert json.loads((tmp_path / "eager" / "manifest.json").read_text())["compile"] is False


def test_sample_refuses_to_add_uncompiled_images_to_compiled_ones_and_the_reverse(sources, tmp_path,
                                                                                  stand_in_compiler):
    compiled_out, eager_out = tmp_path / "compiled", tmp_path / "eager"
    sample_dataset(sample_config(sources, compiled_out, compile=True), progress=False)
    sample_dataset(sample_config(sources, eager_out), progress=False)
    before = pngs(compiled_out)
    result = run("sample", str(sources["generator"]), "--out", str(compiled_out), "--train", "6", "--chunk", "2",
                 "--device", "cpu")
    assert result.exit_code == 2
    assert result.stderr == (f"error: {compiled_out}: its images were rendered compiled (torch.compile) and this run "
                             f"would render them uncompiled, which rounds differently; sample with --compile where "
                             f"the compiler runs or use a new --out folder\n")
    assert pngs(compiled_out) == before
    with pytest.raises(DatasetError, match="rendered uncompiled and this run would render them compiled"):
        sample_dataset(sample_config(sources, eager_out, counts={"train": 6}, compile=True), progress=False)
    # the same setting adds to it
    sample_dataset(sample_config(sources, compiled_out, counts={"train": 6}, compile=True), progress=False)
    assert len(pngs(compiled_out)) == 6


def test_a_compiled_folder_is_refused_where_the_compiler_cannot_run_and_old_manifests_count_as_uncompiled(
        sources, tmp_path, monkeypatch, caplog):
    out = tmp_path / "set"
    with monkeypatch.context() as patched:
        patched.setattr(compiled.shutil, "which", lambda name: "/usr/bin/" + name)
        patched.setattr(compiled.torch, "compile", stand_in_compile)
        sample_dataset(sample_config(sources, out, compile=True), progress=False)
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with caplog.at_level(logging.WARNING), pytest.raises(DatasetError, match="would render them uncompiled"):
        sample_dataset(sample_config(sources, out, counts={"train": 6}, compile=True), progress=False)
    assert compile_warnings(caplog) == [NO_COMPILER.format("the generator")]
    # a manifest written before `compile` was recorded: its images are uncompiled ones
    old = tmp_path / "old"
    sample_dataset(sample_config(sources, old), progress=False)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["compile"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    sample_dataset(sample_config(sources, old, counts={"train": 6}), progress=False)
    assert len(pngs(old)) == 6


def test_sample_without_a_compiler_renders_uncompiled_after_one_warning(sources, tmp_path, no_compiler, caplog):
    with caplog.at_level(logging.WARNING):
        sample_dataset(sample_config(sources, tmp_path / "c", compile=True), progress=False)
    assert compile_warnings(caplog) == [NO_COMPILER.format("the generator")]
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["compile"] is False
    sample_dataset(sample_config(sources, tmp_path / "e"), progress=False)
    assert pngs(tmp_path / "c") == pngs(tmp_path / "e")
