"""`Sampler`: the interface every diffusion sampler implements.

A sampler turns a trained denoiser into samples by running the reverse process. It knows
nothing about networks, labels or guidance: the model hands it a ``denoise(x_t, t)``
function that already applies conditioning and classifier-free guidance, and a
`NoiseSchedule` that says what the noise levels are. So one sampler works for every
diffusion model, and a model can be sampled with any registered sampler without
retraining (diffusers keeps schedulers apart from models the same way).

A third-party sampler subclasses `Sampler`, takes plain typed constructor arguments (they
are checked against the ``sampler:`` config) and registers itself with the
``genframe_register_samplers`` hook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from genframe.samplers.schedules import NoiseSchedule

#: ``denoise(x_t, t)``: x_t (B, C, H, W) at integer timesteps t (B,) -> the network's raw
#: output (the eps or v prediction), shaped like x_t.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Sampler:
    """Base class of diffusion samplers.

    Class attributes:
        name: the registered name (``sampler=name``), recorded in sample metadata.
    """

    name: ClassVar[str] = "sampler"

    def sample(
        self,
        denoise: Denoiser,
        schedule: NoiseSchedule,
        shape: tuple[int, ...],
        *,
        prediction: str,
        generator: torch.Generator,
        device: torch.device | str,
        clip_x0: bool = True,
    ) -> torch.Tensor:
        """Run the reverse process from pure noise and return x_0 samples.

        Args:
            denoise: the model, ``denoise(x_t, t) -> raw prediction``, with any
                conditioning and guidance already folded in.
            schedule: the noise schedule the model was trained with.
            shape: the shape of the batch of samples, e.g. (N, C, H, W).
            prediction: what `denoise` predicts, ``"eps"`` or ``"v"``.
            generator: the source of every random draw (the same generator state gives
                the same samples).
            device: where to run.
            clip_x0: clip the predicted x_0 to the data range [-1, 1] at every step
                (Ho et al. 2020's sampler does; it keeps few-step sampling stable).

        Returns:
            float32 tensor of `shape` in [-1, 1].
        """
        raise NotImplementedError

    def timesteps(self, schedule: NoiseSchedule) -> list[int]:
        """The training timesteps the sampler visits, noisiest first (one model call each)."""
        raise NotImplementedError

    def num_model_calls(self, schedule: NoiseSchedule) -> int:
        """How many times `sample` calls `denoise` (for benchmarks: cost is linear in it).

        With classifier-free guidance each call runs the network on a doubled batch.
        """
        return len(self.timesteps(schedule))

    def describe(self) -> dict[str, Any]:
        """The sampler's name and settings, for sample metadata (JSON-serialisable)."""
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"{type(self).__name__}({args})"

    @staticmethod
    def initial_noise(
        shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str
    ) -> torch.Tensor:
        """x_T ~ N(0, I), the starting point of the reverse process."""
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
