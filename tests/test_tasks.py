"""train / generate / evaluate / finetune / resume, called as functions on composed configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, FAST_TRAINING


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short real training run shared by the tests below."""
    from genframe.config import compose
    from genframe.tasks.train import train

    out = tmp_path_factory.mktemp("train") / "run"
    cfg = compose("train", [*FAST, "trainer.max_epochs=2", f"paths.output_dir={out}"])
    return train(cfg)


def test_train_writes_a_complete_run_directory(trained):
    run = trained["run_dir"]
    for rel in ("config.yaml", "run.json", "model.safetensors", "metrics.json",
                "checkpoints/last.ckpt", "checkpoints/best.ckpt", "samples/grid.png",
                "samples/manifest.jsonl", "samples/000000.png", "logs/csv/metrics.csv"):
        assert (run / rel).exists(), rel
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed"
    assert info["model"]["name"] == "vae" and info["model"]["kwargs"]["latent_dim"] == 2
    assert "vae" in info["plugins"] and info["plugins"]["vae"]["version"]
    assert "git_revision" in info
    # last.ckpt is the state after the final epoch (not the last improvement of monitor).
    last = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == info["steps"] and last["epoch"] == info["epochs"] - 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == trained["metrics"] and torch.isfinite(torch.tensor(metrics["val/loss"]))
    manifest = [json.loads(line) for line in (run / "samples/manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 4 and manifest[0]["seed"] == 0 and manifest[0]["model"] == "vae"


def test_generate_same_seed_same_images(trained, compose_task):
    from genframe.tasks.generate import generate

    a = generate(compose_task("generate", f"run={trained['run_dir']}", "num_samples=6", "seed=3"))
    b = generate(compose_task("generate", f"run={trained['run_dir']}", "num_samples=6", "seed=3"))
    c = generate(compose_task("generate", f"run={trained['run_dir']}", "num_samples=6", "seed=4"))
    pngs = lambda r: [p.read_bytes() for p in sorted((r["run_dir"] / "samples").glob("0*.png"))]
    assert len(pngs(a)) == 6
    assert pngs(a) == pngs(b)
    assert pngs(a) != pngs(c)
    assert (a["run_dir"] / "samples" / "grid.png").exists()


def test_generate_from_checkpoint_file(trained, compose_task):
    from genframe.tasks.generate import generate

    for ckpt in ("checkpoints/last.ckpt", "model.safetensors"):
        result = generate(compose_task("generate", f"ckpt={trained['run_dir'] / ckpt}", "num_samples=2"))
        assert result["samples"][0].images.shape[0] == 2


def test_evaluate_matches_training_validation(trained, compose_task):
    from genframe.tasks.evaluate import evaluate

    result = evaluate(compose_task("evaluate", f"run={trained['run_dir']}", "split=val",
                                   "trainer.limit_val_batches=1"))
    again = evaluate(compose_task("evaluate", f"run={trained['run_dir']}", "split=val",
                                  "trainer.limit_val_batches=1"))
    assert json.loads((result["run_dir"] / "metrics.json").read_text()) == result["metrics"]
    assert again["metrics"] == result["metrics"]  # seeded: the ELBO's z samples repeat
    # Same weights and validation batch as the training run's last validation; only the
    # z sample of the ELBO estimate differs.
    assert result["metrics"]["val/loss"] == pytest.approx(trained["metrics"]["val/loss"], rel=0.05)
    lines = (trained["run_dir"] / "evaluations.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["metrics"] == result["metrics"]


def test_finetune_freezes_by_pattern_and_records_its_start(trained, compose_task):
    from genframe.tasks.finetune import finetune
    from genframe.weights import read_weights

    cfg = compose_task("finetune", f"run={trained['run_dir']}", "finetune.freeze=[encoder.*]",
                       "finetune.lr=0.01", *[o for o in FAST if not o.startswith("model.")])
    result = finetune(cfg)
    _, before = read_weights(trained["run_dir"] / "model.safetensors")
    _, after = read_weights(result["run_dir"] / "model.safetensors")
    enc = [k for k in before if k.startswith("encoder.")]
    dec = [k for k in before if k.startswith("decoder.")]
    assert enc and dec
    assert all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in dec)
    info = json.loads((result["run_dir"] / "run.json").read_text())
    assert info["started_from"]["run"] == str(trained["run_dir"])
    # Counted in tensors: every parameter (not buffer) of the encoder, and only those.
    encoder = [n for n, _ in result["model"].named_parameters() if n.startswith("encoder.")]
    assert len(encoder) < len(list(result["model"].parameters()))
    assert info["frozen_parameters"] == len(encoder)
    assert info["model"]["kwargs"]["lr"] == 0.01


def test_finetune_bad_freeze_pattern(trained, compose_task):
    from genframe.errors import UserError
    from genframe.tasks.finetune import finetune

    cfg = compose_task("finetune", f"run={trained['run_dir']}", "finetune.freeze=[encodr.*]")
    with pytest.raises(UserError, match="matches no parameter"):
        finetune(cfg)


def test_resume_continues_from_last_checkpoint(trained, compose_task):
    from genframe.tasks.train import train

    cfg = compose_task("train", f"resume={trained['run_dir']}")
    result = train(cfg, overrides=["trainer.max_epochs=3"])
    info = json.loads((result["run_dir"] / "run.json").read_text())
    assert info["resumed_from"].endswith("last.ckpt")
    assert info["epochs"] == 3
    # The resumed run keeps the stored model config, not the default one.
    assert info["model"]["kwargs"]["latent_dim"] == 2


def _image_folder(root, channels_mode="L", n=12):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(12, 12, generator=g) * 255).byte().numpy()
        Image.fromarray(arr, mode="L").convert(channels_mode).save(root / f"img{i}.png")
    return root


def test_finetune_on_an_image_folder(trained, compose_task, tmp_path):
    from genframe.tasks.finetune import finetune

    folder = _image_folder(tmp_path / "pics")
    cfg = compose_task("finetune", f"run={trained['run_dir']}", "data=image_folder",
                       f"data.root={folder}", "data.channels=1", "data.image_size=8",
                       "data.num_levels=17", "data.batch_size=4",
                       *[o for o in FAST if not o.startswith("model.")])
    result = finetune(cfg)
    info = json.loads((result["run_dir"] / "run.json").read_text())
    assert info["data"]["name"] == "image_folder" and info["data"]["root"] == str(folder)


def test_finetune_refuses_data_of_another_shape(trained, compose_task, tmp_path):
    from genframe.errors import UserError
    from genframe.tasks.finetune import finetune

    folder = _image_folder(tmp_path / "rgb", "RGB")
    cfg = compose_task("finetune", f"run={trained['run_dir']}", "data=image_folder",
                       f"data.root={folder}", "data.image_size=8")
    with pytest.raises(UserError, match=r"model.in_channels=1 but data.channels=3"):
        finetune(cfg)


def test_train_on_image_folder_skips_corrupt_files(compose_task, tmp_path, caplog):
    from genframe.tasks.train import train

    folder = _image_folder(tmp_path / "mixed", "RGB")
    (folder / "broken.png").write_bytes(b"not an image")
    cfg = compose_task("train", "data=image_folder", f"data.root={folder}", "data.image_size=16",
                       "data.batch_size=4", *FAST)
    with caplog.at_level("WARNING", logger="genframe"):
        result = train(cfg)
    assert "skipped 1 of 13" in caplog.text and "broken.png" in caplog.text
    assert result["samples"].images.shape[1:] == (3, 16, 16)


def test_conditional_vae_generates_the_requested_label(compose_task):
    from genframe.errors import UserError
    from genframe.tasks.generate import generate
    from genframe.tasks.train import train

    run = train(compose_task("train", *FAST, "model.num_classes=${data.num_classes}"))["run_dir"]
    result = generate(compose_task("generate", f"run={run}", "num_samples=4", "condition.label=3"))
    manifest = [json.loads(x) for x in (result["run_dir"] / "samples/manifest.jsonl").read_text().splitlines()]
    assert [m["condition"] for m in manifest] == [{"label": 3}] * 4
    with pytest.raises(UserError, match="condition.label"):
        generate(compose_task("generate", f"run={run}", "condition.label=12"))
    # One label a sample, across batches: sample i gets label i.
    result = generate(compose_task("generate", f"run={run}", "num_samples=5", "batch_size=2",
                                   "condition.label=[1,2,3,4,5]"))
    manifest = [json.loads(x) for x in (result["run_dir"] / "samples/manifest.jsonl").read_text().splitlines()]
    assert [m["condition"]["label"] for m in manifest] == [1, 2, 3, 4, 5]
    with pytest.raises(UserError, match=r"condition.label: 2 labels for 3 samples"):
        generate(compose_task("generate", f"run={run}", "num_samples=3", "condition.label=[1,2]"))
    # Every label is checked before a sample is written, not only the first batch's.
    cfg = compose_task("generate", f"run={run}", "batch_size=1", "condition.label=[1,2,12]")
    with pytest.raises(UserError, match=r"0\.\.9.*got 12"):
        generate(cfg)
    assert not (Path(cfg.paths.output_dir) / "samples").exists()
    # Without num_samples, one image a label.
    result = generate(compose_task("generate", f"run={run}", "condition.label=[7,0]"))
    assert result["num_samples"] == 2


def test_condition_on_an_unconditional_model_is_refused(trained, compose_task):
    from genframe.errors import UserError
    from genframe.tasks.generate import generate

    with pytest.raises(UserError, match="unconditional"):
        generate(compose_task("generate", f"run={trained['run_dir']}", "condition.label=3"))


def test_sampler_and_guidance_on_a_model_without_them(trained, compose_task):
    from genframe.errors import UserError
    from genframe.tasks.generate import generate

    with pytest.raises(UserError, match="sampler=ddim: model 'vae' takes no sampler"):
        generate(compose_task("generate", f"run={trained['run_dir']}", "sampler=ddim"))
    with pytest.raises(UserError, match="guidance=2.0: model 'vae' takes no guidance"):
        generate(compose_task("generate", f"run={trained['run_dir']}", "guidance=2.0"))


def test_sample_quality_callback_logs_image_metrics(compose_task):
    from genframe.tasks.train import train

    # Measured on the first validation and every 2nd epoch; monitored in between too.
    result = train(compose_task(
        "train", *FAST, "trainer.max_epochs=3", "callbacks=sample_metrics",
        "callbacks.sample_metrics.every_n_epochs=2", "callbacks.sample_metrics.num_samples=40",
        "monitor=val/fd"))
    for key in ("val/fd", "val/precision", "val/recall"):
        assert key in result["metrics"], key
    assert result["metrics"]["val/fd"] > 0
    assert result["objective"] == result["metrics"]["val/fd"]  # what a sweep optimises
    assert (result["run_dir"] / "checkpoints" / "best.ckpt").exists()


def test_evaluate_reports_image_metrics(trained, compose_task):
    from genframe.tasks.evaluate import evaluate

    result = evaluate(compose_task("evaluate", f"run={trained['run_dir']}", "metrics.num_samples=60"))
    m = result["metrics"]
    assert m["test/fd"] > 0 and 0 <= m["test/precision"] <= 1 and 0 <= m["test/recall"] <= 1
    assert m["metrics/classifier_val_accuracy"] > 0.9


def test_diffusion_trains_on_an_rgb_image_folder_of_odd_size(compose_task, tmp_path):
    from genframe.tasks.generate import generate
    from genframe.tasks.train import train

    folder = _image_folder(tmp_path / "rgb", "RGB")
    result = train(compose_task("train", "model=diffusion", "data=image_folder", f"data.root={folder}",
                                "data.image_size=11", "data.batch_size=4", "model.block_out_channels=[8,16]",
                                "model.timesteps=20", "model.default_sampler_steps=4", *FAST_TRAINING))
    assert result["samples"].images.shape[1:] == (3, 11, 11)
    gen = generate(compose_task("generate", f"run={result['run_dir']}", "num_samples=2",
                                "sampler=ddim", "sampler.steps=5"))
    assert gen["samples"][0].metadata["sampler"] == {"name": "ddim", "steps": 5, "eta": 0.0}


def test_last_checkpoint_follows_epochs_not_improvements(compose_task):
    """monitor_mode=max on a falling val/loss: best stays at epoch 0, last moves on."""
    from genframe.tasks.train import train

    run = train(compose_task("train", *FAST, "trainer.max_epochs=3", "monitor_mode=max"))["run_dir"]
    load = lambda name: torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)
    assert load("best.ckpt")["epoch"] == 0
    assert load("last.ckpt")["epoch"] == 2


def test_gan_generate_with_label_and_truncation(compose_task):
    from genframe.errors import UserError
    from genframe.plugins import get_registry
    from genframe.tasks.generate import generate
    from genframe.tasks.train import train

    tiny = get_registry().model("gan").tiny
    run = train(compose_task("train", "model=gan", *FAST_TRAINING,
                             f"model.latent_dim={tiny['latent_dim']}",
                             "model.g_channels=[8,16]", "model.d_channels=[8,16]"))["run_dir"]
    result = generate(compose_task("generate", f"run={run}", "num_samples=6", "condition.label=3",
                                   "++sampling.truncation=0.5", "seed=0"))
    samples = result["samples"][0]
    assert [c["label"] for c in samples.conditions] == [3] * 6
    assert samples.metadata["truncation"] == 0.5
    again = generate(compose_task("generate", f"run={run}", "num_samples=6", "condition.label=3",
                                  "++sampling.truncation=0.5", "seed=0"))
    assert torch.equal(samples.images, again["samples"][0].images)
    with pytest.raises(UserError, match="truncation"):
        generate(compose_task("generate", f"run={run}", "++sampling.truncation=-1"))
