"""The command line as a user meets it: help, Hydra features, sweeps."""

from __future__ import annotations

import json

from tests.conftest import FAST


def test_main_help_lists_tasks_groups_and_choices(cli):
    result = cli("--help")
    assert result.returncode == 0
    for text in ("train", "finetune", "generate", "evaluate", "plugins", "model", "vae",
                 "digits", "image_folder", "trainer", "cpu", "gpu", "auto", "logger", "csv"):
        assert text in result.stdout, text


def test_task_help_shows_groups_and_config(cli):
    result = cli("train", "--help")
    assert result.returncode == 0, result.stderr
    assert "== Config groups ==" in result.stdout
    from genframe.plugins import get_registry

    models = ", ".join(sorted(get_registry().models))
    assert f"model: {models}" in result.stdout and "latent_dim" in result.stdout


def test_task_help_composes_the_overrides_and_refuses_a_bad_one(cli):
    # genframe answers --help itself (Hydra's help composes once per group, its own
    # hydra/* groups included); an override that does not compose is still refused.
    result = cli("train", "model.latent_dim=5", "experiment=digits_vae", "--help")
    assert result.returncode == 0, result.stderr
    assert "latent_dim: 5" in result.stdout and "max_epochs: 100" in result.stdout
    assert "launcher:" not in result.stdout and "Usage: genframe train" in result.stdout
    bad = cli("train", "model=nope", "--help")
    assert bad.returncode == 2 and "no such choice in config group 'model'" in bad.stderr


def test_cfg_job_prints_overridden_config(cli):
    result = cli("train", "model.latent_dim=5", "~logger", "+trainer.profiler=simple", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "latent_dim: 5" in result.stdout
    assert "profiler: simple" in result.stdout
    assert "CSVLogger" not in result.stdout


def test_info_works(cli):
    result = cli("train", "--info", "defaults")
    assert result.returncode == 0, result.stderr
    assert "model/vae" in result.stdout


def test_train_prints_run_dir_and_metrics(cli, tmp_path):
    result = cli("train", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run directory:" in result.stdout and "val/loss" in result.stdout
    assert "litlogger" not in result.stdout + result.stderr  # Lightning's advert is dropped
    run_dir = result.stdout.split("run directory:")[1].split()[0]
    assert run_dir.startswith(str(tmp_path / "outputs" / "train"))
    gen = cli("generate", f"run={run_dir}", "num_samples=5", "seed=0", "condition.label=null",
              "sampling.temperature=0.5")
    assert gen.returncode == 0, gen.stderr[-3000:]
    gen_dir = gen.stdout.split("run directory:")[1].split()[0]
    manifest = (tmp_path / gen_dir / "samples" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 5 and json.loads(manifest[0])["temperature"] == 0.5


def test_multirun_sweep_with_summary(cli, tmp_path):
    result = cli("train", "-m", "model.latent_dim=2,3", *[o for o in FAST if "latent_dim" not in o])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep summary (2 jobs)" in result.stdout
    summaries = list((tmp_path / "outputs").rglob("summary.jsonl"))
    assert len(summaries) == 1
    rows = [json.loads(line) for line in summaries[0].read_text().splitlines()]
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert {"model.latent_dim=2", "model.latent_dim=3"} <= {o for r in rows for o in r["overrides"]}
    assert all("val/loss" in r["metrics"] for r in rows)
    assert (summaries[0].parent / "0" / "model.safetensors").exists()
    assert (summaries[0].parent / "1" / "model.safetensors").exists()


def test_sampling_option_unknown_to_the_model(cli, tmp_path):
    result = cli("train", *FAST, "num_samples=2", "sampling.temprature=0.5")
    assert result.returncode == 2
    assert "temprature" in result.stderr and "Traceback" not in result.stderr


def test_open_keys_are_only_opened_for_tasks_that_have_them(cli):
    # chat takes temperature=..., not sampling.*: the key must fail, not be ignored.
    result = cli("chat", "run=nowhere", "sampling.temperature=0")
    assert result.returncode == 2
    assert "sampling" in result.stderr and "temperature" in result.stderr


def test_two_hydra_modes_at_once_are_one_line_not_a_traceback(cli):
    done = cli("train", "-m", "model.latent_dim=2,3", "--cfg", "hydra")
    assert done.returncode == 2
    assert "--cfg and -m cannot be combined" in done.stderr and "Traceback" not in done.stderr
