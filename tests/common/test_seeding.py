"""Seeded initialisation: the same weights for a seed, and the caller's streams (CPU and the lazily seeded CUDA
ones) as they were."""
from __future__ import annotations

import torch

from patchscope.common.seeding import cpu_seeded
from patchscope.forensics.models import build_model


def test_a_seeded_build_repeats_its_weights_and_leaves_the_cpu_stream_where_it_was():
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    a = build_model("xception_block1", seed=7)
    assert torch.equal(torch.rand(5), expected)  # the caller's next draws are unchanged
    b = build_model("xception_block1", seed=7)
    c = build_model("xception_block1", seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


def test_cpu_seeded_never_reseeds_the_cuda_generators(monkeypatch):
    """torch.manual_seed queues a CUDA reseed even before CUDA starts (the same seed on every DDP rank);
    cpu_seeded must not call it, nor torch.cuda.manual_seed_all."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    with cpu_seeded(5):
        first = torch.rand(3)
    with cpu_seeded(5):
        assert torch.equal(torch.rand(3), first)
    build_model("resnet18_layer1", seed=3)
    assert calls == []
