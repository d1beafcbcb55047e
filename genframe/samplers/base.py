"""`Sampler`: the interface every diffusion sampler implements.

A sampler turns a trained denoiser into samples by running the reverse process. It knows
nothing about networks, labels or guidance: the model hands it a ``denoise(x_t, t)``
function that already applies conditioning and classifier-free guidance, and a
`NoiseSchedule` that says what the noise levels are. So one sampler works for every
diffusion model, and a model can be sampled with any registered sampler without
retraining (diffusers keeps schedulers apart from models the same way).

A starting point (image-to-image, SDEdit: Meng et al. 2021, "SDEdit: Guided Image
Synthesis and Editing with Stochastic Differential Equations",
https://arxiv.org/abs/2108.01073): instead of pure noise at the sampler's first step, the
reverse process can start from a given x_t at one of the sampler's own steps. `sample`
takes ``start`` (an index into `timesteps`: the steps ``timesteps[start:]`` run) and
``x_start`` (x at timestep ``timesteps[start]``). For an image, `start_for_strength` turns
a strength in (0, 1] into that index (it runs round(strength * steps) of the steps, as
diffusers' img2img does) and `noise_to_start` draws x_t ~ q(x_t | x_0) there. Strength 1
starts from pure noise with the very draw plain sampling makes, so it is plain sampling.

A third-party sampler subclasses `Sampler`, takes plain typed constructor arguments (they
are checked against the ``sampler:`` config) and registers itself with the
``genframe_register_samplers`` hook.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from genframe.errors import UserError
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
        start: int = 0,
        x_start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the reverse process from pure noise (or from `x_start`) and return x_0 samples.

        Args:
            denoise: the model, ``denoise(x_t, t) -> raw prediction``, with any
                conditioning and guidance already folded in.
            schedule: the noise schedule the model was trained with.
            shape: the shape of the batch of samples, e.g. (N, C, H, W).
            prediction: what `denoise` predicts, ``"eps"`` or ``"v"``.
            generator: the source of every random draw (the same generator state gives
                the same samples).
            device: where to run.
            clip_x0: clip the predicted x_0 to the data range [-1, 1] at every step, and
                the result (Ho et al. 2020's sampler does; it keeps few-step sampling
                stable). Off for data not bounded by 1, such as a latent diffusion
                model's scaled latents.
            start: the index in ``timesteps(schedule)`` of the first step to run; the
                steps ``timesteps(schedule)[start:]`` run (one model call each). 0: all.
            x_start: x_t at t = ``timesteps(schedule)[start]``, shaped `shape` (e.g. from
                `noise_to_start`). None: pure noise x_T ~ N(0, I) drawn from `generator`,
                which only fits ``start=0``.

        Returns:
            float32 tensor of `shape`, in [-1, 1] with `clip_x0`.
        """
        raise NotImplementedError

    def timesteps(self, schedule: NoiseSchedule) -> list[int]:
        """The training timesteps the sampler visits, noisiest first (one model call each)."""
        raise NotImplementedError

    def num_model_calls(self, schedule: NoiseSchedule, start: int = 0) -> int:
        """How many times `sample` calls `denoise` (for benchmarks: cost is linear in it).

        With classifier-free guidance each call runs the network on a doubled batch.
        `start`: the first step's index, as in `sample`.
        """
        return len(self.timesteps(schedule)) - start

    def start_for_strength(self, schedule: NoiseSchedule, strength: float) -> int:
        """The `start` index that runs round(strength * S) of this sampler's S steps.

        SDEdit's t0 (Meng et al. 2021) on the sampler's own grid, as in diffusers'
        img2img: strength 1 runs every step (start 0, from pure noise); smaller strengths
        skip the noisiest steps and keep more of the starting image. Rounding is half up
        (2.5 steps -> 3), and at least one step runs.

        Raises:
            UserError: `strength` is not a number in (0, 1].
        """
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (
            0.0 < strength <= 1.0
        ):
            raise UserError(
                f"strength must be a number in (0, 1] (1: from pure noise, as plain "
                f"sampling; small: close to the init image), got {strength!r}"
            )
        num = len(self.timesteps(schedule))
        run = min(num, max(1, math.floor(strength * num + 0.5)))
        return num - run

    def noise_to_start(
        self,
        x0: torch.Tensor,
        schedule: NoiseSchedule,
        start: int,
        *,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The starting point x_t ~ q(x_t | x_0) at t = ``timesteps(schedule)[start]``.

        x0: clean data (B, C, H, W) in [-1, 1]. One N(0, I) draw of x0's shape is taken
        from `generator` either way; at ``start=0`` that draw is returned as it is (pure
        noise x_T, the draw plain sampling makes: the same seed gives the same samples),
        otherwise it noises x0 with the schedule's forward process.
        """
        noise = self.initial_noise(tuple(x0.shape), generator, x0.device)  # (B, C, H, W)
        if start == 0:
            return noise
        t = self.timesteps(schedule)[start]
        t_batch = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        return schedule.q_sample(x0.float(), t_batch, noise)

    def starting_point(
        self,
        timesteps: list[int],
        shape: tuple[int, ...],
        *,
        start: int,
        x_start: torch.Tensor | None,
        generator: torch.Generator,
        device: torch.device | str,
    ) -> torch.Tensor:
        """Check `start` / `x_start` (see `sample`) and return the first x_t, float32.

        Samplers call it first thing in `sample`; without `x_start` it draws x_T.
        """
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < len(timesteps):
            raise ValueError(f"start must be an index into the {len(timesteps)} sampler "
                             f"steps (0 .. {len(timesteps) - 1}), got {start!r}")
        if x_start is None:
            if start != 0:
                raise ValueError(f"start={start} needs x_start, the x_t at timestep "
                                 f"{timesteps[start]}")
            return self.initial_noise(shape, generator, device)
        if tuple(x_start.shape) != tuple(shape):
            raise ValueError(f"x_start has shape {tuple(x_start.shape)}, expected {tuple(shape)}")
        return x_start.to(device=device, dtype=torch.float32)

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
