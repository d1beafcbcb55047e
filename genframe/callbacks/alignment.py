"""Text-image alignment measured during training (`callbacks=alignment`)."""

from __future__ import annotations

import pytorch_lightning as pl

from genframe.errors import UserError


class PromptAlignment(pl.Callback):
    """Every `every_n_epochs` validation epochs, generate one image for each of the first
    `num_prompts` validation captions and log how often all of a prompt's attributes came
    out (``val/alignment``, `genframe.metrics.alignment`) and each attribute's share
    (``val/alignment_colour``, ``_shape``, ``_size``, ``_position``), so ``monitor=
    val/alignment monitor_mode=max`` can pick checkpoints by it.

    For text-to-image models trained on shapes captions (``data=shapes``). Images are
    made with DDIM in `steps` steps (fewer than at generate time: the figure tracks
    progress, `genframe evaluate` gives the final one) and the model's guidance unless
    `guidance` is set; the same seed every time, so epochs compare.

    Args:
        every_n_epochs: how often (in validation epochs) to measure; also on the first.
        num_prompts: validation captions used (the first ones).
        batch_size: images generated at once.
        steps: DDIM steps.
        guidance: classifier-free guidance scale (null: the model's).
        seed: seed of the generated images.
    """

    ASPECTS = ("colour", "shape", "size", "position")

    def __init__(self, every_n_epochs: int = 5, num_prompts: int = 64, batch_size: int = 64,
                 steps: int = 20, guidance: float | None = None, seed: int = 0) -> None:
        for key, value in (("every_n_epochs", every_n_epochs), ("num_prompts", num_prompts),
                           ("batch_size", batch_size), ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"callbacks.alignment.{key}={value!r}: expected an integer >= 1")
        if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                     or guidance < 0):
            raise UserError(f"callbacks.alignment.guidance={guidance!r}: expected a number >= 0, "
                            "or null for the model's")
        self.every_n_epochs = every_n_epochs
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.steps = steps
        self.guidance = guidance
        self.seed = seed
        self.prompts: list[str] = []
        self.last: dict[str, float] = {}

    @classmethod
    def metric_keys(cls, model, settings: dict) -> set[str]:
        """What this callback logs: ``val/alignment`` and one share per attribute."""
        return {"val/alignment"} | {f"val/alignment_{a}" for a in cls.ASPECTS}

    def on_fit_start(self, trainer, pl_module) -> None:
        from genframe.data.shapes import parse_caption
        from genframe.data.base import split_captions

        name = getattr(pl_module, "registered_name", type(pl_module).__name__)
        if "prompt" not in getattr(pl_module, "condition_keys", ()) or "image" not in pl_module.needs:
            raise UserError(f"callbacks=alignment: model '{name}' does not make images from "
                            "prompts; it suits text-to-image models (model=text2image)")
        data = trainer.datamodule
        if "caption" not in getattr(data, "provides", ()):
            raise UserError("callbacks=alignment needs captioned data (data=shapes)")
        self.prompts = [c for c in split_captions(data, "val", self.num_prompts)
                        if parse_caption(c) is not None]
        if not self.prompts:
            raise UserError("callbacks=alignment: the validation captions are not shapes "
                            "captions, which the alignment metric reads; use data=shapes")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.prompts or trainer.sanity_checking:
            return
        due = (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if due or not self.last:
            from genframe.metrics.model_metrics import model_alignment
            from genframe.samplers.ddim import DDIMSampler

            options = {"sampler": DDIMSampler(steps=self.steps)}
            if self.guidance is not None:
                options["guidance"] = float(self.guidance)
            values = model_alignment(pl_module, self.prompts, batch_size=self.batch_size,
                                     seed=self.seed, **options)
            self.last = {f"val/{k}": v for k, v in values.items()
                         if k == "alignment" or k[len("alignment_"):] in self.ASPECTS}
        # Logged every epoch (the last measurement between two), so a monitor finds it.
        for key, value in self.last.items():
            pl_module.log(key, value, rank_zero_only=True)
