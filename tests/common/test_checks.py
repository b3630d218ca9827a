"""Settings are checked once, where each config dataclass is built: one line naming the field."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import pytest

from patchscope.analysis.demo import DemoConfig
from patchscope.analysis.finetune_study import FinetuneConfig
from patchscope.analysis.patches import PatchesConfig
from patchscope.analysis.residual import RetrainStudyConfig
from patchscope.analysis.shift_grid import ExaggerateConfig
from patchscope.attacks.finetune import FinetuneSettings
from patchscope.attacks.invert import InvertConfig
from patchscope.attacks.retrain import RetrainConfig
from patchscope.common import config as configs
from patchscope.common.checks import (check_bool, check_choice, check_counts, check_float, check_int, check_mapping,
                                      check_numbers, check_text, require)
from patchscope.common.errors import InputError
from patchscope.forensics.evaluate import EvalConfig
from patchscope.forensics.train import TrainConfig
from patchscope.generators.sampling import SampleConfig
from patchscope.generators.training.trainer import GANTrainConfig

CONFIGS = [TrainConfig, EvalConfig, SampleConfig, GANTrainConfig, RetrainConfig, FinetuneSettings, ExaggerateConfig, FinetuneConfig, RetrainStudyConfig, InvertConfig,
           PatchesConfig, DemoConfig]


@dataclass
class Example:
    n: int = 2
    rate: float = 0.5
    mode: str = "a"
    flag: bool = True
    name: str | None = None
    counts: dict = field(default_factory=lambda: {"train": 2})
    ks: list = field(default_factory=lambda: [1.0])


@pytest.mark.parametrize("check, value, message", [
    (lambda c: check_int(c, "n", 1), 0, "setting n=0: expected an integer >= 1"),
    (lambda c: check_int(c, "n", 1), True, "setting n=True: expected an integer >= 1"),
    (lambda c: check_int(c, "n", 1), 1.0, "setting n=1.0: expected an integer >= 1"),
    (lambda c: check_int(c, "n", 0, 4), 5, "setting n=5: expected an integer >= 0 and <= 4"),
    (lambda c: check_int(c, "n", 2, even=True), 3, "setting n=3: expected an even integer >= 2"),
    (lambda c: check_int(c, "n", 1, optional=True), "2", "setting n='2': expected an integer >= 1 or null"),
    (lambda c: check_float(c, "rate", 0, low_open=True), 0, "setting rate=0: expected a finite number > 0"),
    (lambda c: check_float(c, "rate", 0, 1, high_open=True), 1, "setting rate=1: expected a finite number >= 0 and < 1"),
    (lambda c: check_float(c, "rate", 0), float("inf"), "setting rate=inf: expected a finite number >= 0"),
    (lambda c: check_float(c, "rate", 0), "0.1", "setting rate='0.1': expected a finite number >= 0"),
    (lambda c: check_choice(c, "mode", ("a", "b")), "c", "setting mode='c': expected one of a, b"),
    (lambda c: check_bool(c, "flag"), 1, "setting flag=1: expected true or false"),
    (lambda c: check_text(c, "name", optional=True), 3, "setting name=3: expected a string or null"),
    (lambda c: check_counts(c, "counts"), {"train": -1}, "expected a mapping of split names to image counts >= 0"),
    (lambda c: check_numbers(c, "ks"), [], "setting ks=[]: expected a non-empty list of finite numbers"),
    (lambda c: check_mapping(c, "counts"), [1], "setting counts=[1]: expected a mapping of settings"),
])
def test_each_check_refuses_in_one_line_naming_field_value_and_range(check, value, message) -> None:
    check(Example())  # the defaults pass
    name = re.search(r"setting (\w+)=|expected", message)
    bad = Example()
    target = name.group(1) if name and name.group(1) else "counts"
    setattr(bad, target, value)
    with pytest.raises(InputError) as caught:
        check(bad)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_optional_fields_accept_null_and_require_names_the_flag() -> None:
    example = Example(n=None, rate=None, mode=None, flag=None)
    check_int(example, "n", 1, optional=True)
    check_float(example, "rate", 0, optional=True)
    check_choice(example, "mode", ("a",), optional=True)
    check_bool(example, "flag", optional=True)
    with pytest.raises(InputError, match="^no --real-images given$"):
        require(dataclasses.replace(example, name=""), "name", "--real-images")
    with pytest.raises(InputError, match="^no --name given$"):
        require(Example(name=""), "name")


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda cls: cls.__name__)
def test_defaults_are_valid_and_every_field_refuses_a_value_of_the_wrong_kind(cls) -> None:
    """Any field given a value no setting takes (a list of strings) is refused, naming that field,
    whether the config is built directly or from YAML layers."""
    cls()
    for f in dataclasses.fields(cls):
        with pytest.raises(InputError, match=rf"setting {f.name}=\['x'\]: expected"):
            cls(**{f.name: ["x"]})
        with pytest.raises(InputError, match=rf"setting {f.name}=\['x'\]: expected"):
            configs.resolve(cls, {f.name.replace("_", "-"): ["x"]})


@pytest.mark.parametrize("cls, changes, message", [
    (TrainConfig, {"batch_size": 3}, "batch_size=3: expected an even integer >= 2"),
    (GANTrainConfig, {"resolution": 48}, "resolution=48"),
    (ExaggerateConfig, {"ks": []}, "ks=[]: expected a non-empty list"),
    (ExaggerateConfig, {"lam": -0.1}, "lam=-0.1: expected a finite number >= 0"),
    (FinetuneConfig, {"n_critic": 0}, "n_critic=0: expected an integer >= 1"),
    (RetrainStudyConfig, {"counts": {"train": "many"}}, "counts={'train': 'many'}"),
    (InvertConfig, {"space": "w++"}, "space='w++': expected one of auto, z, w, w+"),
    (PatchesConfig, {"which": "first"}, "which='first': expected one of best, last"),
    (DemoConfig, {"precision": "fp16"}, "precision='fp16': expected one of auto, fp32, bf16"),
    (FinetuneSettings, {"betas": (0.0, 1.0)}, "betas=(0.0, 1.0): expected two numbers >= 0 and < 1"),
    (FinetuneSettings, {"ema_beta": 1}, "ema_beta=1: expected a finite number >= 0 and < 1"),
    (RetrainConfig, {"train": ["max_epochs"]}, "train=['max_epochs']: expected a mapping of settings"),
])
def test_ranges_are_refused_where_the_config_is_built(cls, changes, message) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        cls(**changes)
