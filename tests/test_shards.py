"""`genframe shards` and the streaming presets data=image_shards / data=text_shards, on
tiny images and text the tests make (no network)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from genframe.data.shards import (
    INDEX,
    ImageShardsDataModule,
    ShardStream,
    TextShardsDataModule,
    rank_part,
    worker_quotas,
)
from genframe.errors import UserError
from genframe.tasks.shards import convert
from tests.conftest import FAST, FAST_TRAINING

TINY_GPT = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.warmup_steps=1"]


def make_images(root, n=40, size=(12, 10)):
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / ("cats" if i % 2 else "dogs") / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return root


@pytest.fixture
def image_shards(tmp_path):
    root = make_images(tmp_path / "images")
    (root / "cats" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "image-shards"
    result = convert(["data=image_folder", f"data.root={root}", "data.image_size=8",
                      f"out={out}", "shard_size=4"])
    assert result["kind"] == "image" and result["skipped"] == 1
    return out


@pytest.fixture
def text_shards(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"{i}.txt").write_text(f"Document {i}. " + "the quick brown fox jumps. " * 60)
    out = tmp_path / "text-shards"
    convert(["data=text", "data.source=files", f"data.path={docs}", f"out={out}",
             "shard_size=2", "chunk_tokens=128"])
    return out


# ------------------------------------------------------------------ the per-rank split


@pytest.mark.parametrize("n, world", [(10, 2), (7, 2), (9, 3), (1, 1)])
def test_rank_parts_are_disjoint_and_cover_the_shards(n, world):
    parts = [rank_part(range(n), r, world) for r in range(world)]
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n)) and len(flat) == len(set(flat))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        rank_part(range(n), world, world)


def test_worker_quotas_fill_whole_batches():
    assert worker_quotas([10, 3, 7], batches=3, batch_size=3) == [6, 3, 0] or \
        sum(worker_quotas([10, 3, 7], 3, 3)) == 9
    quotas = worker_quotas([10, 3, 7], batches=5, batch_size=3)
    assert sum(quotas) == 15 and all(q % 3 == 0 and q <= c for q, c in zip(quotas, [10, 3, 7]))
    with pytest.raises(ValueError):
        worker_quotas([2, 2], batches=1, batch_size=3)


def test_two_ranks_read_disjoint_parts_and_the_same_number_of_batches(image_shards):
    dm = ImageShardsDataModule(path=str(image_shards), image_size=8, batch_size=4)
    dm.setup()
    stream = dm.train_set
    keys = {}
    for rank in (0, 1):
        stream.set_rank(rank, 2, 0)
        keys[rank] = set(rank_part(stream.shards, rank, 2))
        assert len(list(stream)) == len(stream) == stream.batches() * 4
    assert not keys[0] & keys[1] and keys[0] | keys[1] == set(stream.shards)
    # Validation: every image of a rank's part, in order; the ranks together hold them all.
    val = dm.val_set
    sizes = []
    for rank in (0, 1):
        val.set_rank(rank, 2, 0)
        sizes.append(len(list(val)))
    assert sum(sizes) == sum(dm._counts("val"))


def test_workers_split_a_rank_part_and_epochs_reshuffle(image_shards):
    dm = ImageShardsDataModule(path=str(image_shards), image_size=8, batch_size=4,
                               num_workers=2, shuffle_buffer=8)
    dm.setup()
    loader = dm.train_dataloader()
    epochs = [torch.cat([b["image"] for b in loader]) for _ in range(2)]
    assert len(epochs[0]) == len(epochs[1]) == len(dm.train_set) == len(loader) * 4
    # Another order (shuffled shards and buffer, per epoch) of nearly the same images:
    # the few that do not fill a whole batch of a worker are left out, others each epoch.
    assert not torch.equal(epochs[0], epochs[1])
    seen = [{round(float(v), 3) for v in e.flatten(1).sum(1)} for e in epochs]
    assert len(seen[0] & seen[1]) >= len(epochs[0]) - 4


def test_image_shards_round_trip_labels_and_index(image_shards):
    index = json.loads((image_shards / INDEX).read_text())
    assert index["kind"] == "image" and index["image"]["class_names"] == ["cats", "dogs"]
    assert sum(e["count"] for e in index["splits"].values()) == 40 and index["skipped"] == 1
    dm = ImageShardsDataModule(path=str(image_shards), image_size=8, batch_size=64)
    assert dm.provides == {"image", "label"} and dm.num_classes == 2
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape[1:] == (3, 8, 8) and batch["image"].min() >= -1
    assert set(batch["label"].tolist()) <= {0, 1}


# ------------------------------------------------------------------ refusals


def test_bad_shard_folders_are_refused(tmp_path, image_shards, text_shards):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="is empty"):
        ImageShardsDataModule(path=str(empty))
    no_index = tmp_path / "no-index"
    shutil.copytree(image_shards, no_index)
    (no_index / INDEX).unlink()
    with pytest.raises(UserError, match=f"but no {INDEX}.*did not finish"):
        ImageShardsDataModule(path=str(no_index), image_size=8)
    with pytest.raises(UserError, match="hold image data.*data=text_shards reads text"):
        TextShardsDataModule(path=str(image_shards))
    with pytest.raises(UserError, match="hold text data"):
        ImageShardsDataModule(path=str(text_shards))
    with pytest.raises(UserError, match=r"data.image_size=16, but .* hold 8x8 images"):
        ImageShardsDataModule(path=str(image_shards), image_size=16)
    cut = tmp_path / "cut"
    shutil.copytree(image_shards, cut)
    tar = cut / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    with pytest.raises(UserError, match="cut short"):
        ImageShardsDataModule(path=str(cut), image_size=8)
    with pytest.raises(UserError, match="block_size=200.*chunks of 128"):
        TextShardsDataModule(path=str(text_shards), block_size=200)


def test_convert_refuses_bad_arguments_and_a_used_folder(tmp_path, image_shards):
    root = make_images(tmp_path / "few", n=6)
    with pytest.raises(UserError, match="out=DIR"):
        convert(["data=image_folder", f"data.root={root}"])
    with pytest.raises(UserError, match="give the data"):
        convert([f"out={tmp_path / 'x'}"])
    with pytest.raises(UserError, match="unknown key 'shard_sise'"):
        convert(["data=image_folder", f"out={tmp_path / 'x'}", "shard_sise=3"])
    with pytest.raises(UserError, match="earlier conversion.*overwrite=true"):
        convert(["data=image_folder", f"data.root={root}", f"out={image_shards}"])
    result = convert(["data=image_folder", f"data.root={root}", f"out={image_shards}",
                      "overwrite=true", "data.image_size=8"])
    assert sum(result["counts"].values()) == 6
    with pytest.raises(UserError, match="provides caption, image; genframe shards converts"):
        for image in root.rglob("*.png"):
            image.with_suffix(".txt").write_text("a pet")
        convert(["data=captioned_folder", f"data.root={root}", f"out={tmp_path / 'c'}"])


def test_text_shards_stream_windows_with_the_saved_tokenizer(text_shards):
    from genframe.text.tokenize import build_tokenizer

    dm = TextShardsDataModule(path=str(text_shards), block_size=16, batch_size=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["tokens"].shape == (4, 17) and batch["tokens"].dtype == torch.long
    assert int(batch["tokens"].max()) < dm.vocab_size
    with pytest.raises(UserError, match="another tokenizer"):
        dm.use_tokenizer(build_tokenizer("char", ["xyz"]))


# ------------------------------------------------------------------ through the CLI


def test_cli_refuses_an_image_size_the_shards_do_not_hold(cli, image_shards):
    bad = cli("train", "data=image_shards", f"data.path={image_shards}", "data.image_size=16")
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "data.image_size=16, but the shards" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_cli_trains_a_vae_on_image_shards(cli, image_shards):
    ok = cli("train", "data=image_shards", f"data.path={image_shards}", "data.image_size=8",
             "data.batch_size=4", "data.num_workers=2", "model=vae", *FAST)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "run directory:" in ok.stdout


@pytest.mark.slow
def test_cli_converts_text_and_trains_a_transformer(cli, tmp_path):
    docs = tmp_path / "corpus.txt"
    docs.write_text("A small corpus for a tiny model. " * 400)
    out = tmp_path / "ts"
    made = cli("shards", "data=text", "data.source=files", f"data.path={docs}", f"out={out}",
               "shard_size=2", "chunk_tokens=256")
    assert made.returncode == 0, made.stderr[-3000:]
    assert "data=text_shards" in made.stdout
    run = cli("train", "data=text_shards", f"data.path={out}", "data.block_size=16",
              "model=transformer", *TINY_GPT, *FAST_TRAINING)
    assert run.returncode == 0, run.stderr[-3000:]
    wrong = cli("train", "data=image_shards", f"data.path={out}")
    assert wrong.returncode == 2 and "hold text data" in wrong.stderr
