"""The alignment metric reads colour, shape, size and position back from shape images."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from genframe.data.shapes import ATTRIBUTES, ShapesDataModule, caption_of, render
from genframe.errors import UserError
from genframe.metrics.alignment import ASPECTS, alignment_scores, read_attributes

COMBOS = [dict(zip(ATTRIBUTES, v)) for v in itertools.product(*ATTRIBUTES.values())]
KEYS = {"alignment", "alignment_no_shape", "alignment_unread_prompts",
        *(f"alignment_{a}" for a in ASPECTS)}


def _unit(images: torch.Tensor) -> torch.Tensor:
    return (images + 1) / 2  # data's [-1, 1] -> the [0, 1] of Samples.images


@pytest.mark.parametrize("image_size, jitter", [(24, 0), (32, 1), (64, 2)])
def test_the_datas_own_images_read_right_in_every_split(image_size, jitter):
    dm = ShapesDataModule(image_size=image_size, jitter=jitter, per_combination=3, held_out=4)
    dm.setup("fit")
    for split in ("train", "val", "test"):
        columns = dm.dataset(split).columns
        scores = alignment_scores(_unit(columns["image"]), columns["caption"])
        assert set(scores) == KEYS
        assert scores["alignment"] >= 0.99, (image_size, split, scores)
        assert scores["alignment_no_shape"] == 0 and scores["alignment_unread_prompts"] == 0


def test_mild_noise_does_not_change_the_reading():
    images = torch.stack([render(a, 32) for a in COMBOS])
    noisy = (images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0)))
    scores = alignment_scores(noisy.clamp(0, 1), [caption_of(a) for a in COMBOS])
    assert scores["alignment"] >= 0.99, scores


@pytest.mark.parametrize("aspect", ["colour", "shape", "size", "position"])
def test_a_wrong_attribute_is_scored_wrong_on_that_attribute_only(aspect):
    images, prompts = [], []
    for attrs in COMBOS:
        for other in ATTRIBUTES[aspect]:
            if other != attrs[aspect]:
                images.append(render({**attrs, aspect: other}, 32))
                prompts.append(caption_of(attrs))
    scores = alignment_scores(torch.stack(images), prompts)
    assert scores["alignment"] == 0 and scores[f"alignment_{aspect}"] == 0, scores
    for other in set(ASPECTS) - {aspect}:
        assert scores[f"alignment_{other}"] >= 0.99, (other, scores)


def test_read_attributes_of_one_image():
    attrs = {"size": "small", "colour": "yellow", "shape": "triangle", "position": "top right"}
    assert read_attributes(render(attrs, 32)) == {k: attrs[k] for k in ASPECTS}
    assert read_attributes(torch.zeros(3, 32, 32)) is None


@pytest.mark.parametrize("kind", ["black", "uniform", "grey_noise", "white"])
def test_images_without_a_shape_score_low(kind):
    gen = torch.Generator().manual_seed(0)
    n = len(COMBOS)
    images = {
        "black": torch.zeros(n, 3, 32, 32),
        "uniform": torch.rand(n, 3, 32, 32, generator=gen),
        "grey_noise": (0.5 + 0.2 * torch.randn(n, 3, 32, 32, generator=gen)).clamp(0, 1),
        "white": torch.ones(n, 3, 32, 32),
    }[kind]
    scores = alignment_scores(images, [caption_of(a) for a in COMBOS])
    assert scores["alignment"] <= 0.02, scores
    assert scores["alignment_no_shape"] >= 0.9, scores


def test_unreadable_prompts_are_counted_and_left_out(caplog):
    attrs = COMBOS[7]
    images = torch.stack([render(attrs, 32)] * 4)
    prompts = [caption_of(attrs), "a photo of a cat", caption_of(attrs), ""]
    with caplog.at_level(logging.WARNING, logger="genframe"):
        scores = alignment_scores(images, prompts)
    assert scores["alignment_unread_prompts"] == 2 and scores["alignment"] == 1
    assert "2 of 4 prompts are not shapes captions" in caplog.text
    with pytest.raises(UserError, match=r"none of the 2 prompts is a shapes caption"):
        alignment_scores(images[:2], ["a cat", "a dog"])


@pytest.mark.parametrize("images, prompts, match", [
    (torch.zeros(2, 1, 32, 32), ["a"] * 2, r"\(N, 3, H, W\).*got \(2, 1, 32, 32\)"),
    (torch.zeros(3, 32, 32), ["a"], r"\(N, 3, H, W\).*got \(3, 32, 32\)"),
    (torch.zeros(2, 3, 32, 16), ["a"] * 2, r"H == W"),
    (torch.zeros(2, 3, 16, 16), ["a"] * 2, r"at least 24 pixels wide.*got 16"),
    (torch.zeros(2, 3, 32, 32), ["a"] * 3, r"one prompt per image \(2\), got 3"),
    (torch.zeros(2, 3, 32, 32), "a large red circle at the top left", r"one prompt per image"),
    ([[0.0]], ["a"], r"got list"),
])
def test_bad_arguments_are_refused(images, prompts, match):
    with pytest.raises(UserError, match=match):
        alignment_scores(images, prompts)
