"""A decoder-only transformer language model (GPT-2 shape) as a genframe model.

Radford et al. 2019 (GPT-2), after nanoGPT (https://github.com/karpathy/nanoGPT). The
network lives in `network.py` and the decoding loop in `generation.py`; this module holds
the objective (next-token cross-entropy, optionally masked), the optimizer and its
schedule, and `sample()`, which validates options and turns ids into texts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from genframe.data.preference import PREFERENCE_KEYS, REFERENCE_KEYS
from genframe.errors import UserError, argument_check, did_you_mean, valid_list
from genframe.module import GenerativeModule
from genframe.optim import MuonWithAdamW, adamw
from genframe.samples import Samples

from .generation import RowText, choose_tokens, decode
from .network import ACTIVATIONS, GPT, NORMS, POSITIONS, Block, DecoderGraph, DecoderWithPastGraph

#: ``optimizer``: AdamW, or Muon for the blocks' matrices with AdamW for the rest.
OPTIMIZERS = ("adamw", "muon")

log = logging.getLogger("genframe")

class WarmupCosine:
    """Learning-rate factor at an optimizer step: linear warm-up, then cosine decay.

    ``(step + 1) / warmup_steps`` during the first `warmup_steps` steps (so the first
    step already learns and the last warm-up step reaches 1), then a half cosine from 1
    down to `min_ratio` at `decay_steps`, and `min_ratio` after that. With
    ``decay_steps=None`` the factor stays 1 after the warm-up.
    """

    def __init__(self, warmup_steps: int, decay_steps: int | None, min_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay_steps is None:
            return 1.0
        span = max(1, self.decay_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Transformer(GenerativeModule):
    """Decoder-only transformer language model trained on ``batch["tokens"]``.

    Args:
        vocab_size: number of token ids; null in the config takes the data's tokenizer
            size.
        block_size: context length: the most tokens the model attends to.
        n_layer: transformer blocks.
        n_head: attention heads per block; must divide `n_embd`.
        n_embd: width of the residual stream.
        dropout: dropout on embeddings, attention weights and residual branches.
        bias: biases in linear layers and LayerNorms (GPT-2 has them; without is a bit
            faster and as good).
        positions: ``"learned"`` position embeddings (GPT-2) or ``"rotary"`` (RoPE).
        tie_weights: share the token embedding with the output layer.
        norm: ``"layernorm"`` (GPT-2) or ``"rmsnorm"``.
        qk_norm: RMS-normalise queries and keys per head before attention.
        activation: the MLP's ``"gelu"`` (GPT-2) or ``"relu2"`` (squared ReLU, Primer).
        optimizer: ``"adamw"``, or ``"muon"``: Muon for the blocks' weight matrices and
            AdamW for the rest, one learning rate (`genframe.optim.MuonWithAdamW`).
        lr: peak learning rate.
        weight_decay: AdamW weight decay, on matrices and embeddings only.
        betas: AdamW betas.
        warmup_steps: optimizer steps of linear learning-rate warm-up.
        lr_decay_steps: step at which the cosine decay reaches ``min_lr_ratio * lr``;
            null: the trainer's estimated total number of steps.
        min_lr_ratio: final learning rate as a fraction of `lr`.
        grad_clip: clip the gradient norm to this when ``trainer.gradient_clip_val`` is
            unset (the trainer's value wins); 0 turns it off.
        dpo_beta: strength of the reference in DPO (preference pairs only): larger keeps
            the model closer to the reference; Rafailov et al. use 0.1-0.5.
        rpo_alpha: weight of the chosen completions' next-token loss (nats per token)
            added to DPO's (Pang et al. 2024, https://arxiv.org/abs/2404.19733; TRL's
            ``rpo_alpha``): it keeps DPO from lowering the chosen side's likelihood
            along with the rejected one's; 0 is plain DPO.

    A batch may hold ``loss_mask`` (tokens' shape, 1 where a token is a target to learn):
    the loss then averages over those targets only. Logs ``train/loss``, ``train/lr``,
    ``val/loss`` (nats per target token), ``val/ppl`` and, with a tokenizer,
    ``val/bpc`` (char tokenizer) or ``val/bpb`` (byte-level BPE).

    On preference pairs (`genframe.data.preference`: ``chosen_*``/``rejected_*`` rows
    with the reference model's log-probabilities) the objective is DPO instead (Rafailov
    et al. 2023, https://arxiv.org/abs/2305.18290)::

        loss = -log sigmoid(dpo_beta * ((log p(chosen) - log p_ref(chosen))
                                        - (log p(rejected) - log p_ref(rejected))))

    logging ``train/loss``, ``val/loss`` (that loss), ``val/reward_accuracy`` (share of
    pairs whose chosen side gains more than the rejected one) and ``val/reward_margin``
    (mean difference of the two implicit rewards, nats times `dpo_beta`).
    """

    needs = frozenset({"tokens"})
    also_trains_on = (PREFERENCE_KEYS,)
    condition_keys = frozenset({"prompt", "prompt_ids"})
    uses_tokenizer = True
    lora_target_modules = ("*.attn.*", "*.mlp.*")  # attention and MLP layers (Hu et al. 2021)

    def __init__(
        self,
        vocab_size: int | None = None,
        block_size: int = 64,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = False,
        positions: str = "learned",
        tie_weights: bool = True,
        norm: str = "layernorm",
        qk_norm: bool = False,
        activation: str = "gelu",
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: list[float] = (0.9, 0.95),  # type: ignore[assignment]  # immutable default
        warmup_steps: int = 100,
        lr_decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        grad_clip: float = 1.0,
        dpo_beta: float = 0.1,
        rpo_alpha: float = 0.0,
    ) -> None:
        super().__init__()
        _validate(locals())
        betas = [float(b) for b in betas]  # a plain list in hparams, whatever came in
        self.save_hyperparameters()
        self.block_size = block_size
        self.net = GPT(
            vocab_size, block_size, n_layer, n_head, n_embd,
            dropout=dropout, bias=bias, positions=positions, tie_weights=tie_weights,
            norm=norm, qk_norm=qk_norm, activation=activation,
        )
        # Characters (or bytes) each token id stands for, from the tokenizer: val/bpc.
        self.register_buffer("unit_lengths", None, persistent=False)
        self._unit: str | None = None
        self._val_sums: torch.Tensor | None = None
        self._val_preference = False

    def activation_checkpointing_blocks(self) -> tuple[type[torch.nn.Module], ...]:
        """The transformer layers (attention + MLP)."""
        return (Block,)

    def forward(self, idx: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T); see `GPT.forward` for the options."""
        return self.net(idx, **kwargs)

    def export_graphs(self) -> dict[str, Any]:
        """``decoder_model``: ``input_ids`` (B, T) -> ``logits`` (B, T, V), the prompt's
        forward pass; ``decoder_with_past_model``: the same with the key/value cache as
        tensors (`DecoderWithPastGraph`), one step of cached generation (Hugging Face
        Optimum's two-graph layout). Ids are those of the model's ``tokenizer.json``; T
        plus the past stays within ``block_size``."""
        from genframe.exporters import ExportGraph

        net = self.net
        shape = (net.n_layer, 0, net.n_head, 0, net.head_dim)

        def ids(batch: int, length: int) -> torch.Tensor:
            gen = torch.Generator().manual_seed(batch * 100 + length)
            return torch.randint(0, net.vocab_size, (batch, length), generator=gen).to(self.device)

        def with_past(batch: int, length: int, past: int) -> dict[str, torch.Tensor]:
            gen = torch.Generator().manual_seed(past)
            full = (shape[0], batch, shape[2], past, shape[4])
            return {"input_ids": ids(batch, length),
                    "past_keys": torch.randn(full, generator=gen).to(self.device),
                    "past_values": torch.randn(full, generator=gen).to(self.device)}

        sequence = {0: "batch", 1: "sequence"}
        past = {1: "batch", 3: "past_sequence"}
        present = {1: "batch", 3: "past_sequence + sequence"}
        notes = {
            "block_size": net.block_size, "vocab_size": net.vocab_size,
            "input_ids": "token ids of tokenizer.json beside this file ({'kind': 'char', 'vocab': "
                         "[...]}: an id is an index into vocab, 0 = <unk>; {'kind': 'bpe', "
                         "'tokenizer': {...}}: a Hugging Face tokenizers file)",
            "logits": "unnormalised next-token scores (B, T, vocab_size)",
            "context": "past_sequence + sequence must stay within block_size; to go on, start "
                       "again from decoder_model (or an empty past) on the last tokens that fit "
                       "(a sliding window, as genframe generate does)",
            "padding": "no attention mask: every row of a batch has the same length (batch "
                       "prompts of equal length, or one row at a time)",
        }
        short = min(3, net.block_size // 2)
        return {
            "decoder_model": ExportGraph(
                DecoderGraph(net), {"input_ids": ids(2, short)}, ("logits",),
                {"input_ids": sequence}, check_inputs=[{"input_ids": ids(3, short + 1)}], notes=notes,
                output_axes={"logits": sequence}),
            "decoder_with_past_model": ExportGraph(
                # Traced with 2 new tokens: torch.export fixes a dimension of size 1 (its
                # 0/1 specialisation), and the step of cached generation is 1 token.
                DecoderWithPastGraph(net), with_past(2, 2, short), ("logits", "present_keys", "present_values"),
                {"input_ids": sequence, "past_keys": past, "past_values": past},
                check_inputs=[with_past(3, 1, short + 1), with_past(1, 1, 1)], notes=notes,
                output_axes={"logits": sequence, "present_keys": present, "present_values": present}),
        }

    @property
    def feature_dim(self) -> int:
        """Width of `text_features`: the model's ``n_embd``."""
        return int(self.hparams.n_embd)

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token features of right-padded texts for another model to read: (B, T) ids
        -> (B, T, n_embd), the final LayerNorm's output (`GPT.hidden_states`).

        The attention is causal, so a real token never sees the padding after it; the
        padded positions' features are meaningless and `mask` (B, T) bool (True = a real
        token) is only checked for shape -- the reader must ignore those positions.

        Raises:
            UserError: texts longer than ``block_size`` tokens.
        """
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"mask must be shaped like ids {tuple(ids.shape)}, got {tuple(mask.shape)}")
        if ids.shape[1] > self.block_size:
            raise UserError(f"a text of {ids.shape[1]} tokens is longer than this language "
                            f"model's context window (block_size={self.block_size})")
        return self.net.hidden_states(ids)

    # -- tokenizer ----------------------------------------------------------------------

    def set_tokenizer(self, tokenizer: Any) -> None:
        vocab = self.hparams.vocab_size
        if tokenizer.vocab_size > vocab:
            raise UserError(
                f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size={vocab}; "
                "set model.vocab_size=null to take the data's size"
            )
        super().set_tokenizer(tokenizer)
        unit = getattr(tokenizer, "unit", None)
        if unit in ("char", "byte") and hasattr(tokenizer, "unit_lengths"):
            lengths = torch.zeros(vocab, dtype=torch.long, device=self.device)
            known = torch.tensor(tokenizer.unit_lengths(), dtype=torch.long)
            lengths[: len(known)] = known.to(self.device)
            self.register_buffer("unit_lengths", lengths, persistent=False)
            self._unit = unit

    # -- objective ----------------------------------------------------------------------

    def token_nll(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Next-token losses of a batch: (nats (B, T), weights (B, T), targets (B, T)).

        Token t predicts token t + 1; the weights are ``loss_mask[:, 1:]`` (the mask of
        the targets) or ones.
        """
        tokens = batch["tokens"]
        x, y = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
        if x.shape[1] > self.block_size:
            raise UserError(
                f"a batch of {x.shape[1]} input tokens is longer than the context window "
                f"model.block_size={self.block_size}; set data.block_size <= {self.block_size}"
            )
        logits = self.net(x)  # (B, T, V)
        # float32 for the log-softmax even under bf16 (autocast does the same).
        nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
        nll = nll.view_as(y)  # (B, T)
        mask = batch.get("loss_mask")
        if mask is None:
            weights = torch.ones_like(nll)
        else:
            if mask.shape != tokens.shape:
                raise ValueError(
                    f"loss_mask has shape {tuple(mask.shape)}, tokens {tuple(tokens.shape)}"
                )
            weights = mask[:, 1:].to(nll.dtype)
        return nll, weights, y

    def sequence_logps(self, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Log-probability (nats, (B,)) of each row's masked targets: the sum over t of
        ``loss_mask[:, t + 1] * log p(tokens[:, t + 1] | tokens[:, :t + 1])``."""
        nll, weights, _ = self.token_nll({"tokens": tokens, "loss_mask": loss_mask})
        return -(nll * weights).sum(dim=1)

    def preference_terms(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """DPO's per-pair loss and reward margin ((B,) each) of a preference batch; both
        sides go through the network in one pass.

        Raises:
            UserError: the batch has no reference log-probabilities (they are computed
                by ``genframe finetune`` from the model it starts from).
        """
        if not REFERENCE_KEYS <= batch.keys():
            raise UserError(
                "preference pairs without the reference model's log-probabilities: DPO trains "
                "against the model fine-tuning starts from; use genframe finetune run=<trained "
                "model> data=preference (they are computed before the first step)")
        n = batch["chosen_tokens"].shape[0]
        mask = torch.cat([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
        logps = self.sequence_logps(torch.cat([batch["chosen_tokens"], batch["rejected_tokens"]]), mask)
        chosen = logps[:n] - batch["reference_chosen_logps"]
        rejected = logps[n:] - batch["reference_rejected_logps"]
        margin = self.hparams.dpo_beta * (chosen - rejected)
        losses = -F.logsigmoid(margin)
        if self.hparams.rpo_alpha:
            lengths = mask[:n, 1:].sum(dim=1).clamp(min=1)
            losses = losses - self.hparams.rpo_alpha * logps[:n] / lengths
        return losses, margin

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if "chosen_tokens" in batch:
            losses, margin = self.preference_terms(batch)
            loss, n = losses.mean(), margin.shape[0]
            if self.should_log_step():
                self.log("train/reward_accuracy", (margin > 0).float().mean(), batch_size=n)
        else:
            nll, weights, _ = self.token_nll(batch)
            loss = (nll * weights).sum() / weights.sum().clamp(min=1)
            n = batch["tokens"].shape[0]
        # Only on the steps whose values reach the loggers: each self.log costs a few
        # hundred microseconds, which is noticeable next to a small model's step.
        if self.should_log_step():
            self.log("train/loss", loss, prog_bar=True, batch_size=n)
            if self._trainer is not None and self.trainer.optimizers:
                lr = self.trainer.optimizers[0].param_groups[0]["lr"]
                self.log("train/lr", lr, batch_size=n)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums = None
        self._val_preference = False

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "chosen_tokens" in batch:
            losses, margin = self.preference_terms(batch)
            # nats, pairs, pairs the chosen side wins, summed margins (see on_validation_epoch_end)
            sums = torch.stack([losses.double().sum(), losses.new_tensor(len(losses), dtype=torch.float64),
                                (margin > 0).double().sum(), margin.double().sum()])
            self._val_sums = sums if self._val_sums is None else self._val_sums + sums
            self._val_preference = True
            return
        nll, weights, y = self.token_nll(batch)
        nats = (nll.double() * weights).sum()
        units = nats.new_zeros(())
        if self.unit_lengths is not None:
            units = (self.unit_lengths[y].double() * weights).sum()
        sums = torch.stack([nats, weights.double().sum(), units])  # nats, targets, units
        self._val_sums = sums if self._val_sums is None else self._val_sums + sums

    def on_validation_epoch_end(self) -> None:
        if self._val_sums is None:
            return
        # Exact corpus averages: sum nats and counts over every batch (and process)
        # first, then divide, rather than averaging per-batch means.
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        self._val_sums = None
        if self._val_preference:
            nats, pairs, wins, margins = sums
            self.log("val/loss", (nats / pairs).float(), prog_bar=True, sync_dist=True)
            self.log("val/reward_accuracy", (wins / pairs).float(), sync_dist=True)
            self.log("val/reward_margin", (margins / pairs).float(), sync_dist=True)
            return
        nats, count, units = sums
        if count <= 0:
            log.warning("validation had no target tokens (loss_mask all 0); no val/loss")
            return
        loss = (nats / count).float()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", loss.exp(), sync_dist=True)
        if self._unit is not None and units > 0:
            key = "val/bpc" if self._unit == "char" else "val/bpb"
            self.log(key, (nats / math.log(2) / units).float(), sync_dist=True)

    # -- optimisation -------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]  # LoRA freezes the base
        if not params:
            raise UserError("the model has no trainable parameters")
        # Decay matrices and embeddings only; biases and norm gains keep their scale.
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if hp.optimizer == "muon":
            # Muon for the blocks' weight matrices; embeddings, the output layer, gains
            # and biases stay with AdamW (modded-nanoGPT).
            in_blocks = {id(p) for name, p in self.net.transformer["h"].named_parameters() if p.dim() == 2}
            matrices = [p for p in params if id(p) in in_blocks]
            others = [{**g, "params": [p for p in g["params"] if id(p) not in in_blocks]} for g in groups]
            optimizer = MuonWithAdamW(matrices, others, lr=hp.lr, weight_decay=hp.weight_decay,
                                      betas=hp.betas)
        else:
            optimizer = adamw(groups, lr=hp.lr, betas=hp.betas)
        schedule = WarmupCosine(hp.warmup_steps, self._decay_steps(), hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def _decay_steps(self) -> int | None:
        if self.hparams.lr_decay_steps is not None:
            return self.hparams.lr_decay_steps
        if self._trainer is None:
            return None
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            log.warning("the run has no step limit, so the learning rate stays at model.lr "
                        "after the warm-up; set model.lr_decay_steps to decay it")
            return None
        return int(total)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if gradient_clip_val is None and self.hparams.grad_clip > 0:
            gradient_clip_val, gradient_clip_algorithm = self.hparams.grad_clip, "norm"
        if not gradient_clip_val:
            return
        from pytorch_lightning.strategies import FSDPStrategy

        strategy = self.trainer.strategy
        if isinstance(strategy, FSDPStrategy) and gradient_clip_algorithm in (None, "norm"):
            # Lightning's FSDP precision cannot clip by norm; the root FSDP module can.
            strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    def example_batch(self, batch_size: int = 4) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(0)
        shape = (batch_size, self.block_size + 1)
        tokens = torch.randint(0, self.hparams.vocab_size, shape, generator=gen)
        return {"tokens": tokens.to(self.device)}

    # -- generation ---------------------------------------------------------------------

    def sample(
        self,
        num_samples: int,
        *,
        condition: dict[str, Any],
        generator: torch.Generator,
        max_new_tokens: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: str | Sequence[str] | None = None,
        use_cache: bool = True,
        stream: Callable[[int, str], None] | None = None,
    ) -> Samples:
        """Continue a prompt (or start from scratch) `num_samples` times.

        Args:
            num_samples: how many texts.
            condition: ``{"prompt": text}`` for the same prompt in every row, or
                ``{"prompt": [text, ...]}`` with one per row; without it every row starts
                from a start token (a newline for a char tokenizer that has one,
                ``<|endoftext|>`` for BPE). Needs a tokenizer. Or ``{"prompt_ids": ids}``
                (a list of token ids, or one list per row): the prompt already encoded,
                e.g. piece by piece as a chat template encodes its training data.
            generator: the seeded generator every token is drawn with.
            max_new_tokens: the most tokens generated per row.
            temperature: divides the logits; 0 picks the most likely token (greedy).
            top_k: sample only among the k most likely tokens.
            top_p: sample only from the smallest set of tokens holding this much
                probability (nucleus sampling).
            stop: a string or strings that end a row; its text stops before the first.
            use_cache: reuse attention keys/values (True) or recompute the whole window
                every step (False; slower, the reference).
            stream: called as ``stream(row, piece)`` with each new piece of a row's text;
                a row's pieces join to its final text.

        Returns:
            `Samples` whose texts are the continuations (the prompts not included).
        Rows longer than the context window continue with a sliding window (see
        `generation.py`); a prompt must leave room for one token.
        """
        _check_options(max_new_tokens, temperature, top_k, top_p, use_cache, stream)
        temperature = float(temperature)
        top_p = None if top_p is None else float(top_p)
        stops = _stop_strings(stop)
        if condition.get("prompt_ids") is not None:
            if condition.get("prompt") is not None:
                raise UserError("condition: give prompt or prompt_ids, not both")
            contexts = self._given_contexts(condition["prompt_ids"], num_samples)
            prompts = [self.tokenizer.decode(c) if self.tokenizer is not None else _ids_text(c)
                       for c in contexts]
        else:
            prompts = self._prompts(condition.get("prompt"), num_samples)
            contexts = self._contexts(prompts, num_samples)
        text_of = self.tokenizer.decode if self.tokenizer is not None else _ids_text
        rows = [
            RowText(text_of, stops, None if stream is None else _row_emitter(stream, i))
            for i in range(num_samples)
        ]
        # Ids the tokenizer does not have (a vocabulary larger than the tokenizer's)
        # can never be decoded: never choose them.
        known = self.tokenizer.vocab_size if self.tokenizer is not None else None

        def choose(logits: torch.Tensor) -> torch.Tensor:
            if known is not None and known < logits.shape[-1]:
                logits = logits.clone()
                logits[:, known:] = float("-inf")
            return choose_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                 generator=generator)

        ids = decode(self.net, contexts, max_new_tokens=max_new_tokens, choose=choose,
                     on_token=lambda r, t: rows[r].add(t), use_cache=bool(use_cache))
        for row in rows:
            if not row.stopped:
                row.finish()

        metadata = {
            "temperature": temperature, "top_k": top_k,
            "top_p": top_p, "max_new_tokens": max_new_tokens, "stop": stops,
            "use_cache": bool(use_cache),
        }
        per_sample = {
            "prompt_tokens": [len(c) if prompts else 0 for c in contexts],
            "tokens_generated": [len(i) for i in ids],
            "finish_reasons": ["stop" if row.stopped else "length" for row in rows],
        }
        conditions = [{"prompt": p} for p in prompts] if prompts else None
        return Samples(texts=[row.text for row in rows], conditions=conditions or [],
                       metadata=metadata, per_sample=per_sample)

    def _prompts(self, value: Any, n: int) -> list[str] | None:
        """The prompt of each row, or None without one."""
        if value is None:
            return None
        if isinstance(value, str):
            prompts = [value] * n
        elif isinstance(value, (list, tuple)):
            prompts = list(value)
            if len(prompts) != n:
                raise UserError(f"condition.prompt: got {len(prompts)} prompts for {n} samples")
            bad = [p for p in prompts if not isinstance(p, str)]
            if bad:
                raise UserError(f"condition.prompt: prompts must be strings, got {bad[0]!r}")
        else:
            raise UserError(
                f"condition.prompt must be a string or a list of strings, got {value!r}"
            )
        if self.tokenizer is None:
            raise UserError(
                "condition.prompt: this model has no tokenizer, so it cannot read a prompt "
                "(a model trained by genframe on text data carries its tokenizer)"
            )
        return prompts

    def _contexts(self, prompts: list[str] | None, n: int) -> list[list[int]]:
        """Token ids each row starts from: its prompt's, or the start token."""
        start = [self._start_id()]
        if prompts is None:
            return [list(start) for _ in range(n)]
        encoded: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            if p in encoded:
                continue
            ids = self.tokenizer.encode(p) or start
            which = f"prompt {i + 1} of {len(prompts)}" if len(set(prompts)) > 1 else "the prompt"
            self._check_fits(len(ids), which)
            encoded[p] = ids
        return [list(encoded[p]) for p in prompts]

    def _given_contexts(self, value: Any, n: int) -> list[list[int]]:
        """Rows' token ids from ``condition["prompt_ids"]`` (one list, or one per row)."""
        single = not (value and all(isinstance(r, (list, tuple)) for r in value))
        rows = [value] * n if single else value
        if len(rows) != n:
            raise UserError(f"condition.prompt_ids: got {len(rows)} prompts for {n} samples")
        vocab = self.hparams.vocab_size
        for i, row in enumerate(rows[:1] if single else rows):  # one list for all: checked once
            which = "the prompt" if single or n == 1 else f"prompt {i + 1} of {n}"
            if not row or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                  for t in row):
                raise UserError(f"condition.prompt_ids: {which} must be a non-empty list of "
                                f"token ids in 0..{vocab - 1}")
            self._check_fits(len(row), which, key="condition.prompt_ids")
        return [list(r) for r in rows]

    def _check_fits(self, length: int, which: str, key: str = "condition.prompt") -> None:
        if length > self.block_size - 1:
            raise UserError(
                f"{key}: {which} is {length} tokens; this model's context "
                f"window is block_size={self.block_size} tokens, and at least one new "
                f"token must fit: shorten it to {self.block_size - 1} tokens or fewer"
            )

    def _start_id(self) -> int:
        from genframe.text.tokenize import start_id

        return start_id(self.tokenizer)


def _ids_text(ids: Sequence[int]) -> str:
    """The text of a row for a model without a tokenizer: its ids, space-separated."""
    return " ".join(str(i) for i in ids)


def _row_emitter(stream: Callable[[int, str], None], row: int) -> Callable[[str], None]:
    return lambda piece: stream(row, piece)


def _stop_strings(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise UserError(
            f"sampling.stop must be a non-empty string or a list of them, got {stop!r}"
        )
    return list(stops)


def _check_options(max_new_tokens, temperature, top_k, top_p, use_cache, stream) -> None:
    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not integer(max_new_tokens) or max_new_tokens < 1:
        raise UserError(f"sampling.max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not number(temperature) or temperature < 0:
        raise UserError(f"sampling.temperature must be a number >= 0 (0: greedy), got "
                        f"{temperature!r}")
    if top_k is not None and (not integer(top_k) or top_k < 1):
        raise UserError(f"sampling.top_k must be an integer >= 1 or null, got {top_k!r}")
    if top_p is not None and (not number(top_p) or not 0 < top_p <= 1):
        raise UserError(f"sampling.top_p must be in (0, 1] or null, got {top_p!r}")
    if not isinstance(use_cache, bool):
        raise UserError(f"sampling.use_cache must be true or false, got {use_cache!r}")
    if stream is not None and not callable(stream):
        raise UserError(f"stream must be a callable stream(row, piece), got {stream!r}")


def _validate(args: dict[str, Any]) -> None:
    """Refuse bad constructor values with a message naming the ``model.`` key."""

    need = argument_check(args)

    if args["vocab_size"] is None:
        raise UserError(
            "model.vocab_size is null: genframe fills it in from the data's tokenizer when "
            "it builds the model with text data; building it directly, pass vocab_size=<int>"
        )
    need(args["vocab_size"] >= 1, "vocab_size", "at least 1")
    for key in ("block_size", "n_layer", "n_head", "n_embd"):
        need(args[key] >= 1, key, "at least 1")
    if args["n_embd"] % args["n_head"]:
        raise UserError(
            f"model.n_embd={args['n_embd']} must be divisible by model.n_head={args['n_head']}"
        )
    for key, valid in (("positions", POSITIONS), ("norm", NORMS), ("activation", ACTIVATIONS),
                       ("optimizer", OPTIMIZERS)):
        if args[key] not in valid:
            raise UserError(f"model.{key} must be one of {valid_list(valid)}, got "
                            f"{args[key]!r}.{did_you_mean(str(args[key]), valid)}")
    if not isinstance(args["qk_norm"], bool):
        raise UserError(f"model.qk_norm must be true or false, got {args['qk_norm']!r}")
    head_dim = args["n_embd"] // args["n_head"]
    if args["positions"] == "rotary" and head_dim % 2:
        raise UserError(
            f"model.positions=rotary needs an even head size, but n_embd / n_head = "
            f"{args['n_embd']} / {args['n_head']} = {head_dim}"
        )
    need(0 <= args["dropout"] < 1, "dropout", "in [0, 1)")
    need(args["lr"] > 0, "lr", "> 0")
    need(args["weight_decay"] >= 0, "weight_decay", ">= 0")
    betas = args["betas"]
    need(len(betas) == 2 and all(0 <= b < 1 for b in betas), "betas", "two numbers in [0, 1)")
    need(args["warmup_steps"] >= 0, "warmup_steps", ">= 0")
    decay = args["lr_decay_steps"]
    need(decay is None or decay >= 1, "lr_decay_steps", "null or at least 1")
    need(0 <= args["min_lr_ratio"] <= 1, "min_lr_ratio", "in [0, 1]")
    need(args["grad_clip"] >= 0, "grad_clip", ">= 0 (0: off)")
    need(args["dpo_beta"] > 0, "dpo_beta", "> 0")
    need(args["rpo_alpha"] >= 0, "rpo_alpha", ">= 0 (0: plain DPO)")
