"""Finetuning a generator against a frozen classifier (eq. 4) on tiny random GANs and a classifier that calls
bright images fake: it fools the classifier, keeps a real moving average, saves reloadable checkpoints in the
generator's own format, resumes exactly, and stops on divergence keeping the last good checkpoint."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchscope.attacks.finetune import FinetuneSettings, GeneratorFinetuner
from patchscope.attacks.finetune_eval import FINETUNED, ORIGINAL
from patchscope.attacks.gan_objectives import LogisticR1, WassersteinGP, objective_for
import patchscope.attacks.gan_objectives as gan_objectives
from patchscope.attacks.real_batches import RealImages
from patchscope.common.errors import InputError
from patchscope.forensics.builtin_images import builtin_photos, random_crops
from patchscope.generators import load_generator
from patchscope.generators.glow.model import Glow, GlowConfig, GlowGenerator
from patchscope.generators.io.safe_pickle import load_torch
from patchscope.generators.stylegan2.model import StyleGAN2Config, StyleGAN2Discriminator, StyleGAN2Generator
from tests.attacks.test_shift import brightness_classifier, tiny_pgan

RESOLUTION = 16
GENERATOR_FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "generators"
TF_PGAN = GENERATOR_FIXTURES / "pgan_tf" / "pgan_tf_tiny32_fused_nosrc.pkl"
TF_STYLEGAN = GENERATOR_FIXTURES / "sg1_tf" / "sg1_tf_tiny32_nosrc.pkl"
HELD_OUT = 123
# The detector: P(fake) = sigmoid(SLOPE · (brightness − THRESHOLD)) per patch. The tiny PGAN's samples
# average about −0.06 and the real crops about −0.2, so it calls most samples fake and many crops real.
SLOPE, THRESHOLD = 20.0, -0.12



def detector(slope: float = SLOPE):
    return brightness_classifier(slope=slope, offset=-slope * THRESHOLD)


def pgan_with_discriminator():
    generator, discriminator = tiny_pgan()
    generator.discriminator = discriminator
    return generator


@pytest.fixture(scope="module")
def reals() -> torch.Tensor:
    from patchscope.forensics.builtin_images import builtin_photos, random_crops

    crops = random_crops(builtin_photos(), 48, RESOLUTION, seed=0)
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def finetuner(reals, generator=None, classifier=None, objective=None, **settings) -> GeneratorFinetuner:
    settings = FinetuneSettings(**{"classifier_weight": 10.0, "ema_beta": 0.5, **settings})
    return GeneratorFinetuner(generator or pgan_with_discriminator(), classifier or detector(), reals, settings,
                              objective=objective)


def zoo_states(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    checkpoint = load_torch(path)
    return {name: checkpoint[name] for name in ("netG", "netD", "avgG")}


def assert_same_states(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].keys() == second[name].keys()
        for key in first[name]:
            assert torch.equal(first[name][key], second[name][key]), (name, key)


def images(generator, n: int = 4, seed: int = HELD_OUT) -> torch.Tensor:
    with torch.no_grad():
        return generator.eval()(generator.sample_latents(n, seed))


@pytest.fixture(scope="module")
def fooled(reals):
    """Six steps with the classifier's loss weighted 10, and the same six without it."""
    runs = {}
    for weight in (10.0, 0.0):
        attack = finetuner(reals, classifier_weight=weight)
        attack.run(6, batch=8, seed=0, progress=False)
        runs[weight] = attack.compare(32, HELD_OUT)
    return runs


def test_finetuning_lowers_the_frozen_classifiers_accuracy_on_fakes(fooled) -> None:
    original, finetuned = fooled[10.0].rows()
    assert original["generator"] == ORIGINAL and finetuned["generator"] == FINETUNED
    assert original["acc_fake"] >= 0.75, original  # the detector does catch the original generator
    assert finetuned["acc_fake"] <= original["acc_fake"] - 0.4, (original, finetuned)
    assert finetuned["p_fake"] < original["p_fake"] - 0.15
    assert finetuned["acc_real"] == original["acc_real"]  # the same reals, judged by the same frozen classifier


def test_the_classifier_term_is_what_fools_the_classifier_beyond_the_gan_loss(fooled) -> None:
    with_classifier, gan_only = fooled[10.0].rows()[1], fooled[0.0].rows()[1]
    assert with_classifier["p_fake"] < gan_only["p_fake"] - 0.05, (with_classifier, gan_only)


def test_with_zero_weight_the_classifier_is_outside_the_graph_and_does_not_steer(reals) -> None:
    weights, graphs = {}, {}
    for weight in (0.0, 1.0):
        for slope in (SLOPE, -SLOPE):  # a classifier and its opposite
            classifier = detector(slope)
            seen: list[bool] = []
            classifier.register_forward_hook(lambda module, args, output: seen.append(output.requires_grad))
            result = finetuner(reals, classifier=classifier, classifier_weight=weight).run(3, batch=8, progress=False)
            weights[weight, slope] = result.trained.state_dict()
            graphs[weight, slope] = seen
    for name, value in weights[0.0, SLOPE].items():
        assert torch.equal(value, weights[0.0, -SLOPE][name]), name
    assert any(not torch.equal(v, weights[1.0, -SLOPE][k]) for k, v in weights[1.0, SLOPE].items())
    assert graphs[0.0, SLOPE] == [False] * 3 and graphs[1.0, SLOPE] == [True] * 3


def test_the_classifier_stays_frozen(reals) -> None:
    classifier = detector()
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    finetuner(reals, classifier=classifier).run(2, batch=4, progress=False)
    assert all(torch.equal(before[k], v) for k, v in classifier.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in classifier.parameters())


def test_the_output_is_the_moving_average_of_the_trained_generator(reals) -> None:
    beta = 0.75
    original = pgan_with_discriminator()
    start = {k: v.clone() for k, v in original.state_dict().items() if not k.startswith("discriminator.")}
    attack = finetuner(reals, generator=original, ema_beta=beta)
    averages = [start]
    for steps in (1, 2):
        result = attack.run(steps, batch=4, progress=False)
        trained = result.trained.state_dict()
        average = result.generator.state_dict()
        for key, value in average.items():
            expected = averages[-1][key] * beta + trained[key] * (1 - beta)
            torch.testing.assert_close(value, expected, atol=1e-6, rtol=0)
        assert not torch.equal(average["formatLayer.module.weight"], trained["formatLayer.module.weight"])
        averages.append({k: v.clone() for k, v in average.items()})
    assert not torch.equal(averages[2]["formatLayer.module.weight"], start["formatLayer.module.weight"])
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in start.items())  # the original is untouched


def test_checkpoints_reload_as_the_average_with_generator_and_discriminator(reals, tmp_path: Path) -> None:
    result = finetuner(reals).run(4, batch=4, out=tmp_path, checkpoint_every=2, progress=False)
    assert result.checkpoint == tmp_path / "generator.pt" and result.steps == 4 and result.stopped is None
    reloaded = load_generator(result.checkpoint)
    assert reloaded.format == "pgan_zoo"
    assert torch.equal(images(reloaded), images(result.generator))
    assert torch.equal(images(load_generator(result.checkpoint, use_avg=False)), images(result.trained))
    for key, value in result.discriminator.state_dict().items():
        assert torch.equal(reloaded.discriminator.state_dict()[key], value), key
    resume = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert resume["step"] == 4 and {"optimizer_g", "optimizer_d", "settings"} <= set(resume)
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_after_interruption_gives_the_same_weights_and_log(reals, tmp_path: Path, monkeypatch) -> None:
    options = {"batch": 4, "seed": 3, "checkpoint_every": 2, "log_every": 2, "eval_n": 8, "progress": False}
    finetuner(reals).run(6, out=tmp_path / "straight", **options)

    calls = []
    original_loss = WassersteinGP.generator_loss

    def killed_at_step_five(self, scores):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original_loss(self, scores)

    with monkeypatch.context() as patch:
        patch.setattr(WassersteinGP, "generator_loss", killed_at_step_five)
        with pytest.raises(KeyboardInterrupt):
            finetuner(reals).run(6, out=tmp_path / "resumed", **options)
    assert torch.load(tmp_path / "resumed" / "resume.pt", weights_only=True)["step"] == 4
    result = finetuner(reals).run(6, out=tmp_path / "resumed", resume=True, **options)
    assert result.steps == 6
    assert_same_states(zoo_states(tmp_path / "resumed" / "generator.pt"),
                       zoo_states(tmp_path / "straight" / "generator.pt"))
    assert (tmp_path / "resumed" / "metrics.jsonl").read_text() == (tmp_path / "straight" / "metrics.jsonl").read_text()
    assert [record["step"] for record in result.history] == [0, 2, 4, 6]


def test_resume_with_other_training_settings_is_refused(reals, tmp_path: Path) -> None:
    finetuner(reals).run(2, batch=4, out=tmp_path, progress=False)
    with pytest.raises(InputError, match=r"resume\.pt: cannot resume with different batch, classifier_weight"):
        finetuner(reals, classifier_weight=1.0).run(4, batch=8, out=tmp_path, resume=True, progress=False)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(reals, tmp_path: Path, monkeypatch) -> None:
    reference = finetuner(reals).run(4, batch=4, out=tmp_path / "reference", checkpoint_every=2, progress=False)
    calls = []
    real_critic_loss = gan_objectives.critic_loss

    def nan_at_step_five(*args, **kwargs):
        loss = real_critic_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            loss.total = loss.total * float("nan")
        return loss

    monkeypatch.setattr(gan_objectives, "critic_loss", nan_at_step_five)
    result = finetuner(reals).run(8, batch=4, out=tmp_path / "nan", checkpoint_every=2, log_every=2, eval_n=4,
                                  progress=False)
    assert result.stopped == "loss_d = nan is not finite at step 5" and result.steps == 4
    assert_same_states(zoo_states(tmp_path / "nan" / "generator.pt"), zoo_states(reference.checkpoint))
    assert torch.equal(images(result.generator), images(load_generator(reference.checkpoint)))
    assert result.history[-1] == {"step": 5, "stopped": result.stopped, "restored_step": 4}
    assert torch.load(tmp_path / "nan" / "resume.pt", weights_only=True)["step"] == 4


def test_a_loss_above_the_bound_stops_before_the_first_checkpoint_with_the_original(reals) -> None:
    original = pgan_with_discriminator()
    result = finetuner(reals, generator=original, max_loss=1e-6).run(5, batch=4, progress=False)
    assert result.steps == 0 and "exceeds max_loss 1e-06 at step 1" in result.stopped
    assert torch.equal(images(result.generator), images(original))


def test_stylegan2_finetunes_with_logistic_r1_and_saves_the_rosinality_layout(reals, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = StyleGAN2Config(size=RESOLUTION, style_dim=16, n_mlp=2, channels=(16, 16, 16))
    generator = StyleGAN2Generator(config).eval()
    generator.discriminator = StyleGAN2Discriminator(RESOLUTION, config.channels)
    attack = finetuner(reals, generator=generator,
                       objective=objective_for(generator.discriminator, r1_gamma=5.0, r1_every=2))
    result = attack.run(3, batch=4, out=tmp_path, log_every=3, eval_n=4, progress=False)
    assert result.settings["objective"] == "logistic-r1" and result.settings["lr"] == 2e-3
    assert {"loss_d", "r1", "loss_g_gan", "loss_classifier"} <= set(result.history[-1])
    saved = torch.load(result.checkpoint, weights_only=True)
    assert set(saved) == {"g", "g_ema", "d", "latent_avg"}
    reloaded = load_generator(result.checkpoint)
    assert reloaded.format == "sg2_rosinality"
    assert torch.equal(images(reloaded), images(result.generator))
    assert torch.equal(reloaded.w_avg, result.generator.w_avg) and bool(result.generator.w_avg.abs().sum() > 0)
    for key, value in result.discriminator.state_dict().items():
        assert torch.equal(reloaded.discriminator.state_dict()[key], value), key


@pytest.mark.parametrize(("source", "objective", "written", "trained_option"), [
    (TF_PGAN, "wgan-gp", "pgan_tf_torch", {"use_avg": False}),
    (TF_STYLEGAN, "logistic-r1", "stylegan_tf_torch", {"use_gs": False}),
], ids=["tf_pgan", "tf_stylegan"])
def test_an_official_tf_network_finetunes_with_its_loss_and_is_written_as_its_tf_variables(
        source: Path, objective: str, written: str, trained_option: dict, tmp_path: Path) -> None:
    if not source.is_file():
        pytest.skip(f"TF fixture not found at {source}")
    generator = load_generator(source)
    reals = torch.from_numpy(np.stack(random_crops(builtin_photos(), 16, generator.resolution, seed=1)))
    attack = finetuner(reals.permute(0, 3, 1, 2).contiguous(), generator=generator)
    result = attack.run(2, batch=4, out=tmp_path, progress=False)
    assert result.settings["objective"] == objective and result.settings["format"] == written
    reloaded = load_generator(result.checkpoint)
    assert reloaded.format == written
    assert torch.equal(images(reloaded), images(result.generator))
    assert torch.equal(images(load_generator(result.checkpoint, **trained_option)), images(result.trained))
    assert not torch.equal(images(reloaded), images(load_generator(source)))  # it did train
    for key, value in result.discriminator.state_dict().items():
        assert torch.equal(reloaded.discriminator.state_dict()[key], value), key


def test_r1_is_lazy_and_weighted_by_its_interval() -> None:
    weights = torch.linspace(-1, 1, 3 * 4 * 4).reshape(1, 3, 4, 4)
    critic = lambda x: (x * weights).flatten(1).sum(1, keepdim=True)  # noqa: E731 - gradient = weights
    real, fake = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    logistic = (torch.nn.functional.softplus(critic(fake)).mean() + torch.nn.functional.softplus(-critic(real)).mean())
    objective = LogisticR1(r1_gamma=3.0, r1_every=4)
    total, parts = objective.discriminator_loss(critic, real, fake, 8, torch.Generator())
    torch.testing.assert_close(parts["r1"], weights.square().sum())
    torch.testing.assert_close(total, logistic + 3.0 / 2 * weights.square().sum() * 4)
    total, parts = objective.discriminator_loss(critic, real, fake, 9, torch.Generator())
    assert "r1" not in parts
    torch.testing.assert_close(total, logistic)
    adam = objective.discriminator_optimizer([torch.zeros(1, requires_grad=True)], 2e-3, (0.0, 0.99))
    assert adam.defaults["lr"] == pytest.approx(2e-3 * 0.8) and adam.defaults["betas"][1] == pytest.approx(0.99 ** 0.8)


def test_generators_that_cannot_be_finetuned_are_refused(reals) -> None:
    with pytest.raises(InputError, match="a pgan_zoo checkpoint holds the discriminator .* PGANZooGenerator has none"):
        GeneratorFinetuner(tiny_pgan()[0], detector(), reals)
    glow = GlowGenerator(Glow(GlowConfig(resolution=8, hidden_channels=8, steps=2, levels=2)))
    with pytest.raises(InputError, match="a GlowGenerator .* cannot be saved in its own format"):
        GeneratorFinetuner(glow, detector(), reals)
    with pytest.raises(ValueError, match=r"uint8 N x 3 x 16 x 16 real images"):
        GeneratorFinetuner(pgan_with_discriminator(), detector(), reals[:, :, :8, :8])


def test_real_images_are_centre_squares_at_the_generator_resolution(tmp_path: Path) -> None:
    wide = np.zeros((16, 24, 3), np.uint8)
    wide[:, :, 0] = np.arange(24, dtype=np.uint8)[None, :] * 10  # columns tell where the crop is
    Image.fromarray(wide).save(tmp_path / "wide.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    real = RealImages.from_source(tmp_path, resolution=16, cache=True)
    assert len(real) == 1 and real.cached
    batch = real.batch([0, 0], flip=torch.tensor([False, True]))
    expected = torch.from_numpy(wide[:, 4:20]).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(batch[0], expected)
    torch.testing.assert_close(batch[1], expected.flip(2))
    uncached = RealImages.from_source(tmp_path, resolution=16, cache=False)
    assert not uncached.cached and torch.equal(uncached.batch([0]), batch[:1])


def test_a_stylegan_not_loaded_from_tf_is_refused_before_training(reals) -> None:
    from patchscope.generators.stylegan.model import StyleGAN, StyleGANConfig
    from patchscope.generators.stylegan.discriminator import DiscriminatorConfig, StyleGANDiscriminator

    generator = StyleGAN(StyleGANConfig(resolution=RESOLUTION, fmap_base=32, fmap_max=16, latent_dim=8, w_dim=8,
                                        mapping_layers=2, mapping_fmaps=8))
    generator.discriminator = StyleGANDiscriminator(DiscriminatorConfig(resolution=RESOLUTION, fmap_base=32,
                                                                        fmap_max=16))
    with pytest.raises(InputError, match="not loaded from a TF pickle"):
        GeneratorFinetuner(generator, detector(), reals)
