"""data=shapes: captioned shapes drawn deterministically, with held-out colour x shape pairs
as the test split."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from genframe.data.shapes import (
    ATTRIBUTES,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataModule,
    caption_of,
    held_out_pairs,
    parse_caption,
    render,
)
from genframe.errors import UserError

SMALL = {"per_combination": 2}


@pytest.fixture(scope="module")
def shapes():
    dm = ShapesDataModule(**SMALL)
    dm.setup("fit")
    return dm


def _pairs(dm, split):
    return {(a["colour"], a["shape"]) for a in dm.attributes[split]}


def test_splits_sizes_keys_and_ranges(shapes):
    # 120 combinations x 2 copies; 2 held-out pairs = 20 combinations = 40 test images.
    assert shapes.split_sizes == {"train": 180, "val": 20, "test": 40}
    batch = next(iter(shapes.train_dataloader()))
    assert set(batch) == {"image", "caption"} == set(shapes.provides)
    assert batch["image"].shape == (64, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image"].min() == -1 and batch["image"].max() == 1
    assert isinstance(batch["caption"], list) and all(isinstance(c, str) for c in batch["caption"])


def test_test_split_holds_only_pairs_never_seen_in_training(shapes):
    held = set(shapes.held_out_pairs)
    assert len(held) == 2
    assert _pairs(shapes, "test") == held
    assert not held & (_pairs(shapes, "train") | _pairs(shapes, "val"))
    # ...and every held-out pair comes in every size and position.
    test_combos = {(a["size"], a["position"]) for a in shapes.attributes["test"]}
    assert test_combos == set(itertools.product(SIZES, POSITIONS))
    # Each held-out colour and shape is still seen in training, with other partners.
    train = _pairs(shapes, "train")
    assert {c for c, _ in train} == set(COLOURS) and {s for _, s in train} == set(SHAPES)
    # Captions say the same as the attributes.
    test = shapes.dataset("test")
    assert [parse_caption(c) for c in test.columns["caption"]] == shapes.attributes["test"]


def test_deterministic_per_seed(shapes):
    again = ShapesDataModule(**SMALL)
    again.setup("fit")
    other = ShapesDataModule(**SMALL, seed=1)
    other.setup("fit")
    for split in ("train", "val", "test"):
        a, b = shapes.dataset(split).columns, again.dataset(split).columns
        assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert shapes.dataset("train").columns["caption"] != other.dataset("train").columns["caption"]


@pytest.mark.parametrize("count", [0, 1, 2, 3, 4])
def test_held_out_pairs_keep_two_partners_for_every_colour_and_shape(count):
    for seed in range(20):
        held = held_out_pairs(count, seed)
        assert len(held) == len(set(held)) == count
        for colour in COLOURS:
            assert len(SHAPES) - sum(c == colour for c, _ in held) >= 2
        for shape in SHAPES:
            assert len(COLOURS) - sum(s == shape for _, s in held) >= 2
    assert held_out_pairs(2, 0) != held_out_pairs(2, 3)  # the seed matters


def test_no_test_split_without_held_out_pairs():
    dm = ShapesDataModule(per_combination=1, held_out=0)
    dm.setup("fit")
    assert dm.split_sizes == {"train": 108, "val": 12}
    with pytest.raises(UserError, match="no test split"):
        dm.dataset("test")


def test_every_caption_round_trips():
    for values in itertools.product(*ATTRIBUTES.values()):
        attrs = dict(zip(ATTRIBUTES, values))
        assert parse_caption(caption_of(attrs)) == attrs
    assert caption_of({"size": "large", "colour": "red", "shape": "circle",
                       "position": "top left"}) == "a large red circle at the top left"
    assert caption_of({"size": "small", "colour": "blue", "shape": "square",
                       "position": "centre"}) == "a small blue square in the centre"


@pytest.mark.parametrize("text, expected", [
    ("  A Small  Green triangle at the bottom right. ",
     {"size": "small", "colour": "green", "shape": "triangle", "position": "bottom right"}),
    ("a large yellow square in the center",
     {"size": "large", "colour": "yellow", "shape": "square", "position": "centre"}),
    ("a large purple circle at the top left", None),
    ("a huge red circle at the top left", None),
    ("a large red hexagon at the top left", None),
    ("a large red circle at the left", None),
    ("a large red circle", None),
    ("", None),
    (None, None),
])
def test_parse_caption_forgives_form_but_not_words(text, expected):
    assert parse_caption(text) == expected


def test_render_draws_the_colour_on_black_where_asked():
    image = render({"size": "small", "colour": "green", "shape": "square",
                    "position": "bottom right"}, 32)
    assert image.shape == (3, 32, 32)
    assert image[:, 20:28, 20:28].eq(torch.tensor([0.0, 1, 0]).view(3, 1, 1)).all()
    assert image.sum() == 64  # an 8x8 square, green only, nothing else lit


def test_split_sizes_are_logged(caplog):
    with caplog.at_level(logging.INFO, logger="genframe"):
        ShapesDataModule(per_combination=1).setup("fit")
    line = next(r.getMessage() for r in caplog.records if "ShapesDataModule" in r.getMessage())
    assert "90 train / 10 val / 20 test images" in line and "holds out" in line


@pytest.mark.parametrize("kwargs, match", [
    ({"image_size": 16}, r"image_size must be an integer >= 24.*got 16"),
    ({"channels": 1}, r"data.channels is 3 for shapes"),
    ({"num_classes": 10}, r"data.num_classes is 0 for shapes .*got 10"),
    ({"num_levels": 1}, r"data.num_levels must be an integer between 2 and 256, got 1"),
    ({"held_out": 5}, r"data.held_out must be an integer between 0 and 4.*got 5"),
    ({"held_out": -1}, r"data.held_out must be an integer between 0 and 4"),
    ({"per_combination": 0}, r"data.per_combination must be an integer >= 1, got 0"),
    ({"jitter": 2}, r"data.jitter must be an integer between 0 and 1 .*image_size=32.*got 2"),
    ({"val_fraction": 1.5}, r"data.val_fraction=1.5"),
    ({"batch_size": 0}, r"data.batch_size must be an integer >= 1"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(UserError, match=match):
        ShapesDataModule(**kwargs)


@pytest.mark.parametrize("attrs, match", [
    ({"size": "large", "colour": "rde", "shape": "circle", "position": "centre"},
     r"colour='rde': expected one of red, green, blue, yellow\. Did you mean 'red'"),
    ({"size": "large", "colour": "red", "position": "centre"}, r"lack 'shape'"),
    ({"size": "large", "colour": "red", "shape": "circle", "position": "centre", "x": 1},
     r"unknown shape attribute\(s\) x"),
])
def test_bad_attributes_are_refused(attrs, match):
    with pytest.raises(UserError, match=match):
        render(attrs)
    with pytest.raises(UserError, match=match):
        caption_of(attrs)


def test_registered_and_configured():
    from omegaconf import OmegaConf

    from genframe.config import conf_dir
    from genframe.plugins import get_registry

    assert get_registry().data_module("shapes").load() is ShapesDataModule
    node = OmegaConf.to_container(OmegaConf.load(conf_dir() / "data" / "shapes.yaml"))
    assert node.pop("name") == "shapes"
    dm = ShapesDataModule(**node)
    assert (dm.image_size, dm.held_out, dm.per_combination) == (32, 2, 16)
