"""Run directories, weights and checkpoints carry a format version and the environment;
runs written before versioning (tests/data/runs_before_format_1, made by the code of that
time) still load, generate, fine-tune, export and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from genframe.errors import UserError
from genframe.spec import FORMAT_VERSION
from tests.conftest import FAST_TRAINING

OLD = Path(__file__).parent / "data" / "runs_before_format_1"


@pytest.fixture
def old_run(tmp_path):
    """A copy of an old run directory (tasks append to a run's evaluations.jsonl)."""

    def copy(name: str) -> Path:
        dest = tmp_path / "old" / name
        shutil.copytree(OLD / name, dest)
        return dest

    return copy


@pytest.mark.parametrize("name", ["vae", "diffusion", "gan", "transformer", "transformer_lora"])
def test_an_old_run_loads_and_generates(name, old_run, compose_task):
    from genframe.runs import open_run
    from genframe.tasks.generate import generate
    from genframe.weights import load_model

    run_dir = old_run(name)
    stored = json.loads((run_dir / "run.json").read_text())
    assert "format_version" not in stored  # really a run of the old format
    run = open_run(run_dir)
    assert run.info["format_version_read"] == 0
    model, _, _ = load_model(run=str(run_dir))
    assert model.model_spec.name == stored["model"]["name"]
    if "channels" in stored["model"]["kwargs"]:  # the width list's old name, migrated
        assert model.hparams.block_out_channels == stored["model"]["kwargs"]["channels"]
        assert "channels" not in model.model_spec.kwargs
    options = ["++sampling.max_new_tokens=4"] if name.startswith("transformer") else []
    out = generate(compose_task("generate", f"run={run_dir}", "num_samples=2", "seed=0", *options))
    samples = out["samples"][0]
    assert len(samples) == 2 and samples.metadata["model"] == stored["model"]["name"]


def test_an_old_run_resumes_and_an_old_lora_run_exports_merged(old_run, compose_task):
    from genframe.tasks.export import export
    from genframe.tasks.train import train
    from genframe.weights import read_weights

    vae = old_run("vae")
    assert "channels:" in (vae / "config.yaml").read_text()  # the old key in its config
    more = ["trainer.max_epochs=2"]
    out = train(compose_task("train", f"resume={vae}", *more), overrides=more)
    info = json.loads((out["run_dir"] / "run.json").read_text())
    assert info["steps"] == 4 and info["model"]["kwargs"]["block_out_channels"] == [8, 16]

    merged = export(compose_task("export", f"run={old_run('transformer_lora')}", "merge=true"))
    spec, state = read_weights(merged["run_dir"] / "model.safetensors")
    assert spec.lora is None and not any("lora_" in k for k in state)


def test_new_runs_weights_and_checkpoints_carry_format_and_environment(compose_task):
    from safetensors import safe_open

    from genframe.tasks.train import train
    from tests.conftest import FAST

    run = train(compose_task("train", *FAST))["run_dir"]
    info = json.loads((run / "run.json").read_text())
    env = info["environment"]
    assert info["format_version"] == FORMAT_VERSION == env["format_version"]
    assert env["torch"] == str(torch.__version__) and env["device"] == "cpu"
    assert set(env) >= {"genframe", "python", "torch", "pytorch_lightning", "cuda", "device"}
    assert info["model"]["format_version"] == FORMAT_VERSION
    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["genframe"])["format_version"] == FORMAT_VERSION
    assert json.loads(meta["genframe_environment"])["torch"] == env["torch"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["genframe"]["format_version"] == FORMAT_VERSION
    assert ckpt["genframe_environment"]["pytorch_lightning"] == env["pytorch_lightning"]


def test_a_newer_format_is_refused_with_the_reason(old_run, tmp_path):
    from genframe.runs import open_run
    from genframe.weights import read_weights

    run_dir = old_run("vae")
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(UserError, match=f"newer genframe \\(format {FORMAT_VERSION + 1}"):
        open_run(run_dir)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["genframe"]["format_version"] = FORMAT_VERSION + 1
    torch.save(ckpt, tmp_path / "future.ckpt")
    with pytest.raises(UserError, match="upgrade genframe"):
        read_weights(tmp_path / "future.ckpt")


def test_an_old_argument_name_on_the_command_line_names_the_new_one(cli):
    res = cli("train", *FAST_TRAINING, "model.channels=[8,16]")
    assert res.returncode == 2
    assert "model.channels was renamed to block_out_channels: use model.block_out_channels=[8,16]" in res.stderr
    res = cli("train", *FAST_TRAINING, "+model.channels=[8,16]")
    assert res.returncode == 2
    assert "model.channels: renamed to block_out_channels" in res.stderr
