"""A denoising diffusion model with a U-Net, DDIM/DDPM sampling and classifier-free guidance.

Ho et al. 2020 ("DDPM", https://arxiv.org/abs/2006.11239): noise the data with the
forward process x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps at a uniformly drawn timestep t,
and train a U-Net to predict eps (or v, Salimans & Ho 2022) with a plain MSE, the "simple"
loss. Sampling runs the reverse process with a `genframe.samplers.Sampler` chosen at
generate time (DDIM by default, Song et al. 2021), using an exponential moving average of
the weights.

With ``autoencoder`` (the run directory of a ``model=autoencoder`` run) the model is a
latent diffusion model (Rombach et al. 2022, https://arxiv.org/abs/2112.10752): the U-Net
denoises the autoencoder's spatial latent, scaled to unit variance, and samples are
decoded to images at the end; the autoencoder's weights are copied into this model.

With ``num_classes > 0`` the U-Net also sees a label embedding; training replaces the
label by a "null" label with probability ``label_dropout`` so one network learns both the
conditional and the unconditional model, and sampling mixes the two predictions with a
guidance scale w (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598):

    eps = eps_uncond + w * (eps_cond - eps_uncond)

The network (`unet.py`), the noise schedule and the samplers (`genframe.samplers`) are
separate objects; this module holds the objective, the EMA and the generate() glue.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F

from torch import nn

from genframe.errors import UserError, argument_check, valid_list
from genframe.exporters import ExportGraph, latent_decoder_graph
from genframe.module import GenerativeModule
from genframe.optim import adamw
from genframe.samplers.base import Sampler
from genframe.samplers.ddim import DDIMSampler
from genframe.samplers.schedules import make_schedule
from genframe.samples import Samples

from .unet import UNet, level_sides

log = logging.getLogger("genframe")

MAX_GUIDANCE = 50.0
DEFAULT_STRENGTH = 0.8  # image-to-image without a strength: diffusers' img2img default


class Diffusion(GenerativeModule):
    """Denoising diffusion model on images in [-1, 1], optionally class-conditional.

    Args:
        in_channels: image channels (``data.channels``).
        image_size: image side in pixels (``data.image_size``); any size, odd included.
        num_classes: 0 for an unconditional model; K > 0 makes it class-conditional: it
            reads ``batch["label"]`` and generates with ``condition={"label": k}`` and a
            classifier-free guidance scale.
        block_out_channels: U-Net widths per level, highest resolution first; each level after the
            first halves the spatial size.
        blocks_per_level: residual blocks per U-Net level (on the way down; one more on
            the way up).
        attention_resolutions: spatial sides of the levels that get self-attention, e.g.
            ``[4]``: the 4x4 level of 8x8 images. Must name levels that exist; ``[]`` keeps
            attention only in the middle block; None (the default) picks the
            lowest-resolution level, so any image size works without an override.
        num_heads: attention heads (must divide the widths of the attention levels and
            of the last level).
        dropout: dropout inside the residual blocks.
        timesteps: T, the number of diffusion steps of training (and of DDPM sampling).
        schedule: the noise schedule, ``"linear"`` (DDPM) or ``"cosine"`` (Nichol &
            Dhariwal 2021; better for small images).
        prediction: what the network predicts: ``"eps"`` (the noise) or ``"v"``
            (sqrt(ab) eps - sqrt(1 - ab) x0).
        label_dropout: probability of replacing a training label by the null label; it
            trains the unconditional model that classifier-free guidance needs.
        guidance: the default classifier-free guidance scale of a conditional model (1:
            plain conditional; larger: closer to the class, less varied); ``generate``
            can override it.
        ema_decay: decay of the exponential moving average of the weights used for
            validation and sampling; 0 disables the EMA (the online weights are used).
        ema_start_step: the EMA copies the online weights until this optimizer step,
            then averages (skips the random-init phase).
        lr: AdamW learning rate (read when the optimizer is built, so fine-tuning can
            change ``hparams.lr``).
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up over this many optimizer steps; 0 = off.
        default_sampler_steps: DDIM steps used when ``generate`` gets no sampler.
        autoencoder: the run directory of a trained ``model=autoencoder`` whose latent
            space the U-Net works in (latent diffusion): batches are encoded (a draw from
            q(z|x)), multiplied by ``latent_scale``, and samples decoded at the end. Its
            ``in_channels`` and ``image_size`` must be this model's; the U-Net is built at
            the latent's shape (c, h, w), so ``attention_resolutions`` names latent sides.
            Its weights and description are copied into this model (``autoencoder_spec``),
            so the run needs that directory no more. None: pixel space.
        autoencoder_spec: the autoencoder's description, recorded from `autoencoder`
            (not set by hand).
        latent_scale: the factor that scales the latent to unit variance (Stable
            Diffusion's 0.18215). None: 1 / std of the latents of the first batch the
            model encodes, as Latent Diffusion measures it, kept with the weights.

    Logs ``train/loss`` (the simple loss: MSE of the eps or v prediction) and ``val/loss``
    (the same loss with the EMA weights, at noise levels and noise drawn from a fixed seed
    per validation batch, so epochs are comparable).
    """

    # Runs saved before the rename called the width list `channels`.
    renamed_arguments = {"channels": "block_out_channels"}
    # LoRA on the U-Net's attention layers (the online copy; the EMA copy follows it).
    lora_target_modules = ("unet.*.qkv", "unet.*.proj")

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = 0,
        block_out_channels: list[int] = (64, 128),  # type: ignore[assignment]  # immutable default
        blocks_per_level: int = 2,
        attention_resolutions: list[int] | None = None,
        num_heads: int = 4,
        dropout: float = 0.0,
        timesteps: int = 1000,
        schedule: Literal["linear", "cosine"] = "cosine",
        prediction: Literal["eps", "v"] = "eps",
        label_dropout: float = 0.1,
        guidance: float = 1.0,
        ema_decay: float = 0.999,
        ema_start_step: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        default_sampler_steps: int = 50,
        autoencoder: str | None = None,
        autoencoder_spec: dict[str, Any] | None = None,
        latent_scale: float | None = None,
    ) -> None:
        super().__init__()
        # Plain lists in hparams, whatever sequence came in.
        block_out_channels = [int(c) for c in block_out_channels]
        first_stage = _borrowed_autoencoder(autoencoder, autoencoder_spec, in_channels, image_size)
        # The U-Net's space: the image's, or the autoencoder's latent (c, h, w).
        net_shape = (in_channels, image_size, image_size) if first_stage is None else \
            tuple(first_stage[1].latent_shape)
        if attention_resolutions is None:  # the lowest-resolution level, whatever the size
            attention_resolutions = [level_sides(net_shape[1:], len(block_out_channels))[-1]]
        attention_resolutions = [int(r) for r in attention_resolutions]
        _validate(locals())
        self.save_hyperparameters()

        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.prediction = prediction
        self.net_shape: tuple[int, int, int] = net_shape  # (C, H, W) the U-Net denoises
        self.set_class_conditional(num_classes)
        self.autoencoder: nn.Module | None = None
        if first_stage is not None:
            description, ae = first_stage
            # Frozen (only the U-Net learns) and run in eval mode (`_eval_mode`).
            self.autoencoder = ae.requires_grad_(False)
            # 0 = not measured yet (`to_latent` measures it on the first batch).
            self.register_buffer("latent_scale", torch.tensor(float(latent_scale or 0.0)))
            # The description goes in this model's own: the run needs no other.
            self.resolved_arguments = {**self.resolved_arguments, "autoencoder_spec": description}

        # A plain object, not a module: it is fixed by (schedule, timesteps), so it is
        # rebuilt from the hyperparameters rather than stored in checkpoints.
        self.schedule = make_schedule(schedule, timesteps)
        self.unet = self.build_unet(
            in_channels=net_shape[0], image_size=net_shape[1:],
            block_out_channels=block_out_channels, blocks_per_level=blocks_per_level,
            attention_resolutions=attention_resolutions,
            num_heads=num_heads, dropout=dropout, num_classes=num_classes,
            **self.unet_conditioning(),
        )
        # The EMA is a second copy of the network: a submodule, so `state_dict()` (and
        # with it Lightning checkpoints and the safetensors weights) carries it, but with
        # requires_grad off and left out of the optimizer. Not Lightning's
        # EMAWeightAveraging callback: that lives outside the model, so a weights file or
        # generate() outside a Trainer would not see the average. The update is ten lines
        # (`update_ema`), with the warm-up and start step diffusion training uses.
        self.ema_unet: UNet | None = None
        if ema_decay > 0:
            self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)

    # -- networks ---------------------------------------------------------------------

    def unet_conditioning(self) -> dict[str, Any]:
        """More `UNet` arguments, for a subclass that conditions it on more than a label
        (a text model returns ``context_dim``). Called once from ``__init__``, after the
        hyperparameters are saved and before the U-Net is built."""
        return {}

    def activation_checkpointing_blocks(self) -> tuple[type[nn.Module], ...]:
        """The U-Net's residual and attention blocks."""
        from genframe.layers.attention import SelfAttention2d, SpatialTransformer
        from genframe.layers.conv import ResBlock

        return (ResBlock, SelfAttention2d, SpatialTransformer)

    def build_unet(self, **unet: Any) -> UNet:
        """The denoising network, from `UNet`'s arguments (in the U-Net's space: the
        latent's channels and size with an autoencoder). A subclass that needs another
        network of the same interface (more input channels) returns it here; called once
        from ``__init__``, after `unet_conditioning`."""
        return UNet(**unet)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The online network's raw prediction (eps or v) at (x_t, t): (B, C, H, W)."""
        return self.unet(x_t, t, label)

    # -- export -------------------------------------------------------------------------

    def export_graphs(self) -> dict[str, ExportGraph]:
        """``unet``: one denoising step of the sampling network (the EMA copy when there
        is one), ``sample`` (B, C, H, W) in the U-Net's space and ``timestep`` (B,) long
        -> ``model_output`` (the eps or v prediction), plus the conditioning inputs of
        `unet_export_inputs`; with an autoencoder also ``vae_decoder``: latents of the
        U-Net's space (B, c, h, w) -> images (B, C, H, W) in [0, 1] (the division by
        ``latent_scale`` included). The notes give the noise schedule a sampler needs."""
        def inputs(batch: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
            gen = torch.Generator().manual_seed(batch)
            made = {"sample": torch.randn((batch, *self.net_shape), generator=gen),
                    "timestep": torch.randint(0, self.schedule.num_steps, (batch,), generator=gen)}
            extra = self.unet_export_inputs(batch, gen)
            made.update({name: tensor for name, (_, tensor) in extra.items()})
            return ({k: v.to(self.device) for k, v in made.items()},
                    {name: kwarg for name, (kwarg, _) in extra.items()})

        example, kwargs = inputs(2)
        dynamic = {name: {0: "batch"} for name in example}
        for name, axes in self.unet_export_axes().items():
            dynamic[name] = {**dynamic[name], **axes}
        notes = {
            "model_output": f"the {self.prediction} prediction (prediction={self.prediction})",
            "schedule": self.schedule.kind,
            "num_train_timesteps": self.schedule.num_steps,
            "alphas_cumprod": [round(float(a), 8) for a in self.schedule.alphas_cumprod],
            **self.unet_export_notes(),
        }
        graphs = {"unet": ExportGraph(_UNetStep(self.sampling_net, kwargs), example, ("model_output",),
                                      dynamic, check_inputs=[inputs(3)[0]], notes=notes)}
        if self.autoencoder is not None:
            graphs["vae_decoder"] = latent_decoder_graph(
                _LatentDecoder(self), self.net_shape,
                notes={"latents": "what the U-Net sampled (scaled by latent_scale)",
                       "images": "(B, C, H, W) in [0, 1]", "latent_scale": float(self.latent_scale)})
        return graphs

    def unet_export_inputs(self, batch: int, gen: torch.Generator) -> dict[str, tuple[str, torch.Tensor]]:
        """The exported U-Net step's inputs after ``sample`` and ``timestep``: name ->
        (the network's keyword argument, an example of `batch` rows). A class-conditional
        model adds ``class_labels`` (B,); a subclass with other conditioning adds its own."""
        if not self.num_classes:
            return {}
        labels = torch.randint(0, self.num_classes + 1, (batch,), generator=gen)
        return {"class_labels": ("label", labels)}

    def unet_export_axes(self) -> dict[str, dict[int, str]]:
        """Axes of `unet_export_inputs` that may change size besides the batch (axis 0)."""
        return {}

    def unet_export_notes(self) -> dict[str, Any]:
        """What an application needs to know about `unet_export_inputs`."""
        if not self.num_classes:
            return {}
        return {"class_labels": f"class ids 0..{self.num_classes - 1}; {self.null_label} is the "
                                "null label of classifier-free guidance"}

    # -- latent space ---------------------------------------------------------------

    def to_latent(self, x: torch.Tensor, *, sample: bool = False) -> torch.Tensor:
        """What the U-Net denoises for images x (B, C, H, W) in [-1, 1]: x itself, or with
        an autoencoder its latent (B, c, h, w) times ``latent_scale`` -- the posterior
        mean, or a draw from q(z|x) with `sample` (training, as Latent Diffusion does)."""
        if self.autoencoder is None:
            return x
        with torch.no_grad(), _eval_mode(self.autoencoder):
            z = self.autoencoder.encode_latents(x, sample=sample)
        if float(self.latent_scale) <= 0:
            self._measure_latent_scale(z)
        return z * self.latent_scale

    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] for what the U-Net made (identity in pixel space).

        A latent model that has not yet measured ``latent_scale`` (no batch seen: an
        untrained model, as in the checks before training) decodes with scale 1; the
        samples' metadata then records ``latent_scale: null``.
        """
        if self.autoencoder is None:
            return z
        scale = float(self.latent_scale)
        with _eval_mode(self.autoencoder):
            return self.autoencoder.decode_latents(z / scale if scale > 0 else z)

    @torch.no_grad()
    def _measure_latent_scale(self, z: torch.Tensor) -> None:
        """latent_scale = 1 / std(z) of the first batch (Latent Diffusion's
        ``scale_by_std``), the mean over processes when several train."""
        std = z.float().std()
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:
            std = trainer.strategy.reduce(std, reduce_op="mean")
        self.latent_scale.fill_(1.0 / float(std.clamp_min(1e-8)))
        log.info("latent_scale = 1 / std of the first batch's latents = %.5g", float(self.latent_scale))

    @property
    def sampling_net(self) -> UNet:
        """The network validation and sampling use: the EMA copy when there is one."""
        return self.ema_unet if self.ema_unet is not None else self.unet

    @property
    def null_label(self) -> int:
        return self.num_classes

    # -- objective --------------------------------------------------------------------

    def _batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = batch["image"]
        if not self.num_classes:
            return x, None
        if batch.get("label") is None:
            raise UserError(
                "this diffusion model is conditional (num_classes > 0) and needs batch['label']"
            )
        return x, batch["label"].long().view(-1)

    def diffusion_loss(
        self,
        net: UNet,
        x0: torch.Tensor,
        label: torch.Tensor | None,
        generator: torch.Generator | None = None,
        **net_kwargs: Any,
    ) -> torch.Tensor:
        """The simple loss: MSE between the network's output and its eps/v target.

        x0: (B, C, H, W), the images in [-1, 1] or their scaled latents (`to_latent`); t ~ U{0..T-1} and eps ~ N(0, I) are drawn from
        `generator` (the global RNG when None). `net_kwargs` go to the network with the
        label (a text-conditional U-Net's ``context`` and ``mask``).
        """
        B = x0.shape[0]
        t = torch.randint(0, self.schedule.num_steps, (B,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.schedule.q_sample(x0, t, noise)  # (B, C, H, W)
        target = self.schedule.target(x0, noise, t, self.prediction)
        out = net(x_t, t, label, **net_kwargs)
        return F.mse_loss(out.float(), target.float())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x, label = self._batch(batch)
        if label is not None and self.hparams.label_dropout > 0:
            # Classifier-free guidance training: drop labels to the null class.
            drop = torch.rand(label.shape, device=label.device) < self.hparams.label_dropout
            label = torch.where(drop, torch.full_like(label, self.null_label), label)
        loss = self.diffusion_loss(self.unet, self.to_latent(x, sample=True), label)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x, label = self._batch(batch)
        # A fixed draw of t and noise per batch: val/loss then measures the weights, not
        # the luck of the draw, and is comparable across epochs (and runs).
        gen = torch.Generator(device=x.device).manual_seed(10_000 + batch_idx)
        loss = self.diffusion_loss(self.sampling_net, self.to_latent(x), label, generator=gen)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        # Only what trains: the EMA copies are updated by hand, not by gradients, and
        # frozen weights (LoRA's base layers) have none.
        opt = adamw([p for p in self.parameters() if p.requires_grad],
                    lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup = self.hparams.warmup_steps
        if warmup <= 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- exponential moving average ---------------------------------------------------

    def ema_decay_at(self, step: int) -> float:
        """The EMA decay used at optimizer step `step` (0 = copy the online weights).

        After `ema_start_step` the decay warms up as min(decay, (1 + n) / (10 + n)), n
        the number of averaged steps (TensorFlow's ExponentialMovingAverage, also Latent
        Diffusion's LitEma), so early averages are not dominated by the random init.
        """
        n = step - self.hparams.ema_start_step
        if n <= 0:
            return 0.0
        return min(self.hparams.ema_decay, (1 + n) / (10 + n))

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online network, its EMA copy) for every averaged network: here the U-Net.
        A subclass with more trained parts (a text encoder) adds its own pairs."""
        return [(self.unet, self.ema_unet)] if self.ema_unet is not None else []

    @torch.no_grad()
    def update_ema(self, step: int | None = None) -> None:
        """ema <- decay * ema + (1 - decay) * online, for every parameter and buffer."""
        decay = self.ema_decay_at(self.global_step if step is None else step)
        for online, ema in self.ema_pairs():
            ema_params = list(ema.parameters())
            params = [p.detach() for p in online.parameters()]
            if len(ema_params) != len(params):
                # Layers on one copy only (adapters added to one by hand, not through
                # genframe.lora): sampling from the EMA copy would not see them.
                raise UserError(
                    f"{type(online).__name__} and its EMA copy have different layers; add LoRA "
                    "adapters with genframe.lora.apply_lora, which keeps the EMA copy in step"
                )
            # One fused kernel over all tensors (as timm's ModelEmaV3 does):
            # ema + (1 - decay) * (online - ema) = decay * ema + (1 - decay) * online.
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
            for b_ema, b in zip(ema.buffers(), online.buffers()):
                b_ema.copy_(b)

    @torch.no_grad()
    def on_finetune_start(self) -> str | None:
        """Fine-tuning continues from the EMA weights, the ones the trained model samples
        with (the online ones are a noisier copy): they are copied into every online
        network, so the EMA restarts from them too."""
        pairs = self.ema_pairs()
        for online, ema in pairs:
            online.load_state_dict(ema.state_dict())
        return "the EMA weights (copied into the online networks)" if pairs else None

    @torch.no_grad()
    def on_lora_applied(self) -> None:
        """Give every EMA copy the adapters of its online network.

        Sampling uses the EMA weights, so LoRA fine-tuning starts from them: the online
        network's base weights are set to the EMA's (they are what the trained model
        generates with; the online ones are a noisier copy), then the EMA copy is
        rebuilt from the adapted online network. The two then differ only in the
        adapters, which the EMA averages as it does any weight.
        """
        for online, ema in self.ema_pairs():
            averaged = {_base_name(k): v for k, v in ema.state_dict().items() if "lora_" not in k}
            for key, value in online.state_dict().items():
                if _base_name(key) in averaged and "lora_" not in key:
                    value.copy_(averaged[_base_name(key)])
            fresh = copy.deepcopy(online).requires_grad_(False)
            for name, module in self.named_children():
                if module is ema:
                    setattr(self, name, fresh)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """The optimizer's step, then the EMA's: only when the weights moved (with gradient
        accumulation, Lightning calls this once per real step), and before any callback
        sees the batch's end, so a checkpoint written then holds the EMA of that step."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Lightning counts the step as done once this returns: it is global_step + 1.
        self.update_ema(self.global_step + 1)

    # -- generation -------------------------------------------------------------------

    def default_sampler(self) -> Sampler:
        """DDIM with ``default_sampler_steps`` steps and eta 0 (deterministic)."""
        return DDIMSampler(steps=self.hparams.default_sampler_steps, eta=0.0)

    def _guidance(self, guidance: float | None) -> float | None:
        """The guidance scale to use (None for an unconditional model)."""
        if not self.num_classes:
            if guidance is not None:
                raise UserError(
                    f"guidance={guidance}: this diffusion model is unconditional "
                    "(num_classes=0); classifier-free guidance needs a class-conditional model"
                )
            return None
        return self.guidance_scale(guidance, "label_dropout", "class")

    def guidance_scale(self, guidance: float | None, dropout_key: str, what: str) -> float:
        """`guidance` (None: the model's ``guidance``) checked: a number in [0, 50], and
        not != 1 for a model trained without dropping its condition (hparams
        `dropout_key` = 0), which has no unconditional prediction. `what` names the
        condition in the message ("class", "prompt")."""
        if guidance is None:
            guidance = self.hparams.guidance
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not (
            0.0 <= guidance <= MAX_GUIDANCE
        ):
            raise UserError(
                f"guidance must be a number between 0 and {MAX_GUIDANCE:g} (1: plain "
                f"conditional, 0: unconditional, >1: follow the {what} more closely), got {guidance!r}"
            )
        if guidance != 1 and self.hparams[dropout_key] <= 0:
            raise UserError(
                f"guidance={guidance}: this model was trained with {dropout_key}=0, so it "
                "has no unconditional prediction to guide with; use guidance=1"
            )
        return float(guidance)

    def denoiser(self, labels: torch.Tensor | None = None, guidance: float | None = None):
        """The ``denoise(x_t, t)`` function samplers call, with guidance folded in.

        labels: (N,) class labels for a conditional model (None: unconditional);
        guidance: the scale w. w = 1 runs the conditional network once; w = 0 runs only
        the unconditional one; otherwise both run in one doubled batch and are mixed as
        u + w (c - u). Mixing raw outputs is right for v as well as eps: both are affine
        in the network output with the same x_t term, so the mix carries over.
        """
        net = self.sampling_net
        if labels is None:
            return lambda x, t: net(x, t)
        null = torch.full_like(labels, self.null_label)
        w = 1.0 if guidance is None else float(guidance)
        if w == 1.0:
            return lambda x, t: net(x, t, labels)
        if w == 0.0:
            return lambda x, t: net(x, t, null)

        def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))  # (2N, ...)
            cond, uncond = out.chunk(2)
            return uncond + w * (cond - uncond)

        return guided

    def check_sampling(self, sampling: dict[str, Any], allowed: Any = None) -> None:
        for key in ("steps", "eta"):  # sampler settings, a common slip
            if key in sampling:
                raise UserError(
                    f"sampling.{key}: set it on the sampler instead, e.g. sampler=ddim "
                    f"sampler.{key}={sampling[key]}"
                )
        super().check_sampling(sampling, allowed)

    def sample(
        self,
        num_samples: int,
        *,
        condition: dict[str, Any],
        generator: torch.Generator,
        sampler: Sampler | None = None,
        guidance: float | None = None,
        clip_x0: bool | None = None,
        init_image: torch.Tensor | None = None,
        strength: float | None = None,
    ) -> Samples:
        """Sample `num_samples` images by running the reverse process from noise, or from
        a user's image (image-to-image).

        Image-to-image is SDEdit (Meng et al. 2021, "SDEdit: Guided Image Synthesis and
        Editing with Stochastic Differential Equations", https://arxiv.org/abs/2108.01073):
        the init image x_0 is noised with the schedule's q(x_t | x_0) to the sampler's step
        picked by `strength` (`Sampler.start_for_strength`: round(strength * steps) of the
        sampler's steps run), and the reverse process runs from there. Small strengths keep
        the image's layout and colours; strength 1 ignores the image and is plain sampling
        (the same seed gives the same samples).

        Args:
            num_samples: how many images.
            condition: ``{"label": k}`` (or a list of N labels) for a conditional model;
                without it a conditional model cycles through the classes.
            generator: the seeded generator; DDIM with eta=0 uses it only for the
                starting noise.
            sampler: a `genframe.samplers.Sampler` (``DDIMSampler(steps=50)``, or what
                ``sampler=<name>`` builds in the tasks); None: `default_sampler`.
            guidance: classifier-free guidance scale in [0, 50] for a conditional model
                (None: the model's ``guidance``); refused for an unconditional one.
            clip_x0: clip the predicted clean image to [-1, 1] at every step (None: in
                pixel space yes, in a latent space no; True is refused there, since a
                unit-variance latent is not bounded by 1).
            init_image: the starting image(s), float in [0, 1], (N, C, H, W) or one image
                (C, H, W) / (1, C, H, W) used for every sample; C and H = W must be the
                model's ``in_channels`` and ``image_size`` (no resizing here: the caller
                resizes, e.g. with Pillow when reading a file). None: from pure noise.
            strength: in (0, 1], how much of the reverse process runs from `init_image`
                (needs it, unless 1); None with an image: 0.8 (diffusers' default).

        Raises:
            UserError: a bad `sampler` or `guidance`; `strength` outside (0, 1] or given
                without `init_image`; an `init_image` of another shape or outside [0, 1].
        """
        sampler = self.check_sampler(sampler)
        labels, conditions = self.labels_for(num_samples, condition, self.num_classes)
        w = self._guidance(guidance)
        images, metadata = self.reverse_process(
            self.denoiser(labels, w), num_samples, generator=generator, sampler=sampler,
            clip_x0=clip_x0, init_image=init_image, strength=strength,
        )
        return Samples(images=images, conditions=conditions, metadata={"guidance": w, **metadata})

    def check_sampler(self, sampler: Sampler | None) -> Sampler:
        """`sampler`, or the default one; refuses what is not a `Sampler` or does not fit
        this model's T, before any work."""
        if sampler is None:
            sampler = self.default_sampler()
        if not isinstance(sampler, Sampler):
            raise UserError(
                f"sampler: expected a genframe.samplers.Sampler such as DDIMSampler(steps=50), "
                f"got {sampler!r} (on the command line: sampler=ddim sampler.steps=50)"
            )
        sampler.num_model_calls(self.schedule)  # checks the sampler fits T
        return sampler

    def reverse_process(
        self,
        denoise: Any,
        num_samples: int,
        *,
        generator: torch.Generator,
        sampler: Sampler,
        clip_x0: bool | None = None,
        init_image: torch.Tensor | None = None,
        strength: float | None = None,
        offset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Run `sampler` with `denoise(x_t, t)` from noise, or from `init_image` noised to
        the step `strength` picks (SDEdit; see `sample` for the arguments).

        `offset` ((N, C, H, W) in [-1, 1]) is added to what the sampler makes before it
        becomes an image: a model that diffuses a residual (an upscaler's detail over its
        upsampled input) passes that input here.

        Returns (images (N, C, H, W) float in [0, 1], the metadata that describes the
        run: sampler, EMA, clip_x0, and the strength and start timestep of an
        image-to-image run).
        """
        shape = (num_samples, *self.net_shape)
        latent = self.autoencoder is not None
        if clip_x0 is None:
            clip_x0 = not latent
        elif clip_x0 and latent:
            raise UserError("clip_x0=true clips the predicted clean image to [-1, 1], but this "
                            "model denoises a unit-variance latent, which is not bounded by 1; "
                            "leave clip_x0 out (it is off in a latent space)")
        start, x_start = 0, None
        if strength is not None:
            start = sampler.start_for_strength(self.schedule, strength)  # checks (0, 1]
            if init_image is None and strength != 1:
                raise UserError(
                    f"strength={strength!r} needs init_image (the image to start from); "
                    "without one sampling starts from pure noise"
                )
        if init_image is not None:
            strength = DEFAULT_STRENGTH if strength is None else strength
            start = sampler.start_for_strength(self.schedule, strength)
            x0 = self._init_image(init_image, num_samples) * 2 - 1  # (N, C, H, W) in [-1, 1]
            x0 = self.to_latent(x0)  # (N, *net_shape)
            x_start = sampler.noise_to_start(x0, self.schedule, start, generator=generator)
        x = sampler.sample(
            denoise, self.schedule, shape,
            prediction=self.prediction, generator=generator, device=self.device,
            clip_x0=bool(clip_x0), start=start, x_start=x_start,
        )  # (N, *net_shape): images in [-1, 1] or scaled latents
        x = self.from_latent(x).float()
        if offset is not None:
            x = x + offset
        images = ((x + 1) / 2).clamp(0, 1)  # (N, C, H, W)
        metadata = {
            "sampler": sampler.describe(),
            "ema": self.ema_unet is not None,
            "clip_x0": bool(clip_x0),
        }
        if latent:
            scale = float(self.latent_scale)
            metadata["latent_space"] = {"shape": list(self.net_shape),
                                        "latent_scale": scale if scale > 0 else None}
        if init_image is not None:
            metadata["strength"] = float(strength)
            metadata["start_timestep"] = sampler.timesteps(self.schedule)[start]
        return images, metadata

    def _init_image(self, image: Any, num_samples: int) -> torch.Tensor:
        """`init_image` checked and shaped (N, C, H, W), float32 on the model's device."""
        return self.image_argument(image, num_samples, key="init_image", channels=self.in_channels,
                                   size=self.image_size, sizes_from="in_channels and image_size")


class _UNetStep(nn.Module):
    """For export: a U-Net called with plain positional tensors, ``(sample, timestep,
    *conditioning)``, the conditioning passed on as the network's keyword arguments."""

    def __init__(self, unet: nn.Module, kwargs: dict[str, str]) -> None:
        super().__init__()
        self.unet = unet
        self.kwargs = list(kwargs.values())

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *conditioning: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, **dict(zip(self.kwargs, conditioning)))


class _LatentDecoder(nn.Module):
    """For export: a latent model's sampled latents -> images in [0, 1]."""

    def __init__(self, model: Diffusion) -> None:
        super().__init__()
        self.model = model
        # `from_latent`'s test of the scale, made here: a graph cannot branch on a value.
        self.scaled = float(model.latent_scale) > 0

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.model.latent_scale if self.scaled else latents
        return ((self.model.autoencoder.decode_latents(z).float() + 1) / 2).clamp(0, 1)


def _borrowed_autoencoder(run: str | None, spec: dict[str, Any] | None, in_channels: int,
                          image_size: int) -> tuple[dict[str, Any], nn.Module] | None:
    """(description, model) of the autoencoder of a latent diffusion model, or None.

    Raises:
        UserError: the run holds no autoencoder with a spatial latent, or one made for
            images of another shape than this model's.
    """
    from genframe.weights import borrowed_model

    borrowed = borrowed_model(run, spec, run_key="model.autoencoder", spec_key="model.autoencoder_spec")
    if borrowed is None:
        return None
    description, ae = borrowed
    where = f"model.autoencoder={run}" if spec is None else "model.autoencoder_spec"
    shape = getattr(ae, "latent_shape", None)
    if not (callable(getattr(ae, "encode_latents", None)) and callable(getattr(ae, "decode_latents", None))
            and isinstance(shape, tuple) and len(shape) == 3):
        raise UserError(
            f"{where}: holds model '{ae.registered_name}', which has no spatial latent (encode_latents, "
            "decode_latents, latent_shape (c, h, w)); name the run directory of a model=autoencoder run")
    ae_image = (int(ae.hparams.get("in_channels", -1)), int(ae.hparams.get("image_size", -1)))
    if ae_image != (in_channels, image_size):
        raise UserError(
            f"{where}: the autoencoder encodes {ae_image[0]}x{ae_image[1]}x{ae_image[1]} images, but "
            f"this model's are {in_channels}x{image_size}x{image_size} (model.in_channels, "
            "model.image_size, from data.channels and data.image_size); train an autoencoder "
            "on this data, or use data of its size")
    return description, ae


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Run a frozen part in eval mode (no dropout, running statistics) even while the
    model trains, restoring its mode after. Not by overriding ``train()``: Lightning
    checks at the start of training that every module is in train mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _base_name(key: str) -> str:
    """A state-dict key as the plain layer names it: peft's LoRA layer keeps the
    original weight under ``base_layer``."""
    return key.replace(".base_layer.", ".")


def _validate(args: dict[str, Any]) -> None:
    """Refuse bad constructor values with a message naming the ``model.`` key."""

    need = argument_check(args)

    need(args["in_channels"] >= 1, "in_channels", "at least 1")
    need(args["image_size"] >= 1, "image_size", "at least 1")
    need(args["num_classes"] >= 0, "num_classes", "0 (unconditional) or more")
    block_out_channels = args["block_out_channels"]
    need(
        len(block_out_channels) >= 1 and all(c >= 1 for c in block_out_channels),
        "block_out_channels", "a non-empty list of positive widths",
    )
    need(args["blocks_per_level"] >= 1, "blocks_per_level", "at least 1")
    need(args["num_heads"] >= 1, "num_heads", "at least 1")
    need(0 <= args["dropout"] < 1, "dropout", "in [0, 1)")
    need(args["timesteps"] >= 2, "timesteps", "at least 2")
    need(0 <= args["label_dropout"] < 1, "label_dropout", "in [0, 1)")
    need(0 <= args["guidance"] <= MAX_GUIDANCE, "guidance", f"between 0 and {MAX_GUIDANCE:g}")
    need(0 <= args["ema_decay"] < 1, "ema_decay", "in [0, 1) (0 disables the EMA)")
    need(args["ema_start_step"] >= 0, "ema_start_step", ">= 0")
    need(args["lr"] > 0, "lr", "> 0")
    need(args["weight_decay"] >= 0, "weight_decay", ">= 0")
    need(args["warmup_steps"] >= 0, "warmup_steps", ">= 0")
    need(
        1 <= args["default_sampler_steps"] <= args["timesteps"],
        "default_sampler_steps", f"between 1 and timesteps ({args['timesteps']})",
    )
    if args["num_classes"] and args["guidance"] != 1 and args["label_dropout"] <= 0:
        raise UserError(
            f"model.guidance={args['guidance']} needs model.label_dropout > 0 (classifier-free "
            "guidance mixes in the unconditional prediction, which label dropout trains)"
        )
    for key, allowed in (("schedule", ("linear", "cosine")), ("prediction", ("eps", "v"))):
        if args[key] not in allowed:
            raise UserError(f"model.{key} must be one of {valid_list(allowed)}, got {args[key]!r}")

    net_shape = args["net_shape"]
    space = (f"image_size={args['image_size']}" if args["first_stage"] is None else
             f"the autoencoder's {net_shape[0]}x{net_shape[1]}x{net_shape[2]} latent")
    levels = len(block_out_channels)
    if args["first_stage"] is not None and min(net_shape[1:]) < 2 ** (levels - 1):
        raise UserError(
            f"model.block_out_channels: {levels} U-Net levels halve the input {levels - 1} times, "
            f"more than {space} allows (its side is {min(net_shape[1:])}); use at most "
            f"{min(net_shape[1:]).bit_length()} levels, or an autoencoder with fewer levels "
            "(a larger latent)")
    sides = level_sides(net_shape[1:], levels)
    unknown = sorted(set(args["attention_resolutions"]) - set(sides))
    if unknown:
        raise UserError(
            f"model.attention_resolutions: {unknown} match no U-Net level; with "
            f"{space} and {levels} levels the level sides are "
            f"{sides}. Choose from those, or [] for attention only in the middle block"
        )
    if args["latent_scale"] is not None and not args["latent_scale"] > 0:
        raise UserError(f"model.latent_scale must be > 0 (or null: measured), got {args['latent_scale']}")
    if args["first_stage"] is None and args["latent_scale"] is not None:
        raise UserError("model.latent_scale scales an autoencoder's latent; set model.autoencoder too")
    heads = args["num_heads"]
    attn_widths = {c for c, s in zip(block_out_channels, sides) if s in args["attention_resolutions"]}
    attn_widths.add(block_out_channels[-1])  # the middle block
    bad = sorted(w for w in attn_widths if w % heads)
    if bad:
        raise UserError(
            f"model.num_heads={heads} must divide the width of every attention level; "
            f"these widths are not divisible: {bad}"
        )
