"""The `Samples` value every model's `generate()` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Samples:
    """What a model generated, with what it was conditioned on.

    Args:
        images: float tensor in [0, 1] shaped (N, C, H, W), or None for text models.
        texts: list of N strings, or None for image models.
        conditions: one dict per sample with the condition used (e.g. ``{"label": 3}``),
            or empty dicts for unconditional samples.
        metadata: how the samples were made (model name, seed, sampler settings, ...).
        per_sample: details that differ between samples, as columns: each value a list
            with one entry per sample (e.g. ``{"tokens_generated": [12, 40]}``). The
            manifest gives each sample its own entry.
    """

    images: Any = None
    texts: list[str] | None = None
    conditions: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    per_sample: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.images is None) == (self.texts is None):
            raise ValueError("Samples holds either images or texts (exactly one of them)")
        if not self.conditions:
            self.conditions = [{} for _ in range(len(self))]
        if len(self.conditions) != len(self):
            raise ValueError(
                f"Samples: {len(self.conditions)} conditions for {len(self)} samples"
            )
        for key, column in self.per_sample.items():
            if len(column) != len(self):
                raise ValueError(f"Samples: per_sample[{key!r}] has {len(column)} entries "
                                 f"for {len(self)} samples")

    def __len__(self) -> int:
        return len(self.texts) if self.texts is not None else int(self.images.shape[0])

    @property
    def kind(self) -> str:
        return "text" if self.texts is not None else "image"
