"""Text-to-image diffusion: a text encoder whose token features condition a U-Net through
cross-attention, with classifier-free guidance and image-to-image.

Composed as Stable Diffusion composes its parts (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models", https://arxiv.org/abs/2112.10752): a text
encoder turns a caption into token features (B, T, D); the diffusion plugin's public
`UNet`, built with ``context_dim=D``, reads them in `genframe.layers.SpatialTransformer`
blocks at its attention levels. Training, the noise schedule, the EMA, the samplers and
SDEdit image-to-image are the diffusion plugin's (`Diffusion`, which this model extends);
this module adds the text.

Classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598): training
drops a caption with probability ``caption_dropout`` -- its mask becomes all False, which
the cross-attention reads as "no text" -- so one network learns both predictions, mixed
at sampling time as ``eps = eps_u + w (eps_c - eps_u)``, where eps_u is the prediction
without text, or for a negative prompt the prediction for that prompt.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, ClassVar, Literal

import torch

from genframe.errors import UserError, argument_check
from genframe.samplers.base import Sampler
from genframe.samples import Samples
from genframe_plugins.diffusion.model import MAX_GUIDANCE, Diffusion

from .text_encoder import LanguageModelEncoder, TextEncoder, encode_texts

log = logging.getLogger("genframe")

_EXAMPLE_CAPTIONS = ("a small red circle at the top left", "a large blue square in the centre",
                     "a small green triangle at the bottom right", "a large yellow circle at the top right")


class Text2Image(Diffusion):
    """Text-conditional denoising diffusion model on images in [-1, 1].

    Args:
        in_channels, image_size, block_out_channels, blocks_per_level,
        attention_resolutions, num_heads, dropout, timesteps, schedule,
        ema_decay, ema_start_step, lr, weight_decay, warmup_steps, default_sampler_steps,
        autoencoder, autoencoder_spec, latent_scale:
            as for `Diffusion`; every attention level of the U-Net (and its middle
            block) is a spatial transformer with cross-attention to the text.
        prediction: as for `Diffusion`, but ``"v"`` by default (Salimans & Ho 2022): its
            loss weighs the noisiest steps, where the caption alone decides the layout,
            far more than eps-prediction does. On the shapes, eps-prediction learned the
            position words barely at all and v-prediction strongly, once the text
            encoder's embeddings kept the words apart (see `TextEncoder`;
            ``bench/text2image_alignment.py`` prints the loss with each word changed).
        transformer_depth: transformer blocks in each spatial transformer.
        pooled_text: also add the mean of the caption's token features to the timestep
            embedding (Imagen's pooled embedding), or condition through cross-attention
            only.
        caption_dropout: probability of training on an image without its caption (the
            unconditional half of classifier-free guidance).
        guidance: the default guidance scale w of `generate` (1: plain conditional).
        vocab_size: token ids of the tokenizer (null in the config: the data's); unused
            with `text_encoder_run`.
        max_length: the most tokens of a caption the encoder reads; longer captions are
            truncated, with a warning, in training and in generation alike.
        text_width, text_depth, text_heads: width, blocks and heads of the text encoder
            trained with the model (unused with `text_encoder_run`).
        text_encoder_run: the run directory of a trained genframe language model
            (``model=transformer``) whose hidden states serve as the text features, with
            its tokenizer. Its weights and description are copied into this model
            (`text_encoder_spec`), so this run needs that directory no more.
        text_encoder_spec: the borrowed language model's description, recorded from
            `text_encoder_run` (not set by hand).
        text_encoder_trainable: tune the borrowed language model with the U-Net (True)
            or keep it frozen (False, the default, as Imagen keeps T5 frozen).

    The batch needs ``image`` and ``caption`` (a list of str). ``generate(n,
    condition={"prompt": ...}, guidance=..., negative_prompt=..., sampler=...,
    init_image=..., strength=...)``: see `sample`.
    """

    needs = frozenset({"image", "caption"})
    condition_keys = frozenset({"prompt"})
    uses_tokenizer = True
    # LoRA on the spatial transformers' attention projections, as diffusers' text-to-image
    # LoRA training does; each model adds the layers through which a caption's words
    # reach the U-Net besides (`__init__`). The EMA copies get the same adapters.
    lora_target_modules = ("unet.*.to_q", "unet.*.to_k", "unet.*.to_v", "unet.*.to_out.0")
    renamed_arguments: ClassVar[dict[str, str]] = {}  # none of Diffusion's old names

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        block_out_channels: list[int] = (64, 128),  # type: ignore[assignment]  # immutable default
        blocks_per_level: int = 2,
        attention_resolutions: list[int] | None = None,
        num_heads: int = 4,
        transformer_depth: int = 1,
        pooled_text: bool = True,
        dropout: float = 0.0,
        timesteps: int = 1000,
        schedule: Literal["linear", "cosine"] = "cosine",
        prediction: Literal["eps", "v"] = "v",
        caption_dropout: float = 0.1,
        guidance: float = 3.0,
        ema_decay: float = 0.999,
        ema_start_step: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        default_sampler_steps: int = 50,
        vocab_size: int | None = None,
        max_length: int = 64,
        text_width: int = 64,
        text_depth: int = 2,
        text_heads: int = 4,
        text_encoder_run: str | None = None,
        text_encoder_spec: dict[str, Any] | None = None,
        text_encoder_trainable: bool = False,
        autoencoder: str | None = None,
        autoencoder_spec: dict[str, Any] | None = None,
        latent_scale: float | None = None,
    ) -> None:
        _validate(locals())
        self._borrowed = _borrowed_language_model(text_encoder_run, text_encoder_spec)
        super().__init__(
            in_channels=in_channels, image_size=image_size, num_classes=0,
            block_out_channels=block_out_channels, blocks_per_level=blocks_per_level,
            attention_resolutions=attention_resolutions, num_heads=num_heads,
            dropout=dropout, timesteps=timesteps, schedule=schedule, prediction=prediction,
            label_dropout=0.0, guidance=1.0, ema_decay=ema_decay,
            ema_start_step=ema_start_step, lr=lr, weight_decay=weight_decay,
            warmup_steps=warmup_steps, default_sampler_steps=default_sampler_steps,
            autoencoder=autoencoder, autoencoder_spec=autoencoder_spec, latent_scale=latent_scale,
        )
        # Diffusion saved its own arguments too (Lightning merges a subclass's): keep ours.
        self.save_hyperparameters()
        for key in ("num_classes", "label_dropout"):
            self.hparams.pop(key, None)
        self.needs = type(self).needs
        self.condition_keys = type(self).condition_keys
        self._warned_texts: set[str] = set()  # over-long texts already warned about
        # Default LoRA targets beyond attention: the pooled text embedding's projection
        # and the own text encoder's token embedding. Subject tuning with attention
        # adapters alone drew a new subject's outline but never its colour, which these
        # models carry mostly through the pooled embedding (white rings: 0.00 white with
        # attention only, 1.00 with these two added).
        extra = (("unet.context_embed",) if pooled_text else ()) + (
            ("text_encoder.token_embedding",) if self._borrowed is None else ())
        self.lora_target_modules = type(self).lora_target_modules + extra
        if self._borrowed is not None:
            spec, _ = self._borrowed
            # The spec goes in this model's own description: the run needs no other.
            self.resolved_arguments = {**self.resolved_arguments, "text_encoder_spec": spec}
            super().set_tokenizer(self.text_encoder.language_model.tokenizer)
        del self._borrowed

    # -- networks ---------------------------------------------------------------------

    def unet_conditioning(self) -> dict[str, Any]:
        """Builds the text encoder (and its EMA copy) and asks the U-Net for
        cross-attention to its features."""
        hp = self.hparams
        if self._borrowed is not None:
            _, language_model = self._borrowed
            self.text_encoder = LanguageModelEncoder(language_model, bool(hp.text_encoder_trainable))
        else:
            if hp.vocab_size is None:
                raise UserError("model.vocab_size is null and no data gave a tokenizer's size; "
                                "train on captioned data (data=shapes, data=captioned_folder) "
                                "or set model.vocab_size")
            self.text_encoder = TextEncoder(hp.vocab_size, hp.max_length, hp.text_width,
                                            hp.text_depth, hp.text_heads, hp.dropout)
        trains = self._borrowed is None or bool(hp.text_encoder_trainable)
        self.ema_text_encoder = (copy.deepcopy(self.text_encoder).requires_grad_(False)
                                 if trains and hp.ema_decay > 0 else None)
        return {"context_dim": self.text_encoder.feature_dim,
                "transformer_depth": hp.transformer_depth,
                "pooled_context": bool(hp.pooled_text)}

    def ema_pairs(self):
        pairs = super().ema_pairs()
        if self.ema_text_encoder is not None:
            pairs.append((self.text_encoder, self.ema_text_encoder))
        return pairs

    @property
    def sampling_text_encoder(self):
        """The text encoder validation and sampling use: the EMA copy when there is one."""
        return self.ema_text_encoder if self.ema_text_encoder is not None else self.text_encoder

    @property
    def max_length(self) -> int:
        """Tokens of a text the encoder reads (``max_length``, at most the borrowed
        language model's context)."""
        return min(int(self.hparams.max_length), int(self.text_encoder.max_length))

    def set_tokenizer(self, tokenizer: Any) -> None:
        if isinstance(self.text_encoder, LanguageModelEncoder):
            # The borrowed language model's tokenizer stays (its ids are what it learned),
            # whatever the data's; recorded in the spec like any model's.
            super().set_tokenizer(self.text_encoder.language_model.tokenizer)
            return
        vocab = self.hparams.vocab_size
        if tokenizer.vocab_size > vocab:
            raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size="
                            f"{vocab}; set model.vocab_size=null to take the data's size")
        super().set_tokenizer(tokenizer)

    def export_graphs(self) -> dict[str, Any]:
        """Diffusion's graphs, with the U-Net reading ``encoder_hidden_states`` (B, T, D)
        and ``encoder_attention_mask`` (B, T) bool, plus ``text_encoder``: ``input_ids``
        (B, T) long and ``attention_mask`` (B, T) bool (True at real tokens; ids of the
        model's ``tokenizer.json``, right-padded, at most ``max_length``) ->
        ``last_hidden_state`` (B, T, D)."""
        from genframe.exporters import ExportGraph

        graphs = super().export_graphs()
        example, other = (self._export_text(n, n + 1) for n in (2, 3))
        graphs["text_encoder"] = ExportGraph(
            self.sampling_text_encoder, example, ("last_hidden_state",),
            {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}},
            check_inputs=[other], output_axes={"last_hidden_state": {0: "batch", 1: "sequence"}},
            notes={"max_length": self.max_length,
                   "attention_mask": "True at real tokens; an all-False row is the empty "
                                     "text (the unconditional input of guidance)"})
        return graphs

    def _export_text(self, batch: int, length: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(batch)
        length = min(length, self.max_length)
        vocab = getattr(self.tokenizer, "vocab_size", None) or self.hparams.vocab_size or 2
        ids = torch.randint(1, int(vocab), (batch, length), generator=gen)
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[0, length // 2:] = False  # one right-padded row
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def unet_export_inputs(self, batch: int, gen: torch.Generator) -> dict[str, Any]:
        text = self._export_text(batch, batch + 1)
        context = self.sampling_text_encoder(text["input_ids"], text["attention_mask"])
        return {"encoder_hidden_states": ("context", context.detach().cpu()),
                "encoder_attention_mask": ("mask", text["attention_mask"].cpu())}

    def unet_export_axes(self) -> dict[str, dict[int, str]]:
        return {"encoder_hidden_states": {1: "sequence"}, "encoder_attention_mask": {1: "sequence"}}

    def unet_export_notes(self) -> dict[str, Any]:
        return {"encoder_hidden_states": "the text_encoder's last_hidden_state",
                "guidance": "classifier-free guidance runs the step again with an all-False "
                            "encoder_attention_mask (the empty text) and mixes u + w (c - u)"}

    # -- text -------------------------------------------------------------------------

    def encode(self, texts: list[str], encoder=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features (B, T, D) and mask (B, T) of `texts` ("" = no text), with
        `encoder` (default: the sampling one). Longer texts are truncated to
        `max_length` tokens with a warning (once per run while training)."""
        if self.tokenizer is None:
            raise UserError("this text-to-image model has no tokenizer: train it on captioned "
                            "data (data=shapes, data=captioned_folder), which gives it one")
        ids, mask, truncated = encode_texts(self.tokenizer, texts, self.max_length, self.device)
        new = sorted({texts[i] for i in truncated} - self._warned_texts)
        if new and not (self.training and self._warned_texts):
            # Once per text (generate encodes a prompt for its size probe and again), and
            # once per run while training (captions repeat every epoch).
            self._warned_texts.update(new)
            log.warning("%d %s longer than this model's %d tokens and cut to the first %d "
                        "(e.g. %r)", len(new), "text is" if len(new) == 1 else "texts are",
                        self.max_length, self.max_length, new[0][:80])
        encoder = encoder if encoder is not None else self.sampling_text_encoder
        return encoder(ids, mask), mask

    # -- objective --------------------------------------------------------------------

    def _captions(self, batch: dict[str, Any]) -> list[str]:
        captions = batch.get("caption")
        if captions is None:
            raise UserError("text2image needs batch['caption'] (a list of str): use captioned "
                            "data such as data=shapes or data=captioned_folder")
        return [str(c) for c in captions]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        context, mask = self.encode(self._captions(batch), self.text_encoder)
        if self.hparams.caption_dropout > 0:
            # Classifier-free guidance training: some images are seen without their text.
            drop = torch.rand(mask.shape[0], device=mask.device) < self.hparams.caption_dropout
            mask = mask & ~drop[:, None]
        loss = self.diffusion_loss(self.unet, self.to_latent(x, sample=True), None,
                                   context=context, mask=mask)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        context, mask = self.encode(self._captions(batch))
        gen = torch.Generator(device=x.device).manual_seed(10_000 + batch_idx)
        loss = self.diffusion_loss(self.sampling_net, self.to_latent(x), None, generator=gen,
                                   context=context, mask=mask)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        return loss

    def example_batch(self, batch_size: int = 4) -> dict[str, Any]:
        """Random images with shapes captions; a model without a tokenizer gets a char
        tokenizer over those captions, as captioned data would give it."""
        if self.tokenizer is None and not isinstance(self.text_encoder, LanguageModelEncoder):
            from genframe.text.tokenize import build_tokenizer

            self.set_tokenizer(build_tokenizer("char", _EXAMPLE_CAPTIONS))
        batch = super().example_batch(batch_size)
        batch["caption"] = [_EXAMPLE_CAPTIONS[i % len(_EXAMPLE_CAPTIONS)] for i in range(batch_size)]
        return batch

    # -- generation -------------------------------------------------------------------

    def _guidance(self, guidance: float | None) -> float:
        return self.guidance_scale(guidance, "caption_dropout", "prompt")

    def _texts(self, value: Any, n: int, key: str) -> list[str]:
        """`value` (one text or a list of `n`) as `n` non-empty texts."""
        if not isinstance(value, (str, list, tuple)):
            raise UserError(f"{key}: expected a text or a list of {n} texts, got {type(value).__name__}")
        texts = [value] * n if isinstance(value, str) else list(value)
        if len(texts) != n:
            raise UserError(f"{key}: got {len(texts)} texts for {n} samples")
        for text in texts:
            if not isinstance(text, str):
                raise UserError(f"{key}: expected texts, got {text!r}")
            if not text.strip():
                raise UserError(
                    f"{key}: an empty text; give a description such as "
                    f"'a red circle at the top left' (leave prompt out for unconditional samples)"
                )
        return texts

    def text_denoiser(self, prompts: list[str] | None, negative: list[str] | None, w: float,
                      num_samples: int | None = None):
        """The ``denoise(x_t, t)`` samplers call, for `prompts` with guidance scale `w`
        (or for `num_samples` unconditional images when `prompts` is None). The texts are
        encoded once, here, not at every step.

        The unconditional branch reads no text, or the `negative` prompts (a negative
        prompt replaces the unconditional prediction, so the samples move away from
        it). w = 1 runs only the conditional branch, w = 0 only the unconditional one,
        otherwise both run in one doubled batch.
        """
        net = self.sampling_net
        if prompts is None:  # no text at all: the unconditional model
            if num_samples is None:
                raise ValueError("text_denoiser without prompts needs num_samples")
            context, mask = self.encode([""] * num_samples)
            return lambda x, t: net(x, t, None, context=context, mask=mask)
        uncond = negative if negative is not None else [""] * len(prompts)
        if w == 1.0:
            context, mask = self.encode(prompts)
            return lambda x, t: net(x, t, None, context=context, mask=mask)
        if w == 0.0:
            context, mask = self.encode(uncond)
            return lambda x, t: net(x, t, None, context=context, mask=mask)
        context, mask = self.encode(prompts + uncond)  # (2N, T, D): one padding for both

        def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = net(torch.cat([x, x]), torch.cat([t, t]), None, context=context, mask=mask)
            cond, un = out.chunk(2)
            return un + w * (cond - un)

        return guided

    def sample(
        self,
        num_samples: int,
        *,
        condition: dict[str, Any],
        generator: torch.Generator,
        sampler: Sampler | None = None,
        guidance: float | None = None,
        negative_prompt: str | None = None,
        clip_x0: bool | None = None,
        init_image: torch.Tensor | None = None,
        strength: float | None = None,
    ) -> Samples:
        """Images for ``condition["prompt"]`` (one text, or a list of `num_samples`).

        Args:
            num_samples: how many images.
            condition: ``{"prompt": "a red circle at the top left"}``; without a prompt
                the samples are unconditional (guidance does not apply).
            generator: the seeded generator.
            sampler: a `genframe.samplers.Sampler` (None: DDIM with
                ``default_sampler_steps``).
            guidance: the classifier-free guidance scale w in [0, 50] (None: the model's
                ``guidance``).
            negative_prompt: a text the samples should not show; it replaces the
                unconditional prediction, so it needs a prompt and w != 1.
            clip_x0: as for `Diffusion.sample` (None: on in pixel space, off in a latent
                space).
            init_image, strength: image-to-image (SDEdit), as for `Diffusion.sample`.

        Raises:
            UserError: an empty prompt or negative prompt, a negative prompt without a
                prompt or with w = 1, a bad guidance, sampler, init image or strength.
        """
        sampler = self.check_sampler(sampler)
        prompt = condition.get("prompt")
        prompts = None if prompt is None else self._texts(prompt, num_samples, "prompt")
        w = self._guidance(guidance) if prompts is not None else None
        negative = None
        if negative_prompt is not None:
            if prompts is None:
                raise UserError("negative_prompt needs a prompt: it steers the samples of a "
                                "prompt away from a text")
            if w == 1.0:
                raise UserError(
                    "negative_prompt has no effect at guidance=1: it replaces the "
                    "unconditional prediction, which guidance 1 does not use; give guidance > 1")
            negative = self._texts(negative_prompt, num_samples, "negative_prompt")
        images, metadata = self.reverse_process(
            self.text_denoiser(prompts, negative, w if w is not None else 1.0, num_samples), num_samples,
            generator=generator, sampler=sampler, clip_x0=clip_x0, init_image=init_image,
            strength=strength,
        )
        conditions = [{"prompt": p} for p in prompts] if prompts else [{} for _ in range(num_samples)]
        return Samples(images=images, conditions=conditions, metadata={
            "guidance": w, "negative_prompt": negative_prompt, **metadata})


def _borrowed_language_model(run: str | None, spec: dict[str, Any] | None):
    """(description, model) of the language model the text encoder borrows, or None.

    From `spec` (a rebuilt run: the weights come with this model's own) or else from the
    run directory `run` (its weights loaded here).
    """
    from genframe.weights import borrowed_model

    borrowed = borrowed_model(run, spec, run_key="model.text_encoder_run",
                              spec_key="model.text_encoder_spec")
    if borrowed is None:
        return None
    description, model = borrowed
    if not callable(getattr(model, "text_features", None)):
        raise UserError(
            f"model.text_encoder_run={run}: holds model '{model.registered_name}', which gives no "
            "text features; name the run directory of a language model (model=transformer)")
    if model.tokenizer is None:
        raise UserError(f"model.text_encoder_run={run}: the language model has no tokenizer")
    return description, model


def _validate(args: dict[str, Any]) -> None:
    """Refuse bad text-side values with a message naming the ``model.`` key (the image
    side is `Diffusion`'s)."""
    need = argument_check(args)
    need(0 <= args["caption_dropout"] < 1, "caption_dropout", "in [0, 1)")
    need(0 <= args["guidance"] <= MAX_GUIDANCE, "guidance", f"between 0 and {MAX_GUIDANCE:g}")
    need(args["vocab_size"] is None or args["vocab_size"] >= 2, "vocab_size", "null or at least 2")
    for key in ("max_length", "text_width", "text_depth", "text_heads", "transformer_depth"):
        need(args[key] >= 1, key, "at least 1")
    need(args["text_width"] % args["text_heads"] == 0, "text_heads", "a divisor of text_width")
    if args["guidance"] != 1 and args["caption_dropout"] <= 0:
        raise UserError(
            f"model.guidance={args['guidance']} needs model.caption_dropout > 0 (classifier-free "
            "guidance mixes in the unconditional prediction, which caption dropout trains)")
