"""Classifier checkpoints: safetensors + JSON round trip, and clear errors for the wrong files."""
from __future__ import annotations

import json

import pytest
import torch

from patchscope.common.errors import InputError
from patchscope.forensics.checkpoint import load_classifier, load_resume_state, save_classifier, save_resume_state
from patchscope.forensics.models import build_model


def test_round_trip_gives_identical_logits_and_metadata(tmp_path):
    model = build_model("resnet18_layer1", seed=3).to(memory_format=torch.channels_last)
    model.train()(torch.randn(4, 3, 40, 40))  # move the BN running statistics away from their init
    save_classifier(tmp_path / "best", model, {"epoch": 5})
    loaded, meta = load_classifier(tmp_path)
    assert meta["model"] == "resnet18_layer1" and meta["epoch"] == 5
    for (key, original), restored in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(original, restored), key
    x = torch.randn(2, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    loaded = loaded.to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_missing_checkpoint_names_what_was_expected(tmp_path):
    with pytest.raises(InputError, match="best.safetensors"):
        load_classifier(tmp_path)


def test_foreign_json_is_refused(tmp_path):
    save_classifier(tmp_path / "best", build_model("xception_block1"), {})
    (tmp_path / "best.json").write_text(json.dumps({"kind": "something-else"}))
    with pytest.raises(InputError, match="not a patchscope classifier"):
        load_classifier(tmp_path)


def test_corrupt_weights_are_named(tmp_path):
    save_classifier(tmp_path / "best", build_model("xception_block1"), {})
    (tmp_path / "best.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(InputError, match="best.safetensors: unreadable"):
        load_classifier(tmp_path)


def test_weights_of_another_model_are_refused(tmp_path):
    save_classifier(tmp_path / "best", build_model("xception_block1"), {})
    meta = json.loads((tmp_path / "best.json").read_text())
    (tmp_path / "best.json").write_text(json.dumps({**meta, "model": "xception_block2"}))
    with pytest.raises(InputError, match="do not fit xception_block2"):
        load_classifier(tmp_path)


def test_resume_state_round_trips_and_refuses_code(tmp_path):
    state = {"optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []},
             "state": {"epoch": 2, "best_acc": 0.5}}
    save_resume_state(tmp_path / "resume.pt", state)
    assert load_resume_state(tmp_path / "resume.pt")["state"]["epoch"] == 2

    class Evil:
        def __reduce__(self):
            return (exec, ("open('%s', 'w').write('ran')" % (tmp_path / "marker"),))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="unreadable resume state"):
        load_resume_state(tmp_path / "evil.pt")
    assert not (tmp_path / "marker").exists()
