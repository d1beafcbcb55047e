"""The decoder-only transformer network (GPT-2 shape) and its key/value cache.

A plain `nn.Module`: no Lightning, no tokenizer, no sampling. Module names follow
nanoGPT (https://github.com/karpathy/nanoGPT) and GPT-2 (``transformer.wte``,
``h.<i>.attn.c_attn``, ``mlp.c_proj``, ``lm_head``) so LoRA targets and weight converters
written for those work here too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

POSITIONS = ("learned", "rotary")
#: ``norm``: LayerNorm (GPT-2) or RMSNorm (Zhang & Sennrich 2019, LLaMA).
NORMS = ("layernorm", "rmsnorm")
#: ``activation`` of the MLP: GELU (GPT-2) or squared ReLU (So et al. 2021, "Primer").
ACTIVATIONS = ("gelu", "relu2")
ROPE_BASE = 10000.0


class KVCache:
    """Keys and values of every layer for a batch of sequences.

    The storage is allocated on the first write, with the dtype of the keys written
    (so it follows autocast), and holds up to `capacity` positions. Layer ``i`` writes
    its new keys at ``[length, length + T)`` with `update`; the network calls `advance`
    once all layers have written. `select` keeps some rows (finished ones leave).
    """

    def __init__(self, n_layer: int, capacity: int) -> None:
        self.n_layer = n_layer
        self.capacity = capacity
        self.length = 0
        self.k: torch.Tensor | None = None  # (n_layer, B, H, capacity, D)
        self.v: torch.Tensor | None = None
        self._k: tuple[torch.Tensor, ...] = ()  # per layer, (B, H, capacity, D)
        self._v: tuple[torch.Tensor, ...] = ()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, T, D) of `layer`; return all of its keys and values so far,
        each (B, H, length + T, D)."""
        B, H, T, D = k.shape
        if self.k is None:
            shape = (self.n_layer, B, H, self.capacity, D)
            # Uninitialised: only columns below `length` are read, and all were written.
            self.k = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(shape, dtype=v.dtype, device=v.device)
            self._split()
        end = self.length + T
        if end > self.capacity:
            raise RuntimeError(f"KVCache: {end} positions do not fit its capacity {self.capacity}")
        keys, values = self._k[layer], self._v[layer]  # (B, H, capacity, D) views
        keys.narrow(2, self.length, T).copy_(k)
        values.narrow(2, self.length, T).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def _split(self) -> None:
        # Per-layer views, made once: a decode step then costs two narrows per layer.
        self._k, self._v = self.k.unbind(0), self.v.unbind(0)

    def advance(self, n: int) -> None:
        self.length += n

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (a long tensor of indices)."""
        if self.k is not None:
            self.k = self.k[:, rows]
            self.v = self.v[:, rows]
            self._split()


def rotary_angles(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for position ids (B, T): each (B, 1, T, D/2).

    RoFormer (Su et al. 2021, https://arxiv.org/abs/2104.09864): pair i of a head rotates
    by position * base^(-2i/D). Computed in float32 on the fly (no buffer to round in
    bf16 or to save), which is cheap next to the attention itself.
    """
    half = head_dim // 2
    exponent = torch.arange(half, device=positions.device, dtype=torch.float32) / half
    inv_freq = ROPE_BASE ** -exponent  # (D/2,)
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the halves (x1, x2) of each head of x (B, H, T, D) (GPT-NeoX layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def make_norm(kind: str, dim: int, bias: bool) -> nn.Module:
    """The normalisation layer `kind` (`NORMS`) over the last `dim` features."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6)
    return nn.LayerNorm(dim, bias=bias)


def dropout_layer(p: float) -> nn.Module:
    """`nn.Dropout(p)`, or `nn.Identity()` for p = 0: a no-op call per layer and token
    costs about 2% of cached generation on a CPU."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class SquaredReLU(nn.Module):
    """relu(x)^2 (So et al. 2021, https://arxiv.org/abs/2109.08668)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; with `qk_norm`, queries and keys are
    RMS-normalised per head before the rotary rotation and the dot product (Dehghani et
    al. 2023, https://arxiv.org/abs/2302.05442), which bounds the attention logits."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool,
                 qk_norm: bool = False) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # q, k, v of every head
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = dropout_layer(dropout)
        head_dim = n_embd // n_head
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        attn_mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
        causal: bool = True,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C).

        Args:
            rope: cos and sin of the rotary angles, each (B, 1, T, D/2); None for learned
                positions.
            attn_mask: boolean (B, 1, T, L) (or broadcastable), True where a query may
                attend to a key, L = cached + new positions. It is needed whenever the
                cache holds keys and T > 1: SDPA's ``is_causal`` aligns its triangle to
                the top left, which is right only without past keys.
            cache: a `KVCache` (or `PastKeyValues`) to read and extend, layer `layer`.
            causal: without `attn_mask`, query t sees keys 0..t (True) or every key
                (False: one new token over a cache, with nothing to hide).
        """
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        shape = (B, T, self.n_head, C // self.n_head)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # 3 x (B, H, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, L, D), L = past + T
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool, activation: str = "gelu") -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = SquaredReLU() if activation == "relu2" else nn.GELU()  # GPT-2's module name
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = dropout_layer(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) (GPT-2)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, norm: str = "layernorm",
                 qk_norm: bool = False, activation: str = "gelu") -> None:
        super().__init__()
        self.ln_1 = make_norm(norm, n_embd, bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias, qk_norm)
        self.ln_2 = make_norm(norm, n_embd, bias)
        self.mlp = MLP(n_embd, dropout, bias, activation)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                attn_mask: torch.Tensor | None, cache: KVCache | None, layer: int,
                causal: bool = True) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); the other arguments as for `CausalSelfAttention`."""
        x = x + self.attn(self.ln_1(x), rope, attn_mask, cache, layer, causal)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A decoder-only transformer language model: token ids (B, T) -> logits (B, T, V).

    Args:
        vocab_size: number of token ids V.
        block_size: context length: the most positions one forward pass may see.
        n_layer, n_head, n_embd: depth, attention heads, width.
        dropout: dropout on the embeddings, the attention weights and both residual
            branches (training only).
        bias: biases in the linear layers and LayerNorms.
        positions: ``"learned"`` (an embedding per position, GPT-2) or ``"rotary"``
            (q and k rotated by their position, RoFormer).
        tie_weights: share the token embedding with the output projection.
        norm: ``"layernorm"`` (GPT-2) or ``"rmsnorm"`` (`NORMS`).
        qk_norm: RMS-normalise queries and keys per head (`CausalSelfAttention`).
        activation: the MLP's ``"gelu"`` (GPT-2) or ``"relu2"`` (`ACTIVATIONS`).
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        dropout: float = 0.0,
        bias: bool = False,
        positions: str = "learned",
        tie_weights: bool = True,
        norm: str = "layernorm",
        qk_norm: bool = False,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        for name, value, valid in (("positions", positions, POSITIONS), ("norm", norm, NORMS),
                                   ("activation", activation, ACTIVATIONS)):
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.rotary = positions == "rotary"
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab_size, n_embd),
            "drop": dropout_layer(dropout),
            "h": nn.ModuleList(Block(n_embd, n_head, dropout, bias, norm, qk_norm, activation)
                               for _ in range(n_layer)),
            "ln_f": make_norm(norm, n_embd, bias),
        })
        if not self.rotary:
            self.transformer["wpe"] = nn.Embedding(block_size, n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            # One tensor for both (Press & Wolf 2017); the optimizer sees it once.
            self.lm_head.weight = self.transformer["wte"].weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual
        # stream's variance does not grow with depth (two projections per block).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.n_layer, capacity)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids `idx` (B, T); (B, 1, V) with `last_only`.

        Args:
            positions: position ids (B, T), each below `block_size`; default: the
                positions after the cache's (0.. for no cache). Generation passes
                per-row ids to left-padded batches.
            attn_mask: boolean (B, 1, T, L) (or broadcastable), True where a query may
                attend to a key, L = cached + new positions; default: causal.
            cache: a `KVCache` to read past keys/values from and append the new ones to.
            last_only: project only the last position to logits (generation).
        """
        x = self.hidden_states(idx, positions=positions, attn_mask=attn_mask, cache=cache)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)  # (B, T, V)

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The last block's features after the final LayerNorm, (B, T, n_embd), for
        token ids `idx` (B, T): what the LM head reads, and what a text-to-image model
        uses as text features. Options as for `forward`."""
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            if past + T > self.block_size:
                raise ValueError(
                    f"{past + T} positions exceed the context window block_size={self.block_size}"
                )
            positions = torch.arange(past, past + T, device=idx.device).expand(B, T)
        if attn_mask is None and past and T > 1:
            # Causal with past keys: query t sees keys 0 .. past + t.
            attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=idx.device)
            attn_mask = attn_mask.tril(diagonal=past)
        # One new query after past keys sees all of them: no mask, so SDPA takes its
        # fused kernel (a boolean mask would be turned into an additive one every layer).
        causal = attn_mask is None and not past  # (mask first: export traces a symbolic past)
        x = self.transformer["wte"](idx)  # (B, T, C)
        rope = None
        if self.rotary:
            rope = rotary_angles(positions, self.head_dim)
        else:
            x = x + self.transformer["wpe"](positions)
        x = self.transformer["drop"](x)
        for i, block in enumerate(self.transformer["h"]):
            x = block(x, rope, attn_mask, cache, i, causal)
        if cache is not None:
            cache.advance(T)
        return self.transformer["ln_f"](x)  # (B, T, C)


class PastKeyValues:
    """A key/value cache held in plain tensors, for exported graphs (no state between
    calls): the past keys and values (n_layer, B, H, P, D) come in, and `update` makes
    each layer's present ones (past + new) by concatenation; `present` stacks them,
    (n_layer, B, H, P + T, D). Duck-types `KVCache` for `GPT.forward`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = keys
        self.values = values
        self.length = keys.shape[3]
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        k = torch.cat([self.keys[layer].to(k.dtype), k], dim=2)
        v = torch.cat([self.values[layer].to(v.dtype), v], dim=2)
        self._k.append(k)
        self._v.append(v)
        return k, v

    def advance(self, n: int) -> None:
        """`KVCache.advance`'s counterpart: nothing to count here, as each call of an
        exported graph starts from the past it is given."""

    def present(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack(self._k), torch.stack(self._v)


class DecoderGraph(nn.Module):
    """For export: ``input_ids`` (B, T) -> ``logits`` (B, T, V), positions 0..T-1."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.gpt(input_ids)


class DecoderWithPastGraph(nn.Module):
    """For export: one step with the key/value cache as tensors.

    ``input_ids`` (B, T) at positions P..P+T-1, ``past_keys``/``past_values``
    (n_layer, B, n_head, P, head_dim) -> ``logits`` (B, T, V) and ``present_keys``/
    ``present_values`` (n_layer, B, n_head, P + T, head_dim), the next call's past. The
    first step runs `DecoderGraph` and takes the keys and values from here, or passes an
    empty past (P = 0) where the runtime allows it.
    """

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor):
        B, T = input_ids.shape
        query = torch.arange(T, device=input_ids.device) + past_keys.shape[3]  # (T,)
        keys = torch.arange(past_keys.shape[3] + T, device=input_ids.device)  # (P + T,)
        mask = keys[None, :] <= query[:, None]  # (T, P + T): causal over past and new
        cache = PastKeyValues(past_keys, past_values)
        logits = self.gpt(input_ids, positions=query.expand(B, T), attn_mask=mask, cache=cache)
        return (logits, *cache.present())
