"""ImageFolderDataModule on tiny images the tests draw themselves (no shipped data)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from genframe.data.image_folder import ImageFolderDataModule
from genframe.errors import UserError


def save(path, size=(10, 6), color=(255, 0, 0), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def noise(path, size=(12, 9), mode="RGB", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def all_items(dm):
    """Every item of the three splits."""
    dm.setup("fit")
    return [s[i] for s in (dm.train_set, dm.val_set, dm.test_set) for i in range(len(s))]


def all_images(dm):
    return torch.stack([item["image"] for item in all_items(dm)])


def test_rgb_sizes_resized_cropped_and_scaled(tmp_path):
    save(tmp_path / "white.png", size=(20, 7), color=(255, 255, 255))
    save(tmp_path / "black.jpg", size=(5, 13), color=(0, 0, 0))
    noise(tmp_path / "noise.bmp", size=(40, 30))
    noise(tmp_path / "small.webp", size=(3, 3), seed=1)  # upscaled
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, channels=3)
    assert dm.provides == frozenset({"image"}) and dm.class_names == []
    x = all_images(dm)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert dm.train_set.images.dtype == torch.uint8  # the cache stays compact
    # Pure white and pure black land exactly on the ends of [-1, 1].
    per_image = x.flatten(1)
    assert any(bool((row == 1).all()) for row in per_image)
    assert any(bool((row == -1).all()) for row in per_image)


def test_grey_channels_and_grey_from_rgb(tmp_path):
    save(tmp_path / "a.png", size=(9, 17), color=255, mode="L")
    save(tmp_path / "b.png", size=(30, 11), color=(0, 0, 0))  # RGB -> grey
    save(tmp_path / "c.tif", size=(6, 6), color=(255, 255, 255, 0), mode="RGBA")  # transparent
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=5, channels=1)
    x = all_images(dm)
    assert x.shape == (3, 1, 5, 5)
    assert sorted(float(v) for v in x.flatten(1).mean(1)) == [-1.0, 1.0, 1.0]


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    a = np.full((6, 6), 32896, dtype=np.uint16)  # mid grey in 16 bits -> 128 in 8 bits
    Image.fromarray(a).save(tmp_path / "mid.png")
    save(tmp_path / "b.png", size=(6, 6), color=0, mode="L")
    save(tmp_path / "c.png", size=(6, 6), color=0, mode="L")
    x = all_images(ImageFolderDataModule(root=str(tmp_path), image_size=4, channels=1))
    means = sorted(round(float(v), 3) for v in x.flatten(1).mean(1))
    assert means == [-1.0, -1.0, round(128 / 127.5 - 1, 3)]


def test_subfolders_become_sorted_labels(tmp_path):
    for cls, color in (("zebra", (0, 0, 0)), ("ant", (255, 255, 255)), ("mole", (255, 0, 0))):
        for i in range(2):
            save(tmp_path / cls / f"{i}.png", color=color)
    save(tmp_path / "ant" / "deeper" / "x.png", color=(255, 255, 255))  # still class "ant"
    (tmp_path / "empty").mkdir()  # holds no image: not a class
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=4, num_classes=0)
    assert dm.provides == frozenset({"image", "label"})
    assert dm.class_names == ["ant", "mole", "zebra"] and dm.num_classes == 3
    dm.setup()
    items = all_items(dm)
    assert len(items) == 7
    for item in items:
        # ant is white, zebra black: the label follows the folder.
        expected = {0: 1.0, 2: -1.0}.get(int(item["label"]))
        if expected is not None:
            assert float(item["image"].mean()) == expected
    assert sorted(int(i["label"]) for i in items) == [0, 0, 0, 1, 1, 2, 2]


def test_flat_or_mixed_folders_have_no_labels(tmp_path):
    for name in ("a", "b", "c"):
        save(tmp_path / f"{name}.png")
    assert ImageFolderDataModule(root=str(tmp_path)).provides == frozenset({"image"})
    save(tmp_path / "cats" / "c.png")
    save(tmp_path / "dogs" / "d.png")
    dm = ImageFolderDataModule(root=str(tmp_path))  # some images lie directly in root
    assert dm.provides == frozenset({"image"}) and dm._file_labels is None
    with pytest.raises(UserError, match="data.labels"):
        ImageFolderDataModule(root=str(tmp_path), labels=True)


def test_label_switches(tmp_path):
    for name in ("a", "b", "c"):
        save(tmp_path / "only" / f"{name}.png")
    # One sub-folder: auto says no labels, true forces one class.
    assert ImageFolderDataModule(root=str(tmp_path), labels="auto").provides == {"image"}
    forced = ImageFolderDataModule(root=str(tmp_path), labels="true")
    assert forced.provides == {"image", "label"} and forced.num_classes == 1
    save(tmp_path / "other" / "c.png")
    assert ImageFolderDataModule(root=str(tmp_path), labels=False).provides == {"image"}
    with pytest.raises(UserError, match="data.labels"):
        ImageFolderDataModule(root=str(tmp_path), labels="maybe")


def test_num_classes_mismatch(tmp_path):
    for cls in ("a", "b"):
        save(tmp_path / cls / "x.png")
        save(tmp_path / cls / "y.png")
    ImageFolderDataModule(root=str(tmp_path), num_classes=2)
    with pytest.raises(UserError, match="data.num_classes=3") as err:
        ImageFolderDataModule(root=str(tmp_path), num_classes=3)
    assert "2 class sub-folders" in str(err.value)


def test_corrupt_and_empty_files_are_skipped_and_reported(tmp_path, caplog):
    for i in range(3):
        save(tmp_path / f"ok{i}.png")
    (tmp_path / "broken.png").write_bytes(os.urandom(200))
    (tmp_path / "empty.JPG").write_bytes(b"")
    good = noise(tmp_path / "big.png", size=(64, 64)).read_bytes()
    (tmp_path / "big.png").unlink()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])  # truncated
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=4)
    with caplog.at_level(logging.WARNING, logger="genframe"):
        dm.setup()
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 3
    assert sorted(p.name for p, _ in dm.skipped) == ["broken.png", "cut.png", "empty.JPG"]
    assert all(reason for _, reason in dm.skipped)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0]
    assert "skipped 3 of 6 files" in msg and str(tmp_path) in msg
    assert "broken.png (cannot identify image file)" in msg and "empty.JPG" in msg
    # setup is idempotent: no second decode, no second warning.
    caplog.clear()
    train = dm.train_set
    dm.setup()
    assert dm.train_set is train and not caplog.records


def test_warning_lists_at_most_five_names(tmp_path, caplog):
    for i in range(7):
        (tmp_path / f"bad{i}.png").write_bytes(b"not an image")
    for name in ("a", "b", "c"):
        save(tmp_path / f"{name}.png")
    with caplog.at_level(logging.WARNING, logger="genframe"):
        ImageFolderDataModule(root=str(tmp_path)).setup()
    msg = caplog.records[-1].getMessage()
    assert msg.count("bad") == 5 and "and 2 more" in msg


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no_images", "all_corrupt", "one"])
def test_bad_roots_name_data_root(tmp_path, case):
    root = tmp_path / "data"
    if case == "file":
        save(root.with_suffix(".png"))
        root = root.with_suffix(".png")
    elif case == "empty":
        root.mkdir()
    elif case == "no_images":
        root.mkdir()
        (root / "notes.txt").write_text("hello")
        (root / "table.csv").write_text("a,b")
    elif case == "all_corrupt":
        root.mkdir()
        for i in range(3):
            (root / f"{i}.png").write_bytes(os.urandom(64))
    elif case == "one":
        save(root / "a.png")
    with pytest.raises(UserError, match="data.root") as err:
        ImageFolderDataModule(root=str(root)).setup()
    assert str(root) in str(err.value)
    if case in ("empty", "no_images"):
        assert ".png" in str(err.value) and ".tiff" in str(err.value)


def test_bad_settings_raise(tmp_path):
    save(tmp_path / "a.png")
    save(tmp_path / "b.png")
    with pytest.raises(UserError, match="data.channels"):
        ImageFolderDataModule(root=str(tmp_path), channels=4)
    with pytest.raises(UserError, match="data.image_size"):
        ImageFolderDataModule(root=str(tmp_path), image_size=2)


def test_tilde_root(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("a", "b", "c"):
        save(tmp_path / "pics" / f"{name}.png")
    dm = ImageFolderDataModule(root="~/pics")
    assert dm.root == tmp_path / "pics"


def test_num_levels_snaps_to_grid(tmp_path):
    noise(tmp_path / "a.png", mode="L")
    noise(tmp_path / "b.png", mode="L", seed=1)
    noise(tmp_path / "c.png", mode="L", seed=2)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=4, channels=1, num_levels=5)
    x = all_images(dm)
    assert set(torch.unique(x).tolist()) <= {-1.0, -0.5, 0.0, 0.5, 1.0}


def test_train_dataloader_batch(tmp_path):
    for cls in ("a", "b"):
        for i in range(5):
            noise(tmp_path / cls / f"{i}.jpeg", size=(16, 10), seed=i)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, batch_size=4, val_fraction=0.2)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label"}
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (4, 3, 8, 8)
    assert batch["label"].dtype == torch.long and batch["label"].shape == (4,)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (7, 2, 1)
    val = next(iter(dm.val_dataloader()))
    assert set(val) == {"image", "label"}


def test_config_keys_match_constructor():
    """The YAML's keys are exactly the constructor's arguments (plus the registry name)."""
    import inspect

    from omegaconf import OmegaConf

    from genframe.config import conf_dir

    keys = set(OmegaConf.load(conf_dir() / "data" / "image_folder.yaml")) - {"name"}
    params = set(inspect.signature(ImageFolderDataModule).parameters)
    assert keys == params


def test_exif_rotation_is_applied(tmp_path):
    a = np.zeros((4, 8), dtype=np.uint8)
    a[:, :4] = 255  # left half white, as stored
    im = Image.fromarray(a, mode="L")
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    im.save(tmp_path / "rotated.png", exif=exif)
    save(tmp_path / "other.png", size=(4, 4), color=0, mode="L")
    save(tmp_path / "third.png", size=(4, 4), color=0, mode="L")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=4, channels=1)
    dm.setup()
    x = all_images(dm)
    rotated = next(img[0] for img in x if img.max() == 1)  # (4, 4)
    # Displayed upright the white half is on top, so rows differ, not columns.
    assert bool((rotated[0] == 1).all()) and bool((rotated[-1] == -1).all())


# ------------------------------------------------------------------ lazy reading


def _folder(root, n=12, classes=("a", "b")):
    for i in range(n):
        noise(root / classes[i % len(classes)] / f"{i:02d}.png", size=(10, 14), seed=i)
    return root


def test_cache_auto_decides_by_size(tmp_path, monkeypatch):
    import genframe.data.image_folder as image_folder

    _folder(tmp_path)
    assert ImageFolderDataModule(root=str(tmp_path)).cached  # small: decoded at set-up
    monkeypatch.setattr(image_folder, "AUTO_CACHE_FILES", 5)
    assert not ImageFolderDataModule(root=str(tmp_path)).cached
    assert ImageFolderDataModule(root=str(tmp_path), cache=True).cached
    with pytest.raises(UserError, match="data.cache"):
        ImageFolderDataModule(root=str(tmp_path), cache="sometimes")


def test_lazy_reading_serves_what_the_cache_serves(tmp_path):
    from genframe.data.image_folder import LazyImages

    _folder(tmp_path)
    kw = dict(root=str(tmp_path), image_size=6, num_levels=17, val_fraction=0.2)
    eager, lazy = ImageFolderDataModule(**kw, cache=True), ImageFolderDataModule(**kw, cache=False)
    eager.setup()
    lazy.setup()
    assert isinstance(lazy.train_set, LazyImages) and not hasattr(lazy.train_set, "images")
    for split in ("train", "val", "test"):
        a, b = getattr(eager, f"{split}_set"), getattr(lazy, f"{split}_set")
        assert len(a) == len(b)
        for i in range(len(a)):
            assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["label"] == b[i]["label"]
    batch = next(iter(lazy.train_dataloader()))
    assert batch["image"].shape == (9, 3, 6, 6) and batch["label"].dtype == torch.long


def test_lazy_unreadable_file_is_replaced_warned_and_counted(tmp_path, caplog):
    _folder(tmp_path, n=10, classes=("x",))
    (tmp_path / "x" / "03.png").write_bytes(b"not a png")  # listed, fails when read
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=4, cache=False,
                               test_fraction=0, val_fraction=0.1, batch_size=3, num_workers=2)
    dm.setup()
    with caplog.at_level(logging.WARNING, logger="genframe"):
        for _ in range(2):  # two epochs through persistent workers: no crash, full batches
            sizes = [len(b["image"]) for b in dm.train_dataloader()]
            assert sum(sizes) == len(dm.train_set) == 9
        assert dm.report_unreadable() == 1
    assert [p.name for p, _ in dm.skipped] == ["03.png"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 of 10 files" in m and "03.png" in m for m in messages)
    caplog.clear()
    dm.teardown("fit")  # reported once, not again
    assert not caplog.records


def test_lazy_setup_refuses_a_folder_nothing_can_read(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(os.urandom(50))
    with pytest.raises(UserError, match=r"data.root: none of the 4 image files") as err:
        ImageFolderDataModule(root=str(tmp_path), cache=False).setup()
    assert str(tmp_path) in str(err.value)
