"""Loggers of genframe's own, where Lightning's do not fit a run that is continued.

``conf/logger/*.yaml`` name them as ``genframe.loggers.<Class>``.
"""

from __future__ import annotations

import csv

from pytorch_lightning.loggers import CSVLogger as _LightningCSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that a ``metrics.csv`` already in the folder is kept
    and appended to (its columns read back), where Lightning's deletes it."""

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            header = next(csv.reader(file), [])
        self.metrics_keys = sorted(header)


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
