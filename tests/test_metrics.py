"""Image metrics: Fréchet distance, precision/recall, feature extractors, data classifier.

Convention under test: extractors and metrics take images in [0, 1]; data batches are in
[-1, 1] and go through `to_unit_range`.
"""

from __future__ import annotations

import ast
import json
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch

from genframe.errors import UserError
from genframe.metrics import (
    ClassifierFeatures,
    ImageClassifier,
    ImageMetrics,
    TimmFeatures,
    build_extractor,
    cache_dir,
    class_accuracy,
    classifier_from_datasets,
    extract_features,
    feature_metrics,
    frechet_distance,
    frechet_distance_from_stats,
    image_quality,
    load_or_train_classifier,
    precision_recall,
    stack_dataset,
    to_unit_range,
    train_classifier,
)
from genframe.samples import Samples


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: on a shared 2-core CPU, 2 torch threads that wait for each
    other made these tests 10 to 40 times slower than one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

# --------------------------------------------------------------------------- Fréchet


def _random_spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_closed_form_diagonal():
    # Diagonal covariances commute: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(s1) - sqrt(s2))^2.
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = float(((mu1 - mu2) ** 2).sum() + ((s1.sqrt() - s2.sqrt()) ** 2).sum())  # 5 + 4 + 1
    assert expected == pytest.approx(10.0)
    got = frechet_distance_from_stats(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_closed_form_full_covariances():
    from scipy.linalg import sqrtm

    d = 6
    s1, s2 = _random_spd(d, 1), _random_spd(d, 2)
    mu1 = torch.zeros(d, dtype=torch.float64)
    mu2 = torch.linspace(-1, 1, d, dtype=torch.float64)
    cross = sqrtm((s1 @ s2).numpy()).real
    expected = float((mu1 - mu2) @ (mu1 - mu2) + torch.trace(s1 + s2) - 2 * cross.trace())
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # Symmetric in its two arguments.
    assert frechet_distance_from_stats(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8)


def test_frechet_of_samples_approaches_the_closed_form():
    d, n = 4, 40_000
    g = torch.Generator().manual_seed(0)
    s1, s2 = _random_spd(d, 3), _random_spd(d, 4)
    mu2 = torch.full((d,), 0.5, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    y = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s2).T + mu2
    exact = frechet_distance_from_stats(torch.zeros(d), s1, mu2, s2)
    assert frechet_distance(x.float(), y.float()) == pytest.approx(exact, rel=0.05)


def test_frechet_identical_sets_and_shifts():
    x = torch.randn(500, 32, generator=torch.Generator().manual_seed(0)) * 3 + 100
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shift = torch.zeros(32)
    shift[:4] = 1.0
    # A pure translation changes only the mean term.
    assert frechet_distance(x, x + shift) == pytest.approx(4.0, rel=1e-5)


def test_frechet_refuses_mismatched_or_tiny_sets():
    with pytest.raises(ValueError, match="same extractor"):
        frechet_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.randn(1, 3), torch.randn(10, 3))


def test_extractors_plug_into_torchmetrics_fid():
    """Our extractors meet torchmetrics' custom-feature contract; both FDs agree."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(0)
    extractor = ClassifierFeatures(ImageClassifier(1, 8, 10, feature_dim=16))
    g = torch.Generator().manual_seed(1)
    real = torch.rand(300, 1, 8, 8, generator=g)
    fake = torch.rand(300, 1, 8, 8, generator=g) ** 2
    fid = FrechetInceptionDistance(feature=extractor, normalize=True)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    ours = frechet_distance(extract_features(extractor, real), extract_features(extractor, fake))
    assert ours > 0
    assert float(fid.compute()) == pytest.approx(ours, rel=1e-3)
    assert not extractor.training  # the metric's .train() did not unfreeze it


# --------------------------------------------------------------------- precision/recall


def _modes(n_modes: int, per_mode: int, seed: int, modes=None, dim: int = 2) -> torch.Tensor:
    """Unit Gaussian clusters 20 apart; `modes` picks which clusters to draw from."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.arange(n_modes, dtype=torch.float32)[:, None] * 20.0 * torch.ones(1, dim)
    if modes is not None:
        centres = centres[modes]
    x = centres[:, None, :] + torch.randn(len(centres), per_mode, dim, generator=g)
    return x.reshape(-1, dim)


def test_precision_recall_identical_sets():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone(), k=3) == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_disjoint_sets():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 16, generator=g)
    fake = torch.randn(200, 16, generator=g) + 100.0
    assert precision_recall(real, fake) == {"precision": 0.0, "recall": 0.0}


def test_half_the_modes_keeps_precision_and_halves_recall():
    real = _modes(10, 100, seed=0)  # 10 well-separated clusters
    fake = _modes(10, 200, seed=1, modes=list(range(5)))  # same count, only 5 clusters
    pr = precision_recall(real, fake, k=3)
    assert pr["precision"] > 0.9
    assert pr["recall"] == pytest.approx(0.5, abs=0.06)
    # The same number of samples over all 10 clusters recovers the recall.
    full = precision_recall(real, _modes(10, 100, seed=1), k=3)
    assert full["precision"] > 0.9 and full["recall"] > 0.9


def test_precision_recall_chunking_gives_the_same_answer():
    real, fake = _modes(4, 50, seed=2), _modes(4, 50, seed=3, modes=[0, 1, 3, 3])
    assert precision_recall(real, fake, max_elements=37) == precision_recall(real, fake)


# ----------------------------------------------------------------------------- timm

TIMM_MODEL = "test_resnet"  # timm's own tiny test network (0.37M parameters)


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """Random weights of a tiny timm model, saved locally in the formats users have."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    # With a classifier, as a downloaded checkpoint would be; the extractor drops it.
    model = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=10)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    root = tmp_path_factory.mktemp("timm")
    save_file(state, root / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, root / "w.pth")
    return root, model


def test_timm_features_from_local_files(timm_weights):
    root, reference = timm_weights
    ext = TimmFeatures(TIMM_MODEL, root / "w.safetensors", image_size=32)
    assert ext.name == f"timm:{TIMM_MODEL}" and ext.num_features == reference.num_features
    assert not any(p.requires_grad for p in ext.parameters())
    ext.train()
    assert not ext.training and not ext.model.training

    grey = torch.rand(5, 1, 20, 20, generator=torch.Generator().manual_seed(0))
    feats = ext(grey)
    assert feats.shape == (5, ext.num_features) and torch.isfinite(feats).all()

    # Same as doing by hand what the model expects: RGB, its input size, its mean/std.
    x = torch.nn.functional.interpolate(grey.expand(-1, 3, -1, -1), size=(32, 32),
                                        mode="bilinear", antialias=True)
    reference.eval()
    manual = reference.forward_head(reference.forward_features((x - 0.5) / 0.5), pre_logits=True)
    torch.testing.assert_close(feats, manual)

    # The wrapped, DataParallel-prefixed .pth gives the same network.
    torch.testing.assert_close(TimmFeatures(TIMM_MODEL, root / "w.pth", image_size=32)(grey), feats)
    # Its own input size when none is given.
    assert TimmFeatures(TIMM_MODEL, root / "w.safetensors").input_size == (160, 160)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_timm_bad_files_are_user_errors(timm_weights, tmp_path):
    import timm

    root, reference = timm_weights
    with pytest.raises(UserError, match=r"metrics\.timm_weights=.*nope\.safetensors: no such file"):
        TimmFeatures(TIMM_MODEL, tmp_path / "nope.safetensors")

    with pytest.raises(UserError, match=r"metrics\.timm_model=test_resnnet: not a timm model.*test_resnet"):
        TimmFeatures("test_resnnet", root / "w.safetensors")

    # Weights of another architecture: named file, named keys.
    other = tmp_path / "vit.pt"
    torch.save(timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict(), other)
    with pytest.raises(UserError, match=r"metrics\.timm_weights=.*vit\.pt: the weights do not fit.*missing"):
        TimmFeatures(TIMM_MODEL, other)

    # Weights of the right architecture with a NaN: refused before anything is loaded.
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first].view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(UserError, match=r"metrics\.timm_weights=.*nan\.pt: non-finite values in \['" + first):
        TimmFeatures(TIMM_MODEL, tmp_path / "nan.pt")

    # A pickle that would run code is refused, not unpickled.
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps({"x": print}))
    with pytest.raises(UserError, match="without unpickling code"):
        TimmFeatures(TIMM_MODEL, evil)

    with pytest.raises(UserError, match=r"metrics\.timm_weights"):
        build_extractor("timm", timm_model=TIMM_MODEL)
    with pytest.raises(UserError, match=r"metrics\.extractor=clasifier.*Did you mean 'classifier'"):
        build_extractor("clasifier")


# ------------------------------------------------------------------ digits classifier

DIGITS_KEY = {"name": "digits", "image_size": 8, "channels": 1, "num_classes": 10,
              "seed": 0, "val_fraction": 0.1}


@pytest.fixture(scope="module")
def digits():
    from genframe.data.digits import DigitsDataModule

    dm = DigitsDataModule(seed=0, val_fraction=0.1)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def digits_classifier(digits, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENFRAME_CACHE", str(cache))
        first = classifier_from_datasets(DIGITS_KEY, digits.train_set, digits.val_set)
        mtime = first.path.stat().st_mtime_ns
        second = classifier_from_datasets(DIGITS_KEY, digits.train_set, digits.val_set)
    return cache, first, mtime, second


def test_digits_classifier_trains_once_and_is_accurate(digits_classifier):
    cache, first, mtime, second = digits_classifier
    print(f"digits classifier: val accuracy {first.val_accuracy:.4f}, "
          f"trained in {first.train_seconds:.2f} s")
    assert not first.from_cache and first.val_accuracy >= 0.95
    assert first.path.parent == cache / "classifiers" and first.path.suffix == ".safetensors"

    # The second call loaded the file, did not retrain, did not rewrite it.
    assert second.from_cache and second.path == first.path
    assert second.path.stat().st_mtime_ns == mtime
    assert second.val_accuracy == first.val_accuracy
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    from safetensors import safe_open

    with safe_open(str(first.path), framework="pt") as f:
        meta = json.loads(f.metadata()["genframe_classifier"])
    assert meta["key"]["data"] == DIGITS_KEY and meta["num_classes"] == 10
    assert meta["architecture"]["in_channels"] == 1 and meta["val_accuracy"] == first.val_accuracy


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    import genframe.cache

    assert cache_dir is genframe.cache.cache_dir  # one cache folder, re-exported here
    monkeypatch.setenv("GENFRAME_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert cache_dir("tokens") == tmp_path / "c" / "tokens"
    monkeypatch.delenv("GENFRAME_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "genframe"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "genframe"


def test_the_token_cache_does_not_import_the_metrics(tmp_path):
    """The text token cache and the metrics share genframe.cache, not each other."""
    import genframe.text.cache as text_cache

    tree = ast.parse(open(text_cache.__file__, encoding="utf-8").read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "genframe.cache" in imported
    assert not any(m and m.startswith("genframe.metrics") for m in imported), imported

    # And at run time: its default folder is genframe's cache folder, metrics untouched.
    code = ("import sys, genframe.text.cache as c; print(c.default_cache_dir()); "
            "print('genframe.metrics' in sys.modules)")
    env = {**os.environ, "GENFRAME_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(tmp_path / "tokens"), "False"]


def test_other_data_or_a_damaged_entry_trains_again(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 2
    images = torch.rand(40, 1, 6, 6, generator=g) * 0.5 + labels[:, None, None, None] * 0.5
    args = (images[:30], labels[:30], images[30:], labels[30:])
    key = {"name": "halves", "num_classes": 2}
    a = load_or_train_classifier(key, *args, cache_dir=tmp_path, epochs=1)
    b = load_or_train_classifier({**key, "seed": 1}, *args, cache_dir=tmp_path, epochs=1)
    assert b.path != a.path and not b.from_cache
    # Edited data under an unchanged description is a different entry too.
    c = load_or_train_classifier(key, images[:30] * 0.9, *args[1:], cache_dir=tmp_path, epochs=1)
    assert c.path != a.path
    a.path.write_bytes(b"not safetensors")
    again = load_or_train_classifier(key, *args, cache_dir=tmp_path, epochs=1)
    assert not again.from_cache and again.path == a.path
    assert load_or_train_classifier(key, *args, cache_dir=tmp_path, epochs=1).from_cache


def test_training_is_seeded_and_leaves_the_global_rng_alone():
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(64, 1, 8, 8, generator=g), torch.arange(64) % 4
    before = torch.random.get_rng_state()
    m1, _ = train_classifier(images, labels, images, labels, epochs=1, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    m2, _ = train_classifier(images, labels, images, labels, epochs=1, seed=5)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"\[0, 1\].*to_unit_range"):
        train_classifier(images * 2 - 1, labels, images, labels, epochs=1)


def test_fd_separates_real_digits_from_noise(digits, digits_classifier):
    _, clf, _, _ = digits_classifier
    ext = build_extractor("classifier", classifier=clf)
    images = to_unit_range(stack_dataset(digits.train_set)["image"])  # (N, 1, 8, 8)
    n = len(images) // 2  # two disjoint halves, whatever the split leaves for training
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    half_a, half_b = images[perm[:n]], images[perm[n:2 * n]]
    noise = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    real_vs_real = image_quality(half_a, half_b, ext)
    real_vs_noise = image_quality(half_a, noise, ext)
    print(f"FD real-vs-real {real_vs_real['fd']:.3f}, real-vs-noise {real_vs_noise['fd']:.3f}; "
          f"P/R real {real_vs_real['precision']:.3f}/{real_vs_real['recall']:.3f}, "
          f"noise {real_vs_noise['precision']:.3f}/{real_vs_noise['recall']:.3f}")
    assert real_vs_noise["fd"] > 20 * real_vs_real["fd"]
    assert real_vs_real["precision"] > 0.8 and real_vs_real["recall"] > 0.8
    # Not 0: noise lands in a small region of feature space that the k-NN balls of a few
    # ambiguous real digits reach (seen: precision 0.14 to 0.41 and recall 0.2 to 0.3, by
    # the classifier's training split), but far below real digits.
    assert real_vs_noise["precision"] < 0.5 * real_vs_real["precision"]
    assert real_vs_noise["recall"] < 0.5 * real_vs_real["recall"]

    # ImageMetrics keeps the real features and gives the same numbers.
    metrics = ImageMetrics(half_a, ext)
    assert metrics(half_b)["fd"] == pytest.approx(real_vs_real["fd"], rel=1e-6)
    assert feature_metrics(metrics.real_features, extract_features(ext, noise))["fd"] == pytest.approx(
        real_vs_noise["fd"], rel=1e-6)


def test_class_accuracy_on_true_and_shuffled_labels(digits, digits_classifier):
    _, clf, _, _ = digits_classifier
    val = stack_dataset(digits.val_set)
    images, labels = to_unit_range(val["image"]), val["label"]
    true = class_accuracy(images, labels, clf)
    assert true["class_accuracy"] == pytest.approx(clf.val_accuracy)
    assert true["class_accuracy"] >= 0.95
    assert set(true) == {"class_accuracy", *(f"class_accuracy/{c}" for c in range(10))}
    assert min(true[f"class_accuracy/{c}"] for c in range(10)) > 0.8

    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert class_accuracy(images, shuffled, clf)["class_accuracy"] < 0.25

    # The same through ImageMetrics on a Samples value whose conditions carry the labels.
    samples = Samples(images=images, conditions=[{"label": int(y)} for y in labels])
    report = ImageMetrics(images, clf.extractor(), classifier=clf).of_samples(samples)
    assert report["class_accuracy"] == true["class_accuracy"]
    assert report["fd"] == pytest.approx(0.0, abs=1e-6) and report["precision"] == 1.0
    assert math.isfinite(report["recall"])


def test_classifier_features_refuse_the_wrong_image_size(digits_classifier):
    _, clf, _, _ = digits_classifier
    ext = clf.extractor()
    assert ext.num_features == clf.model.feature_dim
    assert ext(torch.rand(2, 1, 8, 8)).shape == (2, ext.num_features)
    with pytest.raises(UserError, match="expects images with 1 channel"):
        ext(torch.rand(2, 3, 8, 8))
    with pytest.raises(UserError, match="trained on 8x8 images, got 16x16"):
        ext(torch.rand(2, 1, 16, 16))


def test_stack_dataset_takes_the_first_rows_of_a_stream_too():
    """Shards are streamed (an IterableDataset): the limit is the first rows it yields."""
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            for i in range(1000):
                yield {"image": torch.full((1, 2, 2), float(i)), "label": torch.tensor(i % 10)}

    stacked = stack_dataset(Stream(), limit=70, batch_size=32)
    assert stacked["image"].shape == (70, 1, 2, 2)
    assert stacked["image"][:, 0, 0, 0].tolist() == [float(i) for i in range(70)]
    assert stack_dataset(Stream(), batch_size=256)["label"].shape == (1000,)
