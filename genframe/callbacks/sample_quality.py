"""Image-quality metrics measured during training (`callbacks=sample_metrics`)."""

from __future__ import annotations

import pytorch_lightning as pl


class SampleQuality(pl.Callback):
    """Every `every_n_epochs` validation epochs, generate images and log ``val/fd``,
    ``val/precision``, ``val/recall`` (and ``val/class_accuracy`` for class-conditional
    models), so `monitor` and sweeps can use them.

    Args:
        every_n_epochs: how often (in validation epochs) to measure.
        num_samples: generated images per measurement.
        batch_size: images generated at once.
        extractor: ``classifier`` (trained on the data's labels, cached) or ``timm``.
        timm_model, timm_weights, timm_image_size: for ``extractor=timm`` (local weights).
        k: neighbourhood size of precision/recall.
        real: the real images to compare with: ``all`` (train + val), ``train`` or
            ``val``; never ``test`` (the test split must not choose the checkpoint).
        seed: seed of the generated images (the same every time, so epochs compare).
    """

    def __init__(self, every_n_epochs: int = 5, num_samples: int = 500, batch_size: int = 250,
                 extractor: str = "classifier", timm_model: str | None = None,
                 timm_weights: str | None = None, timm_image_size: int | None = None,
                 k: int = 3, real: str = "all", seed: int = 0) -> None:
        if real == "test":
            from genframe.errors import UserError

            raise UserError(
                "callbacks.sample_metrics.real=test: metrics measured during training pick "
                "the best checkpoint, so they must not see the test images; use all, train "
                "or val (genframe evaluate reports against the test split)")
        from genframe.metrics.model_metrics import check_metric_options

        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            from genframe.errors import UserError

            raise UserError(f"callbacks.sample_metrics.every_n_epochs={every_n_epochs!r}: "
                            "expected an integer >= 1")
        check_metric_options(num_samples=num_samples, batch_size=batch_size, extractor=extractor,
                             timm_model=timm_model, timm_weights=timm_weights,
                             timm_image_size=timm_image_size, k=k, real=real,
                             key="callbacks.sample_metrics", real_choices=("all", "train", "val"))
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.extractor_args = dict(extractor=extractor, timm_model=timm_model,
                                   timm_weights=timm_weights, timm_image_size=timm_image_size, k=k,
                                   real=real)
        self.seed = seed
        self.metrics = None
        self.last: dict[str, float] = {}

    @classmethod
    def metric_keys(cls, model, settings: dict) -> set[str]:
        """The metric keys this callback logs for `model` with these constructor
        `settings` (what a ``monitor`` may name): ``val/fd``, ``val/precision``,
        ``val/recall``, and ``val/class_accuracy`` for a class-conditional model measured
        with the data's classifier."""
        keys = {"val/fd", "val/precision", "val/recall"}
        if "label" in getattr(model, "needs", ()) and settings.get("extractor", "classifier") == "classifier":
            keys.add("val/class_accuracy")
        return keys

    def on_fit_start(self, trainer, pl_module) -> None:
        from genframe.metrics.model_metrics import data_image_metrics

        # Kept on the callback, not the module, so the extractor never enters a checkpoint.
        self.metrics = data_image_metrics(trainer.datamodule, **self.extractor_args)
        self.metrics.extractor.to(pl_module.device)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.metrics is None or trainer.sanity_checking:
            return
        due = (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if due or not self.last:  # measure on the first validation too
            from genframe.metrics.model_metrics import model_image_metrics

            values = model_image_metrics(pl_module, self.metrics, self.num_samples,
                                         batch_size=self.batch_size, seed=self.seed)
            # Overall figures only; per-class ones are in `genframe evaluate`'s metrics.
            self.last = {f"val/{k}": v for k, v in values.items() if "/" not in k}
        # Between measurements the last values are logged again, so a checkpoint or
        # early-stopping monitor on val/fd finds its key every epoch (an unchanged value
        # never counts as an improvement).
        for key, value in self.last.items():
            pl_module.log(key, value, rank_zero_only=True)
