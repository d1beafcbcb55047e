"""Loggers: each `logger=` preset trains a tiny run through the CLI, and each store is read
back with its library's own reader (TensorBoard's EventAccumulator, `wandb leet inspect`
for the offline W&B run, MLflow's MlflowClient): the metrics, the composed config as
hyperparameters, and the sample grids (or texts) are there."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genframe.errors import UserError
from tests.conftest import FAST, FAST_TRAINING

# The SampleGrid callback, every epoch, four samples: one grid per epoch in samples/.
GRID = ("+callbacks.sample_grid={_target_:genframe.callbacks.SampleGrid,"
        "every_n_epochs:1,num_samples:4}")
TEXT = ("The for statement is used to iterate over the elements of a sequence. "
        "A while loop repeats as long as an expression is true. ") * 40
TINY_LM = ["model=transformer", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
           "data=text", "data.source=files", "data.block_size=48", "data.batch_size=4",
           "sampling.max_new_tokens=12", "num_samples=2"]


@pytest.fixture(autouse=True)
def _no_account(monkeypatch, tmp_path):
    """No W&B key (WANDB_MODE=offline is set by conftest), no MLflow telemetry, no server."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def _train(cli, *overrides: str, fast=FAST) -> Path:
    result = cli("train", *fast, *overrides)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    found = re.search(r"^run directory: (.+)$", result.stdout, flags=re.M)
    assert found, result.stdout[-2000:]
    return Path(found.group(1).strip())


def _rgb(png) -> np.ndarray:
    return np.asarray(Image.open(png if isinstance(png, Path) else io.BytesIO(png)).convert("RGB"))


# --- TensorBoard -------------------------------------------------------------------------


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _tb_hparams(acc) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            return dict(data.session_start_info.hparams)
    return {}


def test_tensorboard_gets_metrics_config_and_sample_grids(cli):
    run = _train(cli, "logger=tensorboard", GRID)
    acc = _events(run / "logs" / "tensorboard")
    tags = acc.Tags()
    assert "val/loss" in tags["scalars"], tags
    assert len(acc.Scalars("val/loss")) >= 1
    assert {"samples/grid", "samples/final"} <= set(tags["images"]), tags
    # The epoch's grid is the picture SampleGrid wrote, at the step it was made.
    (event,) = acc.Images("samples/grid")
    assert event.step == 2  # two training batches
    np.testing.assert_array_equal(_rgb(event.encoded_image_string),
                                  _rgb(run / "samples" / "epoch_000" / "grid.png"))
    (final,) = acc.Images("samples/final")
    np.testing.assert_array_equal(_rgb(final.encoded_image_string),
                                  _rgb(run / "samples" / "grid.png"))
    # The composed config, flattened, in TensorBoard's HPARAMS record.
    hparams = _tb_hparams(acc)
    assert hparams["model/latent_dim"].number_value == 2, sorted(hparams)[:20]
    assert hparams["data/name"].string_value == "digits"
    assert hparams["model/block_out_channels"].string_value == "[8, 16]"


def test_a_text_model_logs_its_samples_as_text_to_tensorboard(cli, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    run = _train(cli, "logger=tensorboard", f"data.path={corpus}", *TINY_LM, fast=FAST_TRAINING)
    acc = _events(run / "logs" / "tensorboard")
    assert "val/loss" in acc.Tags()["scalars"]
    assert "samples/final/text_summary" in acc.Tags()["tensors"], acc.Tags()
    (event,) = acc.Tensors("samples/final/text_summary")
    logged = event.tensor_proto.string_val[0].decode()
    for i, path in enumerate(sorted((run / "samples").glob("*.txt"))):
        assert f"**sample {i}**" in logged and path.read_text() in logged, logged
    assert i == 1


# --- W&B (offline) -----------------------------------------------------------------------


def _wandb_records(run_folder: Path) -> list[dict]:
    """The offline run's records, as W&B's own reader prints them."""
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                             str(run_folder)], capture_output=True, text=True, timeout=120)
    if result.returncode and "No such command" in result.stderr:
        pytest.skip("this wandb has no `wandb leet inspect` (0.2x and later)")
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_wandb_without_a_key_logs_offline_metrics_config_and_images(cli):
    run = _train(cli, "logger=wandb", "logger.wandb.tags=[smoke,digits]", GRID)
    (offline,) = (run / "logs" / "wandb").glob("offline-run-*")
    run_id = json.loads((run / "run.json").read_text())["logger_runs"]["wandb"]
    assert offline.name.endswith(run_id)
    grids = list((offline / "files" / "media" / "images" / "samples").glob("grid_*.png"))
    finals = list((offline / "files" / "media" / "images" / "samples").glob("final_*.png"))
    assert len(grids) == 1 and len(finals) == 1, list(offline.rglob("*.png"))
    np.testing.assert_array_equal(_rgb(grids[0]), _rgb(run / "samples" / "epoch_000" / "grid.png"))

    records = _wandb_records(offline)
    (header,) = [r["run"] for r in records if "run" in r]
    assert header["project"] == "genframe" and header["tags"] == ["smoke", "digits"], header
    history = [r["history"]["item"] for r in records if "history" in r]
    assert any("val/loss" in row for row in history), history
    logged = [f for row in history for f in row.get("samples/grid.filenames", [])]
    assert logged == [str(grids[0].relative_to(offline / "files"))], history
    config = {}
    for r in records:
        config.update(r.get("config", {}).get("update", {}))
    assert config["model"]["latent_dim"] == 2 and config["data"]["name"] == "digits", config
    assert config["seed"] == 0 and config["monitor"] == "val/loss"


def test_wandb_goes_online_only_with_a_key(tmp_path, monkeypatch):
    from genframe.loggers import WandbLogger, wandb_api_key_available

    assert not wandb_api_key_available()
    assert WandbLogger(save_dir=str(tmp_path))._offline is True  # auto, no key
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_api_key_available()
    assert WandbLogger(save_dir=str(tmp_path))._offline is False
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # a key for another host
    assert not wandb_api_key_available()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert WandbLogger(save_dir=str(tmp_path), offline=True)._offline is True
    assert WandbLogger(save_dir=str(tmp_path))._offline is False
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(UserError, match=r"logger.wandb.offline=false: no W&B API key"):
        WandbLogger(save_dir=str(tmp_path), offline=False)
    with pytest.raises(UserError, match=r"expected auto, true or false, got 'yes'"):
        WandbLogger(save_dir=str(tmp_path), offline="yes")


# --- MLflow ------------------------------------------------------------------------------


def test_mlflow_store_holds_metrics_config_and_images(cli):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = _train(cli, "logger=mlflow", "logger.mlflow.tags={team: vision}", GRID)
    store = run / "logs" / "mlflow"
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "genframe"]
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "train" and found.data.tags["team"] == "vision"
    assert found.info.status == "FINISHED"
    history = client.get_metric_history(found.info.run_id, "val/loss")
    assert len(history) >= 1 and all(np.isfinite(m.value) for m in history)
    params = found.data.params
    assert params["model/latent_dim"] == "2" and params["data/name"] == "digits", params
    assert params["monitor"] == "val/loss"
    # Artifacts live beside the database, in the run's own folder.
    images = [a.path for a in client.list_artifacts(found.info.run_id, "images")]
    grid = [p for p in images if re.search(r"samples.grid\+step\+2\+.*\.png$", p)]
    final = [p for p in images if re.search(r"samples.final\+step\+2\+.*\.png$", p)]
    assert len(grid) == 1 and len(final) == 1, images
    assert str(store / "artifacts" / found.info.run_id) in found.info.artifact_uri
    local = Path(client.download_artifacts(found.info.run_id, grid[0], str(run / "dl")))
    np.testing.assert_array_equal(_rgb(local), _rgb(run / "samples" / "epoch_000" / "grid.png"))


@pytest.mark.slow
def test_a_resumed_run_goes_on_in_the_same_mlflow_run(cli):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = _train(cli, "logger=mlflow")
    assert json.loads((run / "run.json").read_text())["logger_runs"]["mlflow"]
    again = cli("resume", f"run={run}", "trainer.max_epochs=2")
    assert again.returncode == 0, again.stderr[-2000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'logs' / 'mlflow' / 'mlflow.db'}")
    (found,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    steps = [m.step for m in client.get_metric_history(found.info.run_id, "val/loss")]
    assert steps == sorted(steps) and len(steps) >= 2 and found.info.status == "FINISHED"


@pytest.mark.slow  # the message itself is checked fast below
def test_without_mlflow_logger_mlflow_names_the_extra(cli, tmp_path):
    # A package named mlflow that fails to import, first on the path: MLflow "not installed".
    shadow = tmp_path / "shadow" / "mlflow"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'mlflow'\")\n")
    result = cli("train", *FAST, "logger=mlflow", env={"PYTHONPATH": str(shadow.parent)})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "pip install 'genframe[mlflow]'" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# --- many, none, helpers -----------------------------------------------------------------


@pytest.mark.slow
def test_many_writes_csv_tensorboard_and_mlflow_but_not_wandb(cli):
    pytest.importorskip("mlflow")
    run = _train(cli, "logger=many")
    logs = run / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["csv", "mlflow", "tensorboard"]
    assert "val/loss" in (logs / "csv" / "metrics.csv").read_text().splitlines()[0]
    scalars = _events(logs / "tensorboard").Tags()["scalars"]
    assert "val/loss" in scalars and "final/val/loss" in scalars  # logged after fitting too
    assert (logs / "mlflow" / "mlflow.db").stat().st_size > 0
    assert list((logs / "mlflow" / "artifacts").rglob("samples~final+*.png"))


@pytest.mark.slow
def test_none_writes_no_logs_folder(cli):
    run = _train(cli, "logger=none")
    assert (run / "metrics.json").is_file()
    assert not (run / "logs").exists()


def test_logger_presets_compose(compose_task):
    from hydra.utils import get_class

    many = compose_task("train", "logger=many").logger
    assert sorted(many) == ["csv", "mlflow", "tensorboard"]
    assert many.mlflow.save_dir.endswith("/logs/mlflow") and many.mlflow.tracking_uri is None
    assert sorted(compose_task("train", "logger=[many,wandb]").logger) == \
        ["csv", "mlflow", "tensorboard", "wandb"]
    assert not compose_task("train", "logger=none").get("logger")
    wandb = compose_task("train", "logger=wandb").logger.wandb
    assert wandb.offline == "auto" and wandb.entity is None and list(wandb.tags) == []
    for name in ("csv", "tensorboard", "wandb", "mlflow"):
        entry = compose_task("train", f"logger={name}").logger[name]
        get_class(entry._target_)  # every preset names a class that exists


def test_mlflow_tracking_uri_from_the_environment(compose_task, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    cfg = compose_task("train", "logger=mlflow")
    assert cfg.logger.mlflow.tracking_uri == "http://mlflow.example:5000"


def test_mlflow_missing_is_a_user_error(tmp_path, monkeypatch):
    from genframe.loggers import MLFlowLogger

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    with pytest.raises(UserError, match=re.escape("pip install 'genframe[mlflow]'")):
        MLFlowLogger(save_dir=tmp_path)


def test_flat_params_and_text_markdown():
    from genframe.loggers import _texts_markdown, flat_params
    from genframe.samples import Samples

    flat = flat_params({"model": {"dims": [8, 16], "lr": 0.1, "name": None}, "seed": 0,
                        "on": True})
    assert flat == {"model/dims": "[8, 16]", "model/lr": 0.1, "model/name": "null",
                    "seed": 0, "on": True}
    text = _texts_markdown(Samples(texts=["a ``` b", "c"], conditions=[{"prompt": "x"}, {}]))
    assert text == ("**sample 0 {'prompt': 'x'}**\n\n````\na ``` b\n````\n\n"
                    "**sample 1**\n\n```\nc\n```")


def test_log_samples_and_config_skip_loggers_that_take_nothing(tmp_path):
    import torch

    from genframe.loggers import CSVLogger, log_config, log_samples
    from genframe.samples import Samples

    csv = CSVLogger(save_dir=tmp_path, name="", version="csv")
    log_samples([csv], Samples(images=torch.rand(2, 1, 8, 8)), step=3, key="samples/final")
    assert not (tmp_path / "csv").exists()  # nothing written for an image

    class _Trainer:
        loggers = [csv]

    log_config(_Trainer(), {"model": {"latent_dim": 2}})
    csv.save()
    assert "latent_dim: 2" in (tmp_path / "csv" / "hparams.yaml").read_text()


def test_self_log_skips_lightnings_move_to_the_device_it_is_on(monkeypatch):
    """`skip_repeated_metric_moves`: a value logged again on its device does not walk the
    running metric (Lightning's `to`); the epoch mean is still the batch-weighted mean, and
    a move to another device still happens."""
    from pytorch_lightning.trainer.connectors.logger_connector import result

    from genframe.loggers import skip_repeated_metric_moves

    installed = result._ResultMetric.to
    monkeypatch.setattr(result._ResultMetric, "to", getattr(installed, "_genframe_original", installed))
    assert skip_repeated_metric_moves()
    assert skip_repeated_metric_moves()  # idempotent
    walks = []
    real = result.apply_to_collection
    monkeypatch.setattr(result, "apply_to_collection", lambda *a, **k: walks.append(1) or real(*a, **k))
    collection = result._ResultCollection(training=True)
    values, sizes = [0.5, 2.0, -1.0, 4.0], [8, 2, 4, 1]
    for value, size in zip(values, sizes):
        collection.log("training_step", "train/loss", torch.tensor(value), on_step=True,
                       on_epoch=True, batch_size=size)
    assert walks == []
    metric = collection["training_step.train/loss"]
    expected = sum(v * n for v, n in zip(values, sizes)) / sum(sizes)
    assert metric.compute().item() == pytest.approx(expected)
    metric.to(torch.device("meta"))
    assert walks and metric.value.device.type == "meta"
    assert metric.cumulated_batch_size.device.type == "meta"


def test_building_a_trainer_installs_the_cheap_self_log(compose_task, monkeypatch):
    from pytorch_lightning.trainer.connectors.logger_connector import result

    from genframe.tasks.build import build_trainer
    from genframe.tasks.train import prepare_training

    installed = result._ResultMetric.to
    lightnings = getattr(installed, "_genframe_original", installed)
    monkeypatch.setattr(result._ResultMetric, "to", lightnings)
    cfg = compose_task("train", *FAST, "logger=none")
    build_trainer(cfg, prepare_training(cfg).model)
    assert result._ResultMetric.to is not lightnings
    assert result._ResultMetric.to._genframe_original is lightnings


def test_the_final_validation_is_logged_once_under_final(tiny_vae_run):
    import csv

    with open(tiny_vae_run / "logs" / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    curve = [r for r in rows if r.get("val/loss")]
    final = [r for r in rows if r.get("final/val/loss")]
    assert len(curve) == 1, rows  # one epoch: one validation while training, one point
    assert len(final) == 1, rows
    saved = json.loads((tiny_vae_run / "metrics.json").read_text())
    assert float(final[0]["final/val/loss"]) == pytest.approx(saved["val/loss"])


def test_samples_and_final_metrics_are_logged_from_rank_zero_only(tmp_path, monkeypatch):
    from pytorch_lightning.loggers import TensorBoardLogger
    from pytorch_lightning.utilities import rank_zero_only

    from genframe.loggers import log_final_metrics, log_samples
    from genframe.samples import Samples

    calls = []

    class Recording(TensorBoardLogger):  # records instead of writing, on any rank
        def log_metrics(self, metrics, step=None):
            calls.append(("metrics", metrics, step))

        def save(self):
            calls.append(("save",))

        @property
        def experiment(self):
            calls.append(("experiment",))
            return _Writer()

    class _Writer:
        def add_image(self, *args, **kwargs):
            calls.append(("image",))

        def flush(self):
            calls.append(("flush",))

    logger = Recording(save_dir=tmp_path)
    samples = Samples(images=torch.rand(2, 1, 8, 8))
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    log_final_metrics([logger], {"val/loss": 1.0}, 5)
    log_samples([logger], samples, 5)
    assert calls == []
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    log_final_metrics([logger], {"val/loss": 1.0}, 5)
    log_samples([logger], samples, 5)
    assert calls[:2] == [("metrics", {"final/val/loss": 1.0}, 5), ("save",)]
    assert ("image",) in calls


def test_a_failing_final_validation_ends_the_loggers_as_failed():
    from genframe.tasks.fit import _final_validation

    ended = []

    class Logger:
        def finalize(self, status):
            ended.append(status)

    class Trainer:
        loggers = [Logger()]

        def validate(self, *args, **kwargs):
            assert self.loggers == []  # detached: nothing goes on the curves
            raise RuntimeError("validation broke (simulated)")

    trainer = Trainer()
    with pytest.raises(RuntimeError, match="simulated"):
        _final_validation(trainer, model=None, data=None)
    assert ended == ["failed"] and len(trainer.loggers) == 1  # ended, and given back
