"""Large generate requests: samples are written batch by batch with a progress line, a
request that would not fit on disk or in memory is refused up front with the estimate,
and an interrupted or failing generation keeps what it wrote with a matching manifest."""

from __future__ import annotations

import json
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from genframe.errors import Interrupted, UserError
from tests.conftest import FAST, FAST_TRAINING

Usage = namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    from genframe.config import compose
    from genframe.tasks.train import train

    out = tmp_path_factory.mktemp("vae") / "run"
    return train(compose("train", [*FAST, f"paths.output_dir={out}"]))["run_dir"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    from genframe.config import compose
    from genframe.tasks.train import train

    root = tmp_path_factory.mktemp("lm")
    corpus = root / "corpus.txt"
    corpus.write_text("The for statement repeats. A while loop runs. " * 60)
    return train(compose("train", [
        "data=text", "data.source=files", f"data.path={corpus}", "model=transformer",
        "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "data.block_size=32",
        "data.batch_size=4", *FAST_TRAINING, "++sampling.max_new_tokens=4",
        f"paths.output_dir={root / 'run'}"]))["run_dir"]


def manifest_of(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def sample_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name[0].isdigit())


@pytest.fixture
def spy(monkeypatch):
    """Wraps the loaded model's `generate`: records the manifest's length at each call
    (after the one-sample probe) and can fail a chosen batch."""
    import genframe.tasks.generate as task

    state = {"seen": [], "fail_at": None, "error": KeyboardInterrupt, "folder": None,
             "calls": 0, "limit": None}
    real_load = task.load_model

    def load(*args):
        model, run, weights = real_load(*args)
        real_generate = model.generate

        def generate(n, **kwargs):
            state["calls"] += 1
            if state["limit"] is not None and state["calls"] > state["limit"]:
                raise AssertionError(f"more than {state['limit']} calls of generate()")
            folder = state["folder"]
            if folder is not None and (folder / "manifest.jsonl").exists():
                calls = len(state["seen"])
                state["seen"].append(len(manifest_of(folder)))
                if calls == state["fail_at"]:
                    raise state["error"]()
            return real_generate(n, **kwargs)

        model.generate = generate
        return model, run, weights

    monkeypatch.setattr(task, "load_model", load)
    return state


def test_samples_are_written_batch_by_batch_with_progress(vae_run, compose_task, spy, monkeypatch, capsys):
    import genframe.tasks.generate as task

    monkeypatch.setattr(task, "PROGRESS_EVERY_S", 0.0)
    cfg = compose_task("generate", f"run={vae_run}", "num_samples=700", "batch_size=100")
    spy["folder"] = Path(cfg.paths.output_dir) / "samples"
    result = task.generate(cfg)
    # Before batch b is made, the b batches before it are on disk and in the manifest.
    assert spy["seen"] == [0, 100, 200, 300, 400, 500, 600]
    folder = result["folder"]
    assert len(manifest_of(folder)) == 700 and len(sample_files(folder)) == 700
    assert result["num_samples"] == 700
    # The result holds the first batches only (under KEEP_SAMPLES samples), not all 700.
    assert sum(len(s) for s in result["samples"]) <= task.KEEP_SAMPLES + 100
    assert result["samples"][0].images.shape[0] == 100
    # The grid shows the first samples only: at most GRID_MAX of them.
    from PIL import Image

    from genframe.sample_writer import GRID_MAX

    # 16 x 16 images of 8 px with 1 px padding, scaled x2 to reach 256 px (700 would be 488 px).
    assert GRID_MAX == 256 and Image.open(folder / "grid.png").size == (290, 290)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[progress]")]
    assert lines[0].startswith("[progress] 100/700 samples (14%)") and "samples/s" in lines[0]
    assert "left 0:" in lines[0]
    assert lines[-1].startswith("[progress] done: 700/700 samples")


def test_a_request_that_would_not_fit_on_disk_is_refused_with_the_estimate(vae_run, compose_task,
                                                                            spy, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 10**6, 10**6))
    cfg = compose_task("generate", f"run={vae_run}", "num_samples=100000000")
    spy["limit"] = 1  # the one-sample probe
    from genframe.tasks.generate import generate

    with pytest.raises(UserError) as err:
        generate(cfg)
    message = str(err.value)
    assert message.startswith("num_samples=100000000 would need about ")
    assert " GB in " in message and "which has 1 MB free" in message and "fit" in message
    assert not (Path(cfg.paths.output_dir) / "run.json").exists()  # refused before it started


def test_the_disk_estimate_counts_whole_blocks_and_fits_what_fits(vae_run, compose_task, monkeypatch):
    from genframe.tasks.generate import generate

    # 50 samples of 8x8 digits take 50 blocks (4 kB each) and manifest lines: 300 kB fits.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 0, 300_000))
    assert generate(compose_task("generate", f"run={vae_run}", "num_samples=50"))["num_samples"] == 50
    with pytest.raises(UserError, match=r"num_samples=80 would need about .* kB"):
        generate(compose_task("generate", f"run={vae_run}", "num_samples=80"))


def test_a_batch_that_would_not_fit_in_memory_is_refused(vae_run, compose_task, monkeypatch):
    import genframe.tasks.generate as task

    monkeypatch.setattr(task, "_host_available", lambda: 10**6)
    cfg = compose_task("generate", f"run={vae_run}", "num_samples=100000", "batch_size=100000")
    with pytest.raises(UserError, match=r"batch_size=100000 would need about .* of memory .* "
                                        r"which has 1 MB available; use a smaller batch_size"):
        task.generate(cfg)
    # The same number of samples in small batches fits: memory holds one batch.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, 10**12))
    cfg = compose_task("generate", f"run={vae_run}", "num_samples=100000", "batch_size=100")
    monkeypatch.setattr(task.SampleWriter, "add", _interrupt_after(3))
    with pytest.raises(Interrupted, match="300 of 100000 samples"):  # it started, then Ctrl-C
        task.generate(cfg)


def _interrupt_after(n):
    from genframe.sample_writer import SampleWriter

    real = SampleWriter.add
    calls = []

    def add(self, batch):
        calls.append(1)
        if len(calls) > n:
            raise KeyboardInterrupt
        real(self, batch)

    return add


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, "interrupted"), (RuntimeError, "failed")])
def test_a_stopped_generation_keeps_its_samples_and_a_matching_manifest(vae_run, compose_task, spy,
                                                                        error, status):
    import genframe.tasks.generate as task

    cfg = compose_task("generate", f"run={vae_run}", "num_samples=50", "batch_size=10")
    spy.update(folder=Path(cfg.paths.output_dir) / "samples", fail_at=3, error=error)
    with pytest.raises(Interrupted if error is KeyboardInterrupt else RuntimeError) as err:
        task.generate(cfg)
    if error is KeyboardInterrupt:
        assert "30 of 50 samples" in str(err.value)
    folder = spy["folder"]
    manifest = manifest_of(folder)
    assert [m["file"] for m in manifest] == [f for f in sample_files(folder) if f != "grid.png"]
    assert len(manifest) == 30 and (folder / "grid.png").exists()
    info = json.loads((folder.parent / "run.json").read_text())
    assert info["status"] == status and info["num_samples"] == 30


def test_a_batch_interrupted_while_written_leaves_no_file_the_manifest_lacks(tmp_path, monkeypatch):
    from genframe import sample_writer
    from genframe.sample_writer import SampleWriter
    from genframe.samples import Samples

    writer = SampleWriter(tmp_path / "s")
    writer.add(Samples(images=torch.rand(4, 1, 8, 8)))
    real = sample_writer._to_pil
    calls = []

    def flaky(image):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(image)

    monkeypatch.setattr(sample_writer, "_to_pil", flaky)
    with pytest.raises(KeyboardInterrupt):
        writer.add(Samples(images=torch.rand(4, 1, 8, 8)))
    writer.close()
    names = sorted(p.name for p in (tmp_path / "s").glob("0*.png"))
    assert names == [m["file"] for m in manifest_of(tmp_path / "s")] == [f"{i:06d}.png" for i in range(4)]


def test_write_samples_writes_into_an_exact_folder(tmp_path):
    from genframe.sample_writer import write_samples
    from genframe.samples import Samples

    samples = Samples(images=torch.rand(3, 3, 4, 4))
    folder = write_samples(samples, folder=tmp_path / "epoch_007")
    assert folder == tmp_path / "epoch_007"
    assert sorted(p.name for p in folder.iterdir()) == ["000000.png", "000001.png", "000002.png",
                                                        "grid.png", "manifest.jsonl"]
    assert write_samples(samples, tmp_path / "run") == tmp_path / "run" / "samples"  # as before
    with pytest.raises(TypeError):
        write_samples(samples, tmp_path, folder=tmp_path / "x")


def test_text_models_stream_prompts_times_num_samples(lm_run, compose_task, spy, tmp_path, monkeypatch):
    import genframe.tasks.generate as task

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The for\nA while\nloop\n")
    cfg = compose_task("generate", f"run={lm_run}", f"prompt_file={prompts}", "num_samples=5",
                       "batch_size=4", "stream=false")
    spy["folder"] = Path(cfg.paths.output_dir) / "samples"
    result = task.generate(cfg)
    assert spy["seen"] == [0, 4, 8, 12]
    manifest = manifest_of(result["folder"])
    assert [m["condition"]["prompt"] for m in manifest] == ["The for"] * 5 + ["A while"] * 5 + ["loop"] * 5
    assert sample_files(result["folder"]) == [f"{i:06d}.txt" for i in range(15)]

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 0, 10**6))
    with pytest.raises(UserError, match=r"num_samples=1000000 for each of 3 prompts \(3,000,000 samples\) "
                                        r"would need about .* GB"):
        task.generate(compose_task("generate", f"run={lm_run}", f"prompt_file={prompts}",
                                   "num_samples=1000000"))


def test_a_list_of_prompts_is_a_batch_of_prompts(lm_run, compose_task):
    import genframe.tasks.generate as task

    cfg = compose_task("generate", f"run={lm_run}", "prompt=[The for,A while]", "num_samples=2",
                       "stream=false")
    manifest = manifest_of(task.generate(cfg)["folder"])
    assert [m["condition"]["prompt"] for m in manifest] == ["The for"] * 2 + ["A while"] * 2
    cfg = compose_task("generate", f"run={lm_run}", "+condition.prompt=[The for,A while]", "stream=false")
    manifest = manifest_of(task.generate(cfg)["folder"])
    assert [m["condition"]["prompt"] for m in manifest] == ["The for", "A while"]
    with pytest.raises(UserError, match=re.escape("condition.prompt=[]: give one prompt")):
        task.generate(compose_task("generate", f"run={lm_run}", "+condition.prompt=[]"))
    for bad, shown in (("prompt=[]", "not an empty list"), ("prompt=[a,[b]]", "not ['b']"),
                       ("prompt={a:b}", "not {'a': 'b'}")):
        with pytest.raises(UserError, match=re.escape(shown)):
            task.generate(compose_task("generate", f"run={lm_run}", bad))
