"""Train / validation / test splits of every built-in data module, and `genframe evaluate`
on the test split by default."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from genframe.data.base import check_fractions, split_counts, split_indices
from genframe.errors import UserError
from tests.conftest import FAST

# ------------------------------------------------------------------ the shared split


@pytest.mark.parametrize("n, val, test, sizes", [
    (1797, 0.1, 0.1, (1437, 180, 180)),
    (100, 0.2, 0.05, (75, 20, 5)),
    (10, 0.01, 0.01, (8, 1, 1)),     # a held-out split gets at least one item
    (3, 0.1, 0.1, (1, 1, 1)),
    (10, 0.2, 0, (8, 2, 0)),         # test_fraction=0: no test split
])
def test_split_sizes_follow_the_fractions(n, val, test, sizes):
    train_idx, val_idx, test_idx = split_indices(n, val, test, seed=0)
    assert (len(train_idx), len(val_idx), len(test_idx)) == sizes
    # Disjoint, and together every item exactly once.
    together = torch.cat([train_idx, val_idx, test_idx])
    assert sorted(together.tolist()) == list(range(n))


def test_split_is_deterministic_per_seed():
    a = split_indices(500, 0.1, 0.1, seed=3)
    b = split_indices(500, 0.1, 0.1, seed=3)
    c = split_indices(500, 0.1, 0.1, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[2], c[2])


def test_test_split_is_the_validation_split_of_older_runs():
    """Runs trained before test splits held out the first n_val items of the same seeded
    permutation for validation and trained on the rest: with equal fractions their
    validation split is today's test split, so they are tested on images they never saw."""
    n, seed = 1797, 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    old_val = set(perm[:180].tolist())
    train_idx, val_idx, test_idx = split_indices(n, 0.1, 0.1, seed)
    assert set(test_idx.tolist()) == old_val
    assert not old_val & set(train_idx.tolist()) and not old_val & set(val_idx.tolist())


@pytest.mark.parametrize("val, test, match", [
    (-0.1, 0.1, r"data.val_fraction=-0.1: expected a share strictly between 0 and 1"),
    (0.1, -0.2, r"data.test_fraction=-0.2: expected a share .* \(or 0 for no test split\)"),
    (0, 0.1, r"data.val_fraction=0: expected a share strictly between 0 and 1"),
    (1.0, 0.1, r"data.val_fraction=1.0"),
    (0.5, 0.5, r"data.val_fraction \+ data.test_fraction = 0.5 \+ 0.5 = 1: expected less than 1"),
    (0.7, 0.4, r"= 1.1: expected less than 1, so that some data is left for training"),
    ("0.1", 0.1, r"data.val_fraction='0.1': expected a number"),
])
def test_bad_fractions_are_refused(val, test, match):
    with pytest.raises(UserError, match=match):
        check_fractions(val, test)


def test_a_split_that_would_be_empty_is_refused():
    assert split_counts(3, 0.1, 0.1) == (1, 1, 1)
    with pytest.raises(UserError, match=r"the data: too few items \(2\) for the splits: "
                       r"data.val_fraction=0.1 holds out 1 and data.test_fraction=0.1 holds "
                       r"out 1, leaving 0 for training; expected smaller fractions or more "
                       r"items \(at least 3\), or data.test_fraction=0 for no test split"):
        split_counts(2, 0.1, 0.1)
    assert split_counts(2, 0.1, 0) == (1, 1, 0)  # without a test split two items do


def test_rounding_leaves_one_for_training_or_refuses():
    assert split_counts(10, 0.45, 0.45) == (2, 4, 4)  # round(4.5) == 4
    with pytest.raises(UserError, match="leaving 0 for training"):
        split_counts(10, 0.49, 0.49)


# ------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits():
    from genframe.data.digits import DigitsDataModule

    dm = DigitsDataModule()
    dm.setup("fit")
    return dm


def _rows(dataset) -> list[bytes]:
    """Each item of a digits split as bytes (image and label), to compare splits."""
    images, labels = dataset.columns["image"], dataset.columns["label"]
    return [images[i].numpy().tobytes() + bytes([int(labels[i])]) for i in range(len(labels))]


def test_digits_splits_cover_the_data_and_follow_the_fractions(digits):
    from sklearn.datasets import load_digits

    assert digits.split_sizes == {"train": 1437, "val": 180, "test": 180}
    assert (len(digits.train_set), len(digits.val_set), len(digits.test_set)) == (1437, 180, 180)
    raw = load_digits()
    everything = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
    expected = sorted(everything[i].numpy().tobytes() + bytes([int(raw.target[i])])
                      for i in range(len(raw.target)))
    got = sorted(_rows(digits.train_set) + _rows(digits.val_set) + _rows(digits.test_set))
    assert got == expected  # every digit exactly once (as a multiset: a few repeat)
    batch = next(iter(digits.test_dataloader()))
    assert batch["image"].shape == (64, 1, 8, 8) and batch["label"].dtype == torch.long


def test_digits_split_is_seeded(digits):
    from genframe.data.digits import DigitsDataModule

    again = DigitsDataModule(seed=0)
    again.setup()
    other = DigitsDataModule(seed=1)
    other.setup()
    assert torch.equal(again.test_set.columns["image"], digits.test_set.columns["image"])
    assert torch.equal(again.val_set.columns["label"], digits.val_set.columns["label"])
    assert not torch.equal(other.test_set.columns["image"], digits.test_set.columns["image"])


def test_digits_fractions_are_checked_when_built():
    from genframe.data.digits import DigitsDataModule

    with pytest.raises(UserError, match="data.test_fraction=-0.1"):
        DigitsDataModule(test_fraction=-0.1)
    with pytest.raises(UserError, match="expected less than 1"):
        DigitsDataModule(val_fraction=0.6, test_fraction=0.4)


def test_no_test_split_when_test_fraction_is_zero():
    from genframe.data.digits import DigitsDataModule

    dm = DigitsDataModule(test_fraction=0)
    dm.setup()
    assert dm.test_set is None and dm.split_sizes == {"train": 1617, "val": 180}
    with pytest.raises(UserError, match=r"data.test_fraction=0: .* has no test split; .*split=val"):
        dm.test_dataloader()


def test_split_summary_is_logged_once(caplog):
    from genframe.data.digits import DigitsDataModule

    dm = DigitsDataModule(val_fraction=0.2, test_fraction=0.05)
    with caplog.at_level(logging.INFO, logger="genframe"):
        dm.setup()
        dm.setup()
        dm.test_dataloader()
    lines = [r.getMessage() for r in caplog.records if "splits:" in r.getMessage()]
    assert lines == ["DigitsDataModule splits: 1348 train / 359 val / 90 test images (seed 0)"]


def test_the_cli_refuses_bad_fractions_before_training(cli, tmp_path):
    result = cli("train", "data.test_fraction=0.95", "trainer.max_epochs=1")
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()
    assert "data.val_fraction + data.test_fraction" in err[-1] and "expected less than 1" in err[-1]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained


# ------------------------------------------------------------------ image_folder


def _img(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4), value).save(path)


def _values(dataset) -> list[int]:
    """The grey value (0..255) of each image of a split."""
    return sorted(int(dataset.images[i].float().mean().round()) for i in range(len(dataset)))


def _labels(dataset) -> list[int]:
    return sorted(int(x) for x in dataset.labels)


def test_image_folder_fraction_split_is_disjoint_seeded_and_sized(tmp_path):
    from genframe.data.image_folder import ImageFolderDataModule

    for v in range(20):
        _img(tmp_path / f"{v:02d}.png", v * 10)
    make = lambda seed: ImageFolderDataModule(root=str(tmp_path), image_size=4, channels=1,
                                              val_fraction=0.2, test_fraction=0.1, seed=seed)
    dm = make(0)
    dm.setup()
    parts = [_values(dm.train_set), _values(dm.val_set), _values(dm.test_set)]
    assert [len(p) for p in parts] == [14, 4, 2]
    assert sorted(sum(parts, [])) == [v * 10 for v in range(20)]  # disjoint and covering
    again, other = make(0), make(1)
    again.setup()
    other.setup()
    assert _values(again.test_set) == parts[2] and _values(again.val_set) == parts[1]
    assert _values(other.val_set) != parts[1]


def _classes(root, names, value):
    for name in names:
        for i in range(3):
            _img(root / name / f"{i}.png", value)


def test_image_folder_uses_val_root_and_test_root(tmp_path):
    from genframe.data.image_folder import ImageFolderDataModule

    _classes(tmp_path / "train", ["a", "b", "c"], 0)
    _classes(tmp_path / "val", ["b"], 128)           # a class may be missing
    _classes(tmp_path / "test", ["a", "c"], 255)
    # The fractions of splits read from folders are not used (not even checked).
    dm = ImageFolderDataModule(root=str(tmp_path / "train"), val_root=str(tmp_path / "val"),
                               test_root=str(tmp_path / "test"), image_size=4, channels=1,
                               val_fraction=0.9, test_fraction=0.9)
    assert dm.class_names == ["a", "b", "c"] and dm.num_classes == 3
    dm.setup()
    assert dm.split_sizes == {"train": 9, "val": 3, "test": 6}
    assert set(_values(dm.train_set)) == {0}  # every root image trains
    assert set(_values(dm.val_set)) == {128} and set(_values(dm.test_set)) == {255}
    # Labels follow the class names of data.root, not the folder's own order.
    assert _labels(dm.val_set) == [1, 1, 1]
    assert _labels(dm.test_set) == [0, 0, 0, 2, 2, 2]


def test_image_folder_val_root_only_splits_root_into_train_and_test(tmp_path):
    from genframe.data.image_folder import ImageFolderDataModule

    for v in range(10):
        _img(tmp_path / "root" / f"{v}.png", v * 20)
    _img(tmp_path / "val" / "x.png", 255)
    _img(tmp_path / "val" / "y.png", 255)
    dm = ImageFolderDataModule(root=str(tmp_path / "root"), val_root=str(tmp_path / "val"),
                               image_size=4, channels=1, val_fraction=0.5, test_fraction=0.2)
    dm.setup()
    assert dm.split_sizes == {"train": 8, "val": 2, "test": 2}
    assert _values(dm.val_set) == [255, 255]
    assert sorted(_values(dm.train_set) + _values(dm.test_set)) == [v * 20 for v in range(10)]


def test_image_folder_refuses_unknown_classes_and_loose_images_in_split_roots(tmp_path):
    from genframe.data.image_folder import ImageFolderDataModule

    _classes(tmp_path / "train", ["cat", "dog"], 0)
    _classes(tmp_path / "test", ["cat", "cow"], 255)
    with pytest.raises(UserError) as err:
        ImageFolderDataModule(root=str(tmp_path / "train"), test_root=str(tmp_path / "test"))
    msg = str(err.value)
    assert msg.startswith("data.test_root: class folder cow under ") and "\n" not in msg
    assert str(tmp_path / "test") in msg and "(cat, dog)" in msg
    _img(tmp_path / "val" / "loose.png", 9)
    with pytest.raises(UserError, match=r"data.val_root: 1 image lies directly in .*val "
                                        r"\(e.g. loose.png\).*\(cat, dog\)"):
        ImageFolderDataModule(root=str(tmp_path / "train"), val_root=str(tmp_path / "val"))
    # Without labels the folders of the split roots do not matter.
    dm = ImageFolderDataModule(root=str(tmp_path / "train"), test_root=str(tmp_path / "test"),
                               labels=False, image_size=4)
    dm.setup()
    assert dm.split_sizes["test"] == 6 and dm.test_set.labels is None


def test_the_cli_refuses_an_unknown_class_in_test_root(cli, tmp_path):
    _classes(tmp_path / "train", ["cat", "dog"], 0)
    _classes(tmp_path / "test", ["cow"], 255)
    result = cli("train", "data=image_folder", f"data.root={tmp_path / 'train'}",
                 f"data.test_root={tmp_path / 'test'}", "trainer.max_epochs=1")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "data.test_root: class folder cow under" in last and "(cat, dog)" in last
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", ["missing", "inside_root", "same"])
def test_image_folder_bad_split_roots_name_their_key(tmp_path, case):
    from genframe.data.image_folder import ImageFolderDataModule

    for v in range(5):
        _img(tmp_path / "root" / f"{v}.png", v)
    test_root = {"missing": tmp_path / "nope", "inside_root": tmp_path / "root" / "held",
                 "same": tmp_path / "root"}[case]
    if case == "inside_root":
        _img(test_root / "h.png", 7)
    with pytest.raises(UserError) as err:
        ImageFolderDataModule(root=str(tmp_path / "root"), test_root=str(test_root))
    msg = str(err.value)
    assert msg.startswith("data.test_root: ") and str(test_root) in msg
    assert ("does not exist" in msg) if case == "missing" else ("overlaps data.root" in msg)


def test_image_folder_too_few_images_for_three_splits(tmp_path):
    from genframe.data.image_folder import ImageFolderDataModule

    _img(tmp_path / "a.png", 0)
    _img(tmp_path / "b.png", 9)
    with pytest.raises(UserError, match=r"data.root .*: too few image files \(2\) for the splits"):
        ImageFolderDataModule(root=str(tmp_path))
    dm = ImageFolderDataModule(root=str(tmp_path), test_fraction=0, image_size=4)  # 1 + 1
    dm.setup()
    assert dm.split_sizes == {"train": 1, "val": 1} and dm.test_set is None


# ------------------------------------------------------------------ text and chat


def _docs_jsonl(path, n):
    # Each document repeats one distinct word, so a split's text tells which documents it
    # holds; every document has every digit, so the char tokenizer (trained on the
    # training split) knows all characters of the others.
    words = [f"doc{i:02d}" for i in range(n)]
    path.write_text("".join(json.dumps({"text": f"{w} " * 12 + "0123456789"}) + "\n"
                            for w in words))
    return words


def _text_of(tokenizer, windows) -> str:
    return tokenizer.decode(np.asarray(windows.tokens, dtype=np.int64).tolist())


def test_text_splits_whole_documents_disjoint_and_seeded(tmp_path):
    from genframe.data.text import TextDataModule

    words = _docs_jsonl(tmp_path / "d.jsonl", 30)
    make = lambda seed: TextDataModule(source="jsonl", path=str(tmp_path / "d.jsonl"),
                                       block_size=8, val_fraction=0.2, test_fraction=0.1,
                                       seed=seed)
    dm = make(0)
    dm.setup()
    assert dm.split_sizes == {"train": 21, "val": 6, "test": 3}
    found = {s: {w for w in words if w in _text_of(dm.tokenizer, getattr(dm, f"{s}_set"))}
             for s in ("train", "val", "test")}
    assert [len(found[s]) for s in ("train", "val", "test")] == [21, 6, 3]
    assert set.union(*found.values()) == set(words)  # each document in exactly one split
    again, other = make(0), make(1)
    again.setup()
    other.setup()
    assert _text_of(again.tokenizer, again.test_set) == _text_of(dm.tokenizer, dm.test_set)
    assert _text_of(other.tokenizer, other.test_set) != _text_of(dm.tokenizer, dm.test_set)
    assert dm.test_dataloader().dataset is dm.test_set


def test_text_with_one_document_is_cut_by_position(tmp_path):
    from genframe.data.text import TextDataModule

    text = "".join(chr(97 + i % 26) for i in range(1000))
    (tmp_path / "one.txt").write_text(text)
    dm = TextDataModule(source="files", path=str(tmp_path / "one.txt"), block_size=8,
                        val_fraction=0.1, test_fraction=0.2)
    dm.setup()
    pieces = [_text_of(dm.tokenizer, getattr(dm, f"{s}_set")) for s in ("train", "val", "test")]
    assert [len(p) for p in pieces] == [700, 100, 200]
    assert "".join(pieces) == text  # in order: training text, then validation, then test


def test_text_too_few_documents_or_tokens_are_refused(tmp_path):
    from genframe.data.text import TextDataModule

    _docs_jsonl(tmp_path / "d.jsonl", 3)
    dm = TextDataModule(source="jsonl", path=str(tmp_path / "d.jsonl"), block_size=8,
                        val_fraction=0.5, test_fraction=0.4)  # round(1.5) + round(1.2) = 3
    with pytest.raises(UserError, match=r"too few documents \(3\) for the splits"):
        dm.setup()
    (tmp_path / "one.txt").write_text("abcdefghij" * 100)  # 1000 characters
    with pytest.raises(UserError, match=r"the test split of data.path=.* has 10 tokens, fewer "
                                        r"than data.block_size \+ 1 = 17; .*a larger "
                                        r"data.test_fraction"):
        TextDataModule(source="files", path=str(tmp_path / "one.txt"), block_size=16,
                       test_fraction=0.01).setup()
    with pytest.raises(UserError, match="data.test_fraction=1.5"):
        TextDataModule(test_fraction=1.5)


def test_chat_splits_conversations_disjoint_and_seeded(tmp_path):
    from genframe.data.chat import ChatDataModule

    path = tmp_path / "c.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    make = lambda seed: ChatDataModule(path=str(path), block_size=48, val_fraction=0.1,
                                       test_fraction=0.2, seed=seed)
    dm = make(0)
    dm.setup()
    assert dm.split_sizes == {"train": 14, "val": 2, "test": 4}
    rows_of = lambda d, s: {tuple(r.tolist()) for r in getattr(d, f"{s}_set").columns["tokens"]}
    parts = [rows_of(dm, s) for s in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == len(set.union(*parts)) == 20
    again, other = make(0), make(1)
    again.setup()
    other.setup()
    assert rows_of(again, "test") == parts[2] and rows_of(other, "test") != parts[2]
    with pytest.raises(UserError, match=r"too few conversations \(2\) for the splits"):
        ChatDataModule(path=str(_two(tmp_path, rows))).setup()
    two = ChatDataModule(path=str(_two(tmp_path, rows)), test_fraction=0)  # fine-tune on two
    two.setup()
    assert two.split_sizes == {"train": 1, "val": 1}


def _two(tmp_path, rows):
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return path


def test_every_data_config_has_both_fractions():
    from omegaconf import OmegaConf

    from genframe.config import conf_dir

    for name in ("digits", "image_folder", "text", "chat"):
        node = OmegaConf.load(conf_dir() / "data" / f"{name}.yaml")
        assert node.val_fraction == 0.1 and node.test_fraction == 0.1, name


# ------------------------------------------------------------------ genframe evaluate


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from genframe.config import compose
    from genframe.tasks.train import train

    out = tmp_path_factory.mktemp("split_train") / "run"
    return train(compose("train", [*FAST, f"paths.output_dir={out}"]))


def _evaluate(compose_task, run, *overrides):
    from genframe.tasks.evaluate import evaluate

    return evaluate(compose_task("evaluate", f"run={run}", "metrics.enabled=false", *overrides))


def test_evaluate_reports_the_test_split_by_default(tiny_run, compose_task):
    result = _evaluate(compose_task, tiny_run["run_dir"])
    m = result["metrics"]
    assert result["split"] == "test" and "test/loss" in m and "test/recon" in m
    assert not [k for k in m if k.startswith("val/")]
    assert result["objective"] == m["test/loss"]
    line = json.loads((tiny_run["run_dir"] / "evaluations.jsonl").read_text().splitlines()[-1])
    assert line["split"] == "test" and line["metrics"] == m

    val = _evaluate(compose_task, tiny_run["run_dir"], "split=val")["metrics"]
    assert "val/loss" in val and not [k for k in val if k.startswith("test/")]
    # Other images, another figure; the validation figure is the one training measured.
    assert val["val/loss"] != m["test/loss"]
    assert val["val/loss"] == pytest.approx(tiny_run["metrics"]["val/loss"], rel=0.05)
    line = json.loads((tiny_run["run_dir"] / "evaluations.jsonl").read_text().splitlines()[-1])
    assert line["split"] == "val"


def test_evaluate_test_loss_is_the_loss_over_the_test_split(tiny_run, compose_task):
    """The reported test/loss is the model's validation step over the test images (and
    not over the validation images that picked the checkpoint)."""
    import pytorch_lightning as pl

    from genframe.data.digits import DigitsDataModule
    from genframe.weights import load_model

    m = _evaluate(compose_task, tiny_run["run_dir"], "seed=5")["metrics"]
    data = DigitsDataModule()
    expected = {}
    for split in ("test", "val"):
        # As evaluate does: seed, then build the model (the ELBO samples z).
        pl.seed_everything(5, workers=True, verbose=False)
        model, _, _ = load_model(tiny_run["run_dir"], None)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False)
        expected[split] = trainer.validate(model, dataloaders=data.dataloader(split),
                                           verbose=False)[0]["val/loss"]
    assert m["test/loss"] == pytest.approx(expected["test"], rel=1e-5)
    assert m["test/loss"] != pytest.approx(expected["val"], rel=1e-5)


def test_evaluate_image_metrics_carry_the_split_and_can_use_the_test_images(tiny_run, compose_task):
    from genframe.tasks.evaluate import evaluate

    result = evaluate(compose_task("evaluate", f"run={tiny_run['run_dir']}",
                                   "metrics.num_samples=60", "metrics.real=test"))
    m = result["metrics"]
    assert m["test/fd"] > 0 and 0 <= m["test/precision"] <= 1 and 0 <= m["test/recall"] <= 1
    assert m["metrics/num_real"] == 180  # the test images
    assert not [k for k in m if k.startswith("val/")]
    line = json.loads((tiny_run["run_dir"] / "evaluations.jsonl").read_text().splitlines()[-1])
    assert line["real"] == "test" and line["split"] == "test"


def test_evaluate_refuses_a_bad_split_and_data_without_a_test_split(tiny_run, compose_task):
    with pytest.raises(UserError, match=r"split: expected test .* or val, got 'train'"):
        _evaluate(compose_task, tiny_run["run_dir"], "split=train")
    with pytest.raises(UserError, match=r"data.test_fraction=0: .* has no test split"):
        _evaluate(compose_task, tiny_run["run_dir"], "data=digits", "data.test_fraction=0")


def test_evaluate_warns_about_runs_trained_before_test_splits(tiny_run, compose_task,
                                                             tmp_path, caplog):
    old = tmp_path / "old_run"
    shutil.copytree(tiny_run["run_dir"], old)
    info = json.loads((old / "run.json").read_text())
    del info["data"]["test_fraction"]  # as written before data had test splits
    (old / "run.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING, logger="genframe"):
        _evaluate(compose_task, old)
    assert "trained before data had a test split" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="genframe"):
        _evaluate(compose_task, old, "split=val")
    assert "trained before data had a test split" in caplog.text
    assert "val/* figures are optimistic" in caplog.text
