"""genframe's loggers and what it sends to every logger.

``conf/logger/*.yaml`` name Lightning's loggers, or genframe's own where Lightning's do not
fit: a CSV logger that appends when a run is continued, a W&B logger that goes offline by
itself without an API key, an MLflow logger with a local store in the run directory.
`log_config` sends the composed config to every logger as hyperparameters; `log_samples`
sends a grid of image samples, or the text samples, to every logger that takes them.
"""

from __future__ import annotations

import csv
import json
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pytorch_lightning.loggers import CSVLogger as _LightningCSVLogger
from pytorch_lightning.loggers import MLFlowLogger as _LightningMLFlowLogger
from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn

from genframe.errors import UserError

MLFLOW_INSTALL = "pip install 'genframe[mlflow]'"


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that a ``metrics.csv`` already in the folder is kept
    and appended to (its columns read back), where Lightning's deletes it."""

    def _check_log_dir_exists(self) -> None:
        self._read_header()

    def _read_header(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            header = next(csv.reader(file), [])
        self.metrics_keys = sorted(set(header) | set(self.metrics_keys))

    def save(self) -> None:
        # Another process may have added columns since this writer last looked (under
        # trainer=ddp_spawn, fit and validate run in processes of their own, each with a
        # copy of this writer): the file's own header is the truth.
        if self.metrics:
            self._read_header()
        super().save()


class CSVLogger(_LightningCSVLogger):
    """Lightning's `CSVLogger` (``<save_dir>/<name>/<version>/metrics.csv``), continuing
    the file of a run that `genframe resume` continues in place instead of deleting it;
    the continued run's rows follow the earlier ones, with their global steps."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_api_key_available() -> bool:
    """Whether W&B would find an API key: ``WANDB_API_KEY``, or a ``.netrc`` entry (the
    file ``wandb login`` writes; ``$NETRC`` or ``~/.netrc``) for the W&B host
    (``$WANDB_BASE_URL``, default ``https://api.wandb.ai``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        entry = netrc.netrc(str(path)).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


class WandbLogger(_LightningWandbLogger):
    """Lightning's `WandbLogger`, offline unless a W&B API key is available.

    Args:
        offline: ``"auto"`` (online when `wandb_api_key_available`, else offline: the run
            is kept under ``<save_dir>/wandb/offline-run-*`` for a later ``wandb sync``),
            ``True`` or ``False`` (online; refused without an API key, where W&B would
            otherwise stop to ask for one). ``WANDB_MODE`` in the environment still
            applies to an online logger (``WANDB_MODE=disabled`` turns W&B off).
        **kwargs: Lightning's `WandbLogger` arguments and `wandb.init`'s (``project``,
            ``entity``, ``tags``, ``group``, ...).
    """

    def __init__(self, *, offline: bool | str = "auto", **kwargs: Any) -> None:
        if offline == "auto":
            offline = not wandb_api_key_available()
        elif not isinstance(offline, bool):
            raise UserError(f"logger.wandb.offline: expected auto, true or false, got {offline!r}")
        elif not offline and not wandb_api_key_available() and "WANDB_MODE" not in os.environ:
            raise UserError(
                "logger.wandb.offline=false: no W&B API key found (WANDB_API_KEY, or a "
                "~/.netrc entry from `wandb login`); log in, or use logger.wandb.offline=auto "
                "to log offline and `wandb sync` later")
        super().__init__(offline=offline, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # W&B warns about the unused setting
            self._wandb_init.pop("anonymous", None)


class MLFlowLogger(_LightningMLFlowLogger):
    """Lightning's `MLFlowLogger`, by default with a local MLflow store of the run's own.

    Args:
        save_dir: where the local store goes: ``<save_dir>/mlflow.db`` (SQLite: runs,
            parameters, metrics) and ``<save_dir>/artifacts/`` (images, texts), used when
            `tracking_uri` is empty. Read it with
            ``mlflow ui --backend-store-uri sqlite:///<save_dir>/mlflow.db``.
        tracking_uri: an MLflow tracking server or database (``http://host:5000``,
            ``sqlite:///path.db``, ``databricks``); empty for the local store.
        artifact_location: where a new experiment keeps its artifacts; by default
            ``<save_dir>/artifacts`` for the local store, the server's choice otherwise.
        **kwargs: Lightning's `MLFlowLogger` arguments (``experiment_name``,
            ``run_name``, ``tags``, ``log_model``, ``prefix``, ``run_id``).

    MLflow itself is an optional extra: without it this raises a `UserError` that names
    ``pip install 'genframe[mlflow]'``.
    """

    def __init__(self, save_dir: str | os.PathLike, tracking_uri: str | None = None,
                 artifact_location: str | None = None, **kwargs: Any) -> None:
        try:
            import mlflow  # noqa: F401
        except ImportError as exc:
            raise UserError(f"logger=mlflow needs MLflow, which is not installed ({exc}); "
                            f"install it with `{MLFLOW_INSTALL}`") from exc
        from filelock import FileLock

        if tracking_uri:
            super().__init__(tracking_uri=tracking_uri, artifact_location=artifact_location,
                             save_dir=os.fspath(save_dir), **kwargs)
            return
        # MLflow 3 refuses (3.13+) or warns about a plain-folder store: its supported local
        # store is SQLite, with artifacts in a folder beside it.
        folder = Path(save_dir).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        # Building the client creates the database's tables; on several processes (DDP)
        # only one may do it at a time.
        with FileLock(str(folder / ".mlflow.db.lock")):
            super().__init__(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
                             artifact_location=artifact_location or str(folder / "artifacts"),
                             save_dir=str(folder), **kwargs)

    @property
    def experiment(self) -> Any:
        # MLflow's set_tracking_uri (called by Lightning here) exports the URI to
        # $MLFLOW_TRACKING_URI: this run's store would become the next run's in the same
        # process (the jobs of a sweep), which read that variable as the user's setting.
        before = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            return super().experiment
        finally:
            if before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before


def config_params(cfg: Any) -> dict[str, Any]:
    """The composed config as a plain nested dict, interpolations resolved where they
    can be (a config read back outside Hydra keeps ``${hydra:...}`` as written)."""
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(cfg):
        return dict(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that cannot resolve here: keep it as text
        return OmegaConf.to_container(cfg, resolve=False)


@rank_zero_only
def log_config(trainer: Any, cfg: Any) -> None:
    """Log the composed config (resolved) as hyperparameters to every logger of `trainer`.

    Each logger stores it its own way: nested in W&B's run config, flattened to
    ``model/latent_dim``-style keys in TensorBoard's hparams and MLflow's parameters,
    ``hparams.yaml`` beside the CSV. A logger that refuses it is warned about, and the
    run goes on. Only rank zero logs.
    """
    from pytorch_lightning.loggers import TensorBoardLogger

    params = config_params(cfg)
    for logger in trainer.loggers:
        try:
            logger.log_hyperparams(params)
            if isinstance(logger, TensorBoardLogger):
                # Lightning writes TensorBoard's HPARAMS record only with a metric (the
                # `hp_metric` genframe turns off); without one the config is only in
                # hparams.yaml. The HPARAMS tab takes the run's scalars as its metrics.
                from tensorboard.plugins.hparams.summary_v2 import hparams_pb

                logger.experiment._get_file_writer().add_summary(hparams_pb(flat_params(params)))
        except Exception as exc:  # losing the config in one logger must not end the run
            rank_zero_warn(f"{type(logger).__name__} did not take the config as "
                           f"hyperparameters: {exc}")


def flat_params(params: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """`params` flattened to ``a/b/c`` keys with scalar values (lists and None as text),
    as TensorBoard's hyperparameters take them."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


@rank_zero_only
def log_final_metrics(loggers: list[Any], metrics: dict[str, float], step: int) -> None:
    """Log the metrics of the run's final validation (the weights the run saved) to every
    logger once, as ``final/<key>`` at `step` (the last one), so that the ``val/*`` curves
    hold only what was measured while training. Only rank zero logs. A logger that fails
    (a server gone) is warned about and skipped: the trained run is not lost to it."""
    if not metrics:
        return
    final = {f"final/{key}": value for key, value in metrics.items()}
    for logger in loggers:
        try:
            logger.log_metrics(final, step=step)
            logger.save()
        except Exception as exc:  # losing them in one logger must not end the run
            rank_zero_warn(f"{type(logger).__name__} did not take the final metrics: {exc}")


@rank_zero_only
def log_samples(loggers: list[Any], samples: Any, step: int, key: str = "samples") -> None:
    """Send `samples` (a `genframe.samples.Samples`) to every logger that takes them.

    Images go as one grid (the same picture as the ``grid.png`` the sample writer makes),
    texts as one text with every sample: TensorBoard (``add_image``/``add_text`` under
    `key`), W&B (an image or a table under `key`), MLflow (``log_image`` under `key`, a
    text file ``<key>/step_XXXXXX.txt`` among the run's artifacts). CSV and other loggers
    take nothing. Only rank zero logs.

    Args:
        loggers: the trainer's loggers (``trainer.loggers``).
        samples: what a model's ``generate()`` returned.
        step: the global step the samples belong to.
        key: the name they are logged under (``samples/grid``, ``samples/final``).
    """
    from pytorch_lightning.loggers import TensorBoardLogger

    takers = [lg for lg in loggers
              if isinstance(lg, (TensorBoardLogger, _LightningWandbLogger, _LightningMLFlowLogger))]
    if not takers or len(samples) == 0:
        return
    grid = _grid_array(samples) if samples.kind == "image" else None
    text = None if grid is not None else _texts_markdown(samples)
    for logger in takers:
        if isinstance(logger, TensorBoardLogger):
            if grid is not None:
                logger.experiment.add_image(key, grid, global_step=step, dataformats="HWC")
            else:
                logger.experiment.add_text(key, text, global_step=step)
            logger.experiment.flush()
        elif isinstance(logger, _LightningWandbLogger):
            if grid is not None:
                logger.log_image(key=key, images=[grid], step=step)
            else:
                rows = [[i, str(c), t] for i, (c, t) in
                        enumerate(zip(samples.conditions, samples.texts))]
                logger.log_text(key=key, columns=["sample", "condition", "text"], data=rows,
                                step=step)
        else:  # MLflow
            if grid is not None:
                logger.experiment.log_image(logger.run_id, grid, key=key, step=step)
            else:
                logger.experiment.log_text(logger.run_id, text, f"{key}/step_{step:06d}.txt")


def _grid_array(samples: Any):
    """The sample writer's grid of the first `GRID_MAX` images, as (H, W, 3) uint8."""
    import numpy as np

    from genframe.sample_writer import GRID_MAX, grid_image

    return np.asarray(grid_image(samples.images[:GRID_MAX], 256).convert("RGB"))


def _texts_markdown(samples: Any) -> str:
    """Every text sample under a numbered heading (with its condition), each in a code
    block so that TensorBoard's Markdown shows it as written."""
    parts = []
    for i, (condition, text) in enumerate(zip(samples.conditions, samples.texts)):
        head = f"sample {i}" + (f" {condition}" if condition else "")
        fence = "````" if "```" in text else "```"
        parts.append(f"**{head}**\n\n{fence}\n{text}\n{fence}")
    return "\n\n".join(parts)


def skip_repeated_metric_moves() -> bool:
    """Make ``self.log`` stop re-moving a logged value's running state to the device it
    is already on; returns whether the change is in place.

    Lightning's ``_ResultCollection.log`` calls ``_ResultMetric.to(value.device)`` on every
    ``self.log`` call, and that walks the metric's whole ``__dict__`` (a torchmetrics
    ``Metric``: ~50 attributes, recursively) to move its tensors: 335 us a call on a 2.45
    GHz AVX2 core, 73 us with this; the small GAN's six calls a batch made `genframe
    train` 0.91x of a plain loop (``bench/log_cost.py`` measures both paths side by side).
    Here ``to(device)`` returns at once when every tensor Lightning's move would reach
    (its states, their defaults, the cached values; the walk is the same one, without
    the copies) is on `device` already; any other call, a device
    change (the first log on a GPU, Lightning's move to the CPU after fitting) or a metric
    wrapping a torchmetrics object, takes Lightning's own path. Applied only while
    ``_ResultMetric.to`` is Lightning's own method (as in 2.6); a version that moves or
    renames it keeps its behaviour and its cost. Idempotent.
    """
    import dataclasses

    import torch
    from pytorch_lightning.trainer.connectors.logger_connector import result
    from torchmetrics import Metric

    metric_cls = getattr(result, "_ResultMetric", None)
    original = getattr(metric_cls, "to", None)
    if getattr(original, "_genframe_skips_repeated_moves", False):
        return True
    if original is None or original.__qualname__ != "_ResultMetric.to" \
            or original.__module__ != result.__name__:
        return False

    plain = {type(None), bool, int, float, str, torch.device, torch.dtype, type(len), type(lambda: 0)}

    def settled(value: Any, device: torch.device) -> bool:
        """Whether Lightning's move would leave `value` as it is: every tensor in it (in
        the containers Lightning's ``apply_to_collection`` walks) is on `device`."""
        kind = type(value)
        if kind in plain:
            return True
        if isinstance(value, torch.Tensor):
            return value.device == device
        if isinstance(value, dict):
            return all(settled(v, device) for v in value.values())
        if isinstance(value, (list, tuple)):
            return all(settled(v, device) for v in value)
        if isinstance(value, Metric):  # a logged torchmetrics object: Lightning moves it
            return False
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return all(settled(getattr(value, f.name), device) for f in dataclasses.fields(value))
        return True

    def to(self, *args: Any, **kwargs: Any):
        device = args[0] if len(args) == 1 and not kwargs else None
        if isinstance(device, torch.device) and settled(self.__dict__, device):
            return self
        return original(self, *args, **kwargs)

    to._genframe_skips_repeated_moves = True
    to._genframe_original = original  # for bench/log_cost.py's side by side
    to.__doc__ = original.__doc__
    metric_cls.to = to
    return True
