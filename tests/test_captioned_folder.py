"""data=captioned_folder: image + caption pairs from captions.jsonl or .txt files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from genframe.data.captioned_folder import CaptionedFolderDataModule
from genframe.errors import UserError

from .conftest import FAST_TRAINING


def png(path: Path, value: int = 128, size: int = 6) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, 255 - value, value // 2)).save(path)
    return path


def jsonl(root: Path, rows: list, bom: bool = False) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (root / "captions.jsonl").write_bytes(("\ufeff" * bom + text).encode("utf-8"))


def make(root: Path, **kw) -> CaptionedFolderDataModule:
    args = {"root": str(root), "image_size": 4, "batch_size": 4, "val_fraction": 0.2,
            "test_fraction": 0.2, **kw}
    return CaptionedFolderDataModule(**args)


def all_pairs(dm: CaptionedFolderDataModule) -> dict[str, list[str]]:
    dm.setup("fit")
    return {s: list(getattr(dm, f"{s}_set").captions) for s in ("train", "val", "test")
            if getattr(dm, f"{s}_set") is not None}


def test_jsonl_captions_with_bom_and_line_separator(tmp_path):
    for i in range(5):
        png(tmp_path / "sub" / f"{i}.png", value=40 * i)
    rows = [{"file": f"sub/{i}.png", "caption": f"picture {i}"} for i in range(4)]
    rows.append({"file": "sub/4.png", "caption": "first\u2028second"})
    jsonl(tmp_path, rows, bom=True)
    dm = make(tmp_path)
    assert dm.caption_source == "jsonl"
    assert dm.provides == {"image", "caption"}
    assert sorted(dm.captions) == sorted([f"picture {i}" for i in range(4)] + ["first\u2028second"])
    assert dm.missing_captions == [] and dm.missing_images == []
    got = all_pairs(dm)
    assert sum(map(len, got.values())) == 5
    assert "first\u2028second" in sum(got.values(), [])


def test_txt_captions_beside_images(tmp_path):
    for i in range(5):
        png(tmp_path / f"a{i}.png", value=50 * i)
        (tmp_path / f"a{i}.txt").write_text(f"caption {i}\n", encoding="utf-8")
    dm = make(tmp_path)
    assert dm.caption_source == "txt"
    assert sorted(dm.captions) == [f"caption {i}" for i in range(5)]


def test_pairs_stay_together(tmp_path):
    # Each image's colour encodes its index; the caption must name the same index.
    for i in range(6):
        png(tmp_path / f"{i}.png", value=40 * i)
        (tmp_path / f"{i}.txt").write_text(str(i), encoding="utf-8")
    dm = make(tmp_path)
    dm.setup("fit")
    for split in ("train", "val", "test"):
        ds = dm.dataset(split)
        for j in range(len(ds)):
            item = ds[j]
            red = round((item["image"][0, 0, 0].item() + 1) * 127.5)
            assert red == 40 * int(item["caption"])


def test_missing_captions_and_images_are_skipped_and_counted(tmp_path, caplog):
    for i in range(6):
        png(tmp_path / f"{i}.png", value=30 * i)
    rows = [{"file": f"{i}.png", "caption": f"c{i}"} for i in range(4)]
    rows += [{"file": "5.png", "caption": "   "},          # empty: counts as missing
             {"file": "gone.png", "caption": "no image"},
             {"file": "deep/gone2.png", "caption": "no image either"}]
    jsonl(tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="genframe"):
        dm = make(tmp_path, test_fraction=0)
    assert [p.name for p in dm.missing_captions] == ["4.png", "5.png"]
    assert dm.missing_images == ["gone.png", "deep/gone2.png"]
    assert len(dm.files) == len(dm.captions) == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipped 2 images without a caption" in w and "4.png" in w for w in warnings)
    assert any("skipped 2 captions" in w and "gone.png" in w for w in warnings)


def test_txt_missing_both_ways(tmp_path, caplog):
    for i in range(4):
        png(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"c{i}", encoding="utf-8")
    png(tmp_path / "bare.png")
    png(tmp_path / "blank.png")
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "orphan.txt").write_text("lonely", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="genframe"):
        dm = make(tmp_path, test_fraction=0)
    assert sorted(p.name for p in dm.missing_captions) == ["bare.png", "blank.png"]
    assert dm.missing_images == ["orphan.txt"]
    assert sum("orphan.txt" in r.getMessage() for r in caplog.records) == 1


def test_batches(tmp_path):
    for i in range(10):
        png(tmp_path / f"{i}.png", value=25 * i, size=8)
        (tmp_path / f"{i}.txt").write_text(f"image number {i}", encoding="utf-8")
    dm = make(tmp_path, batch_size=3, test_fraction=0.1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "caption"}
    assert batch["image"].shape == (3, 3, 4, 4) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["image"].min() < 0 < batch["image"].max()
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 3
    assert all(c.startswith("image number ") for c in batch["caption"])
    grey = make(tmp_path, channels=1, image_size=5)
    grey.setup("fit")
    assert grey.dataset("val")[0]["image"].shape == (1, 5, 5)


def test_splits_are_seeded(tmp_path):
    for i in range(20):
        png(tmp_path / f"{i:02d}.png", value=10 * i)
        (tmp_path / f"{i:02d}.txt").write_text(f"c{i}", encoding="utf-8")
    a, b, c = (all_pairs(make(tmp_path, seed=s)) for s in (0, 0, 1))
    assert a == b
    assert a != c
    assert [len(a[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert not set(a["train"]) & (set(a["val"]) | set(a["test"]))


def test_unreadable_image_is_skipped(tmp_path, caplog):
    for i in range(4):
        png(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"c{i}", encoding="utf-8")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "bad.txt").write_text("broken", encoding="utf-8")
    dm = make(tmp_path, test_fraction=0)
    with caplog.at_level(logging.WARNING, logger="genframe"):
        got = all_pairs(dm)
    assert [p.name for p, _ in dm.skipped] == ["bad.png"]
    assert "broken" not in sum(got.values(), [])
    assert any("unreadable" in r.getMessage() and "bad.png" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("kw, match", [
    ({"captions": "csv"}, "data.captions must be one of auto, jsonl, txt, got 'csv'"),
    ({"captions": "jsonl"}, "data.captions=jsonl.*no captions.jsonl"),
    ({"num_classes": 3}, "data.num_classes is 0"),
    ({"channels": 2}, "data.channels must be 1"),
    ({"image_size": 2}, "data.image_size must be at least 4"),
    ({"val_fraction": 1.5}, "data.val_fraction"),
    ({"batch_size": 0}, "data.batch_size"),
    ({"image_size": "big"}, "data.image_size must be an integer"),
])
def test_bad_arguments(tmp_path, kw, match):
    for i in range(5):
        png(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match=match):
        make(tmp_path, **kw)


def test_missing_root_and_nothing_usable(tmp_path):
    with pytest.raises(UserError, match="data.root.*does not exist"):
        make(tmp_path / "nope")
    for i in range(3):
        png(tmp_path / f"{i}.png")
    jsonl(tmp_path, [{"file": "other.png", "caption": "x"}])
    with pytest.raises(UserError, match=r"data.root: none of the 3 images .* non-empty "
                                        r"caption; 1 caption named .*other.png"):
        make(tmp_path)


@pytest.mark.parametrize("row, match", [
    ([1, 2], "line 1: expected a JSON object"),
    ({"file": "0.png"}, "line 1: field 'caption' must be a string"),
    ({"file": 3, "caption": "x"}, "line 1: field 'file' must be a string"),
])
def test_bad_jsonl_rows(tmp_path, row, match):
    for i in range(3):
        png(tmp_path / f"{i}.png")
    jsonl(tmp_path, [row])
    with pytest.raises(UserError, match=match):
        make(tmp_path)


def test_bad_jsonl_json_and_duplicates(tmp_path):
    for i in range(3):
        png(tmp_path / f"{i}.png")
    (tmp_path / "captions.jsonl").write_text('{"file": "0.png", "caption": "a"}\n{oops\n')
    with pytest.raises(UserError, match="line 2: not valid JSON"):
        make(tmp_path)
    jsonl(tmp_path, [{"file": "0.png", "caption": "a"}, {"file": "./0.png", "caption": "b"}])
    with pytest.raises(UserError, match="line 2: '\\./0.png' already has a caption"):
        make(tmp_path)


def test_config_keys_are_constructor_arguments():
    import inspect

    from omegaconf import OmegaConf

    conf = Path(__file__).parents[1] / "conf" / "data" / "captioned_folder.yaml"
    keys = set(OmegaConf.load(conf)) - {"name"}
    params = set(inspect.signature(CaptionedFolderDataModule).parameters)
    assert keys == params


def test_cli_train_fast_dev_run(tmp_path):
    from genframe.cli import main

    root = tmp_path / "data"
    for i in range(8):
        png(root / f"{i}.png", value=30 * i, size=8)
    jsonl(root, [{"file": f"{i}.png", "caption": f"a picture {i}"} for i in range(8)])
    code = main(["train", "data=captioned_folder", f"data.root={root}", "data.image_size=8",
                 "data.batch_size=4", "model=diffusion", "model.block_out_channels=[8,16]",
                 "model.blocks_per_level=1", "model.num_heads=1", "debug=fdr",
                 *FAST_TRAINING, f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 0


def test_cli_missing_root_is_a_user_error(tmp_path, capsys):
    from genframe.cli import main

    code = main(["train", "data=captioned_folder", f"data.root={tmp_path / 'nope'}",
                 "model=diffusion", "debug=fdr", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "data.root" in err and "does not exist" in err and "Traceback" not in err


def test_lazy_reading_serves_what_the_cache_serves(tmp_path):
    import numpy as np
    from PIL import Image

    from genframe.data.captioned_folder import CaptionedFolderDataModule

    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"picture number {i}")
    (tmp_path / "bad.png").write_bytes(b"junk")
    (tmp_path / "bad.txt").write_text("a broken picture")
    kw = dict(root=str(tmp_path), image_size=6, val_fraction=0.2, test_fraction=0.2)
    eager = CaptionedFolderDataModule(**kw, cache=True)
    lazy = CaptionedFolderDataModule(**kw, cache=False)
    eager.setup()
    lazy.setup()
    assert lazy.tokenizer is not None and lazy.vocab_size
    served = {}
    for name, dm in (("eager", eager), ("lazy", lazy)):
        items = [s[i] for s in (dm.train_set, dm.val_set, dm.test_set) for i in range(len(s))]
        served[name] = {it["caption"]: it["image"] for it in items}
    # The broken file is skipped at set-up by the cache, replaced (with its caption) lazily.
    assert set(served["eager"]) == {f"picture number {i}" for i in range(10)}
    assert set(served["lazy"]) == set(served["eager"])
    for caption, image in served["lazy"].items():
        assert torch.equal(image, served["eager"][caption])
    assert lazy.report_unreadable() == 1
