"""Minibatch stddev at batch 8, with groups of clearly unequal spread, against each public implementation.

With batches of more than one group, *which* samples form a group changes every critic score:
pytorch_GAN_zoo groups contiguous blocks (0-3, 4-7), the TF and StyleGAN2 codes group strided
samples (0, 2, 4, 6 and 1, 3, 5, 7 at batch 8). Per-sample scales rise from 0.3 to 3, so the
two groupings give very different channels and scores.

References (tests/data/minibatch_stddev/, made as its README says):
- pytorch_GAN_zoo, rosinality stylegan2-pytorch, NVlabs stylegan2-ada-pytorch: outputs of the
  public code itself, run on CPU with the shared fixtures' weights.
- TF PGAN (`D_paper`) and StyleGAN v1 (`D_basic`): TensorFlow 1.x cannot be installed here, so
  nothing was run; the reference is the numpy transcription of the TF layer below.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from patchscope.common.errors import CheckpointError
from patchscope.generators import load_generator
from patchscope.generators.io.safe_pickle import PickledRecord, load_pickle
from patchscope.generators.pgan.tf import tf_minibatch_stddev
import patchscope.generators.pgan.tf as pgan_tf
from patchscope.generators.pgan.zoo import zoo_minibatch_stddev
import patchscope.generators.stylegan.discriminator as sg1_discriminator
from patchscope.generators.stylegan.ops import minibatch_stddev as sg1_minibatch_stddev
from patchscope.generators.stylegan.tf import load_stylegan_tf_file
from patchscope.generators.stylegan2.layers import minibatch_stddev as sg2_minibatch_stddev
from patchscope.generators.stylegan2.nvlabs import load_nvlabs_discriminator

DATA = Path(__file__).resolve().parents[1] / "data" / "minibatch_stddev"
FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "generators"
ATOL = 1e-4
ROUNDOFF = 2e-5  # the same network at batch 4 and 8: different summation order
SCALES = np.array([0.3, 0.45, 0.6, 0.8, 1.2, 1.8, 2.4, 3.0])

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"generator fixtures not found at {FIXTURES}")


def features(seed: int, channels: int, n: int = 8, hw: int = 4) -> np.ndarray:
    """The README's inputs: N(0, 1) from numpy's legacy RandomState(seed), sample i scaled by SCALES[i]."""
    x = np.random.RandomState(seed).randn(n, channels, hw, hw) * SCALES[:n, None, None, None]
    return x.astype(np.float32)


def reference(name: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"{name}.npz", allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def appended(out: torch.Tensor, channels: int) -> np.ndarray:
    return out[:, channels:].detach().numpy()


def assert_close(actual: torch.Tensor | np.ndarray, expected: np.ndarray, atol: float = ATOL) -> None:
    actual = torch.as_tensor(np.asarray(actual.detach() if isinstance(actual, torch.Tensor) else actual))
    torch.testing.assert_close(actual, torch.from_numpy(np.asarray(expected)), rtol=0, atol=atol)


# ---- numpy transcriptions of the TF layers (no TensorFlow run is possible here) ------------

def tf_pgan_stddev(x: np.ndarray, group_size: int = 4) -> np.ndarray:
    """tkarras/progressive_growing_of_gans @ 2504c3f, networks.py:127-139 `minibatch_stddev_layer`."""
    group_size = min(group_size, x.shape[0])                 # :129 tf.minimum(group_size, tf.shape(x)[0])
    s = x.shape
    y = x.reshape(group_size, -1, s[1], s[2], s[3])          # :131 [GMCHW] (row-major, like tf.reshape)
    y = y.astype(np.float64)                                 # :132 (float64: a sharper reference)
    y = y - y.mean(axis=0, keepdims=True)                    # :133
    y = np.square(y).mean(axis=0)                            # :134 biased variance
    y = np.sqrt(y + 1e-8)                                    # :135
    y = y.mean(axis=(1, 2, 3), keepdims=True)                # :136 [M111]
    y = np.tile(y, [group_size, 1, s[2], s[3]])              # :138 [N1HW]: sample i gets group i mod M
    return np.concatenate([x, y.astype(np.float32)], axis=1)  # :139


def tf_stylegan_stddev(x: np.ndarray, group_size: int = 4, num_new_features: int = 1) -> np.ndarray:
    """NVlabs/stylegan @ 1e0d5c7, training/networks_stylegan.py:283-296 `minibatch_stddev_layer`."""
    group_size = min(group_size, x.shape[0])                 # :285
    s = x.shape
    y = x.reshape(group_size, -1, num_new_features, s[1] // num_new_features, s[2], s[3])  # :287 [GMncHW]
    y = y.astype(np.float64)                                 # :288
    y = y - y.mean(axis=0, keepdims=True)                    # :289
    y = np.square(y).mean(axis=0)                            # :290
    y = np.sqrt(y + 1e-8)                                    # :291
    y = y.mean(axis=(2, 3, 4), keepdims=True)                # :292 [Mn111]
    y = y.mean(axis=2)                                       # :293 [Mn11]
    y = np.tile(y, [group_size, 1, s[2], s[3]])              # :295 [NnHW]
    return np.concatenate([x, y.astype(np.float32)], axis=1)  # :296


# ---- the stored references are what they claim to be ----------------------------------------

@pytest.mark.parametrize("name", ["pgan_zoo", "sg2_rosinality", "sg2ada"])
def test_stored_references_were_made_from_the_readme_inputs(name: str) -> None:
    ref = reference(name)
    images = features(1, 3, hw=32)
    np.testing.assert_array_equal(ref["x"], features(0, 6))
    np.testing.assert_array_equal(ref["images_first"], images.reshape(-1)[:8])
    assert ref["images_sum"] == pytest.approx(images.astype(np.float64).sum(), rel=1e-12)
    assert len(str(ref["commit"])) == 40


def test_inputs_separate_contiguous_from_strided_groups() -> None:
    """The test data could not pass a wrong grouping: the two groupings differ by far more than ATOL."""
    x = torch.from_numpy(features(0, 6))
    contiguous = x.reshape(2, 4, -1).std(dim=1).mean(dim=1)
    strided = x.reshape(4, 2, -1).std(dim=0).mean(dim=1)
    assert (contiguous[:, None] - strided[None, :]).abs().min() > 0.2


# ---- pytorch_GAN_zoo: contiguous groups, unbiased variance -------------------------------

@pytest.mark.parametrize("n", [8, 6, 2, 1])
def test_zoo_stddev_matches_pytorch_gan_zoo(n: int) -> None:
    ref = reference("pgan_zoo")
    x = torch.from_numpy(ref["x"][:n])
    out = zoo_minibatch_stddev(x)
    torch.testing.assert_close(out[:, :6], x, rtol=0, atol=0)
    assert_close(appended(out, 6), ref[f"stddev_n{n}"])


@needs_fixtures
def test_zoo_discriminator_matches_pytorch_gan_zoo_at_batch_8() -> None:
    ref = reference("pgan_zoo")
    discriminator = load_generator(FIXTURES / "pgan_zoo" / "pgan_zoo_tiny_s3.pt").discriminator
    images = torch.from_numpy(features(1, 3, hw=32))
    with torch.no_grad():
        scores = discriminator(images)
        assert_close(scores, ref["d_out_n8"])
        assert_close(discriminator(images[:4]), ref["d_out_n4"])
        # contiguous groups: the first four samples score as they would alone
        assert_close(scores[:4], discriminator(images[:4]).numpy(), atol=ROUNDOFF)


def test_the_grown_pgan_critic_groups_like_the_zoo() -> None:
    """train-gan's critic (and so finetune's WGAN-GP on it) uses the same contiguous groups."""
    from patchscope.generators.training.growing import GrowingGAN

    critic = GrowingGAN([8, 8], latent_dim=8, seed=0).discriminator
    images = torch.from_numpy(features(1, 3, hw=4))
    with torch.no_grad():
        scores = critic(images)
        for first in (0, 4):
            assert_close(scores[first:first + 4], critic(images[first:first + 4]).numpy(), atol=ROUNDOFF)
        assert (scores[0::2] - critic(images[0::2])).abs().max() > 10 * ROUNDOFF


# ---- rosinality stylegan2-pytorch and NVlabs stylegan2-ada-pytorch: strided groups -------------

@pytest.mark.parametrize(("key", "n", "group", "feat"), [
    ("sg2_rosinality/stddev_n8_f1", 8, 4, 1), ("sg2_rosinality/stddev_n8_f2", 8, 4, 2),
    ("sg2_rosinality/stddev_n2_f1", 2, 4, 1), ("sg2ada/stddev_n8_f1", 8, 4, 1),
    ("sg2ada/stddev_n8_f2", 8, 4, 2), ("sg2ada/stddev_n8_gnone", 8, None, 1)])
def test_stylegan2_stddev_matches_the_public_code(key: str, n: int, group: int | None, feat: int) -> None:
    name, array = key.split("/")
    ref = reference(name)
    x = torch.from_numpy(ref["x"][:n])
    assert_close(appended(sg2_minibatch_stddev(x, group, feat), 6), ref[array])


@needs_fixtures
@pytest.mark.parametrize(("name", "checkpoint"), [("sg2_rosinality", "sg2_rosinality/sg2_rosinality_tiny32.pt"),
                                                  ("sg2ada", "sg2ada/sg2ada_tiny32_nosrc.pkl")])
def test_stylegan2_discriminators_match_the_public_code_at_batch_8(name: str, checkpoint: str) -> None:
    ref = reference(name)
    discriminator = load_generator(FIXTURES / checkpoint).discriminator
    images = torch.from_numpy(features(1, 3, hw=32))
    with torch.no_grad():
        scores = discriminator(images)
        assert_close(scores, ref["d_out_n8"])
        assert_close(discriminator(images[:4]), ref["d_out_n4"])
        # strided groups: samples 0, 2, 4, 6 score as they would alone
        assert_close(scores[0::2], discriminator(images[0::2]).numpy(), atol=ROUNDOFF)


def _nvlabs_snapshot_with_group(group: object) -> dict:
    snapshot = load_pickle(FIXTURES / "sg2ada" / "sg2ada_tiny32_nosrc.pkl")
    meta = snapshot["D"].args[0]
    kwargs = {**meta["state"]["_init_kwargs"], "epilogue_kwargs": {"mbstd_group_size": group}}
    record = snapshot["D"]
    return {**snapshot, "D": PickledRecord(record.module, record.name,
                                           ({**meta, "state": {**meta["state"], "_init_kwargs": kwargs}},))}


@needs_fixtures
def test_nvlabs_group_size_none_makes_the_whole_batch_one_group() -> None:
    discriminator = load_nvlabs_discriminator(_nvlabs_snapshot_with_group(None))
    assert discriminator.stddev_group is None
    images = torch.from_numpy(features(1, 3, hw=32))
    with torch.no_grad():
        whole = discriminator(images)
        discriminator.stddev_group = 8
        assert_close(whole, discriminator(images).numpy(), atol=0)


@needs_fixtures
@pytest.mark.parametrize("group", [0, -4, True, 2.5, "4", [4]])
def test_nvlabs_odd_group_sizes_are_refused_in_one_line(group: object) -> None:
    with pytest.raises(CheckpointError, match="mbstd_group_size") as caught:
        load_nvlabs_discriminator(_nvlabs_snapshot_with_group(group), source="crafted.pkl")
    assert "\n" not in str(caught.value) and "crafted.pkl" in str(caught.value)


# ---- TF PGAN and StyleGAN v1: strided groups, biased variance (numpy transcription) -----------

@pytest.mark.parametrize("n", [8, 4, 2])
def test_tf_pgan_stddev_matches_the_tf_layer(n: int) -> None:
    x = features(0, 6, n=n)
    assert_close(tf_minibatch_stddev(torch.from_numpy(x), 4), tf_pgan_stddev(x, 4))


@pytest.mark.parametrize(("n", "num_features"), [(8, 1), (8, 2), (8, 3), (2, 1)])
def test_stylegan_v1_stddev_matches_the_tf_layer(n: int, num_features: int) -> None:
    x = features(0, 6, n=n)
    out = sg1_minibatch_stddev(torch.from_numpy(x), 4, num_features)
    assert_close(out, tf_stylegan_stddev(x, 4, num_features))


@pytest.mark.parametrize("layer", [lambda x: tf_minibatch_stddev(x, 4), lambda x: sg1_minibatch_stddev(x, 4),
                                   lambda x: sg2_minibatch_stddev(x, 4)], ids=["tf_pgan", "stylegan", "stylegan2"])
def test_strided_layers_refuse_a_batch_the_group_does_not_divide(layer) -> None:
    # tf.reshape(x, [4, -1, ...]) fails on 6 samples too: a plain ValueError, not a reshape error
    with pytest.raises(ValueError, match="divisible by 4|multiple of the stddev group 4"):
        layer(torch.from_numpy(features(0, 6, n=6)))


def _transcribed(layer):
    return lambda x, *args: torch.from_numpy(layer(x.detach().numpy(), *args))


@needs_fixtures
@pytest.mark.parametrize("variant", ["nofused", "fused"])
def test_tf_pgan_discriminator_groups_as_tf_at_batch_8(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    discriminator = load_generator(FIXTURES / "pgan_tf" / f"pgan_tf_tiny32_{variant}_nosrc.pkl").discriminator
    images = torch.from_numpy(features(1, 3, hw=32))
    with torch.no_grad():
        scores = discriminator(images)
        # strided groups: samples 0, 2, 4, 6 score as they would alone (batch 4 is checked against TF)
        for first in range(2):
            assert_close(scores[first::2], discriminator(images[first::2]).numpy(), atol=ROUNDOFF)
        monkeypatch.setattr(pgan_tf, "tf_minibatch_stddev", _transcribed(tf_pgan_stddev))
        assert_close(scores, discriminator(images).numpy())


@needs_fixtures
@pytest.mark.parametrize("size", [32, 128])
def test_stylegan_v1_discriminator_groups_as_tf_at_batch_8(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    discriminator = load_stylegan_tf_file(FIXTURES / "sg1_tf" / f"sg1_tf_tiny{size}_nosrc.pkl").discriminator
    assert discriminator.cfg.mbstd_group_size == 4
    images = torch.from_numpy(features(1, 3, hw=size))
    with torch.no_grad():
        scores = discriminator(images)
        for first in range(2):
            assert_close(scores[first::2], discriminator(images[first::2]).numpy(), atol=ROUNDOFF)
        monkeypatch.setattr(sg1_discriminator, "minibatch_stddev", _transcribed(tf_stylegan_stddev))
        assert_close(scores, discriminator(images).numpy())
