"""Weights are what the run says they are (issue 10, section 3).

Every task that reads weights (generate, evaluate, finetune, export, chat, resume) checks
them against the model the run's run.json records, and every read of a weights file fails
the same clean way: exit status 2, one line naming the key (run=, ckpt=, adapter=,
resume=), the file, what is wrong and the fix, and no file of the source run changed.
A missing or damaged model.safetensors falls back to the run's checkpoints with a warning.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from genframe.cli import main

OLD = Path(__file__).parent / "data" / "runs_before_format_1"
VAE_TARGETS = ["encoder.*.conv1", "to_posterior", "from_latent", "decoder.head"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs (copies of the stored old-format runs; training one here costs a minute
    on a shared CPU), and an adapter trained on top of the VAE run."""
    from genframe.lora import apply_lora, save_adapter
    from genframe.weights import load_model

    root = tmp_path_factory.mktemp("runs")
    for name in ("vae", "diffusion", "transformer"):
        shutil.copytree(OLD / name, root / name)
    model, _, _ = load_model(run=str(root / "vae"))
    apply_lora(model, r=2, alpha=4, target_modules=VAE_TARGETS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.01)
    save_adapter(model, root / "adapter.safetensors")
    return root


@pytest.fixture
def copy_run(runs, tmp_path):
    """A fresh copy of a stored run, to damage."""

    def copy(name: str) -> Path:
        dest = tmp_path / f"{name}-copy"
        shutil.copytree(runs / name, dest)
        return dest

    return copy


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def genframe(tmp_path, monkeypatch, capsys):
    """Run `genframe <args>` in-process; return (exit status, stderr, stdout)."""
    monkeypatch.chdir(tmp_path)
    counter = iter(range(1000))

    def run(*args: str) -> tuple[int, str]:
        code = main([*args, f"hydra.run.dir={tmp_path}/out-{next(counter)}"])
        captured = capsys.readouterr()
        return code, captured.err, captured.out

    return run


def refused(genframe, *args: str, fragments: tuple[str, ...], unchanged: Path | None = None) -> str:
    """Run and assert a clean refusal naming every fragment; `unchanged`'s files stay."""
    before = snapshot(unchanged) if unchanged is not None else None
    code, err, out = genframe(*args)
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("genframe: error: "), err
    message = err.removeprefix("genframe: error: ").strip()
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    if unchanged is not None:
        assert snapshot(unchanged) == before
    return message


# -- a run's weights are checked against its run.json ------------------------------------


@pytest.mark.parametrize("task", ["generate", "evaluate", "finetune", "export"])
def test_another_models_weights_in_a_run_are_refused(task, runs, copy_run, genframe):
    run = copy_run("vae")
    shutil.copy(runs / "diffusion" / "model.safetensors", run / "model.safetensors")
    refused(genframe, task, f"run={run}", unchanged=run,
            fragments=(f"run={run}", "model.safetensors", "model 'diffusion'", "'vae'", "ckpt="))


def test_weights_with_other_arguments_than_run_json_are_refused(copy_run, genframe):
    from genframe.weights import build_from_spec, read_weights, save_weights

    run = copy_run("vae")
    spec, _ = read_weights(run / "model.safetensors")
    save_weights(build_from_spec(spec.with_kwargs(latent_dim=3)), run / "model.safetensors")
    refused(genframe, "generate", f"run={run}", unchanged=run,
            fragments=(f"run={run}", "model.safetensors", "latent_dim=3", "run.json: 2"))


def test_another_models_last_ckpt_is_refused_when_it_is_used(runs, copy_run, genframe):
    run = copy_run("vae")
    (run / "model.safetensors").unlink()
    shutil.copy(runs / "diffusion" / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    refused(genframe, "generate", f"run={run}", unchanged=run,
            fragments=(f"run={run}", "checkpoints/last.ckpt", "model 'diffusion'"))


# -- run= and ckpt= together ------------------------------------------------------------


def test_run_with_a_ckpt_of_another_run_is_refused(runs, copy_run, genframe):
    run = copy_run("vae")
    other = runs / "diffusion" / "model.safetensors"
    refused(genframe, "generate", f"run={run}", f"ckpt={other}", unchanged=run,
            fragments=(f"ckpt={other}", f"run={run}", "not a file of", "not both"))


def test_run_with_one_of_its_own_checkpoints_records_both(copy_run, genframe, tmp_path):
    run = copy_run("vae")
    last = run / "checkpoints" / "last.ckpt"
    code, err, out = genframe("generate", f"run={run}", f"ckpt={last}", "num_samples=2")
    assert code == 0, err
    source = json.loads((tmp_path / "out-0" / "run.json").read_text())["source"]
    assert source == {"run": str(run.resolve()), "weights": str(last.resolve())}


# -- a missing or damaged model.safetensors: the same fall-back, with a warning -----------


@pytest.mark.parametrize("damage", ["missing", "truncated", "empty"])
def test_missing_or_damaged_weights_fall_back_to_the_checkpoint(damage, copy_run, genframe,
                                                                 tmp_path):
    run = copy_run("vae")
    weights = run / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000] if damage == "truncated" else b"")
    before = snapshot(run)
    code, err, out = genframe("generate", f"run={run}", "num_samples=2")
    assert code == 0, err
    assert snapshot(run) == before
    source = json.loads((tmp_path / "out-0" / "run.json").read_text())["source"]
    assert source["weights"] == str((run / "checkpoints" / "last.ckpt").resolve())
    warning = next(line for line in out.splitlines() if "WARNING" in line)  # Hydra's console log
    assert f"run={run.resolve()}" in warning and "model.safetensors" in warning
    assert "using checkpoints/last.ckpt" in warning
    assert {"missing": "missing", "truncated": "not a readable", "empty": "empty"}[damage] in warning


def test_damaged_weights_without_checkpoints_are_a_clean_error(copy_run, genframe):
    run = copy_run("transformer")  # this run kept no checkpoints
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    refused(genframe, "generate", f"run={run}", unchanged=run,
            fragments=(f"run={run.resolve()}", "no usable weights", "model.safetensors",
                       "not a readable safetensors file", "checkpoints/last.ckpt is missing"))


# -- resume= checks last.ckpt before training --------------------------------------------


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("damage, fragment", [
    ("code", "without unpickling code"),
    ("truncated", "damaged"),
    ("empty", "empty"),
    ("other model", "model 'diffusion'"),
    ("weights only", "no training state"),
])
def test_resume_refuses_a_bad_last_checkpoint(damage, fragment, runs, copy_run, genframe, tmp_path):
    run = copy_run("vae")
    last = run / "checkpoints" / "last.ckpt"
    if damage == "code":
        last.write_bytes(pickle.dumps(_Payload()))
    elif damage == "truncated":
        last.write_bytes(last.read_bytes()[:5000])
    elif damage == "empty":
        last.write_bytes(b"")
    elif damage == "other model":
        shutil.copy(runs / "diffusion" / "checkpoints" / "last.ckpt", last)
    else:  # the run's model.safetensors under the checkpoint's name
        shutil.copy(run / "model.safetensors", last)
    refused(genframe, "train", f"resume={run}", "trainer.max_epochs=2", unchanged=run,
            fragments=(f"resume={run}", "checkpoints/last.ckpt", fragment,
                       f"genframe finetune run={run.resolve()}"))
    assert not (tmp_path / "PWNED").exists()


# -- ckpt= files of every kind -----------------------------------------------------------


def _rewritten_spec(src: Path, dest: Path, change) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    meta["genframe"] = change(meta["genframe"])
    save_file(load_file(str(src)), str(dest), metadata=meta)


def _bump_latent_dim(text: str) -> str:
    spec = json.loads(text)
    spec["kwargs"]["latent_dim"] = 5
    return json.dumps(spec)


@pytest.mark.parametrize("kind, fragment", [
    ("directory", "a directory, not a weights file"),
    ("empty", "empty"),
    ("truncated", "not a readable safetensors file"),
    ("plain state dict", "not a genframe checkpoint"),
    ("keras", "cannot be read"),
    ("code", "without unpickling code"),
    ("shapes", "do not fit"),
    ("bad metadata", "not valid JSON"),
    ("adapter", "a LoRA adapter file"),
])
def test_a_bad_ckpt_file_is_a_clean_error(kind, fragment, runs, tmp_path, genframe):
    weights = runs / "vae" / "model.safetensors"
    path = tmp_path / {"plain state dict": "w.pt", "keras": "w.h5", "code": "w.ckpt",
                       "directory": "folder"}.get(kind, "w.safetensors")
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(weights.read_bytes()[:2000])
    elif kind == "plain state dict":
        torch.save({"layer.weight": torch.zeros(2, 2)}, path)
    elif kind == "keras":
        path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))
    elif kind == "code":
        path.write_bytes(pickle.dumps(_Payload()))
    elif kind == "shapes":
        _rewritten_spec(weights, path, _bump_latent_dim)
    elif kind == "bad metadata":
        _rewritten_spec(weights, path, lambda text: text[:-3])
    else:
        path = runs / "adapter.safetensors"
    refused(genframe, "generate", f"ckpt={path}", fragments=(f"ckpt={path}", fragment))
    assert not (tmp_path / "PWNED").exists()


def test_safetensors_under_another_name_are_read(runs, tmp_path, genframe):
    renamed = tmp_path / "weights.bin"
    shutil.copy(runs / "vae" / "model.safetensors", renamed)
    code, err, out = genframe("generate", f"ckpt={renamed}", "num_samples=2")
    assert code == 0, err


# -- adapter= ----------------------------------------------------------------------------


def test_an_adapter_loads_on_its_own_base(runs, genframe):
    code, err, out = genframe("generate", f"run={runs / 'vae'}", f"adapter={runs / 'adapter.safetensors'}",
                         "num_samples=2")
    assert code == 0, err


def test_an_adapter_for_other_base_weights_is_refused(runs, copy_run, genframe):
    from genframe.weights import build_from_spec, read_weights, save_weights

    run = copy_run("vae")  # the same model, other weights: another training of it
    spec, _ = read_weights(run / "model.safetensors")
    torch.manual_seed(1)
    save_weights(build_from_spec(spec), run / "model.safetensors")
    adapter = runs / "adapter.safetensors"
    refused(genframe, "generate", f"run={run}", f"adapter={adapter}", unchanged=run,
            fragments=(f"adapter={adapter}", "made for other weights", "started_from"))


@pytest.mark.parametrize("kind, fragment", [
    ("truncated", "not a readable safetensors file"),
    ("model weights", "not a genframe LoRA adapter file"),
    ("other model", "made for model 'vae', not 'diffusion'"),
])
def test_a_bad_adapter_is_a_clean_error(kind, fragment, runs, tmp_path, genframe):
    adapter = {"truncated": tmp_path / "a.safetensors", "model weights": runs / "vae" / "model.safetensors",
               "other model": runs / "adapter.safetensors"}[kind]
    if kind == "truncated":
        adapter.write_bytes((runs / "adapter.safetensors").read_bytes()[:300])
    run = runs / ("diffusion" if kind == "other model" else "vae")
    refused(genframe, "generate", f"run={run}", f"adapter={adapter}", unchanged=run,
            fragments=(f"adapter={adapter}", fragment))
