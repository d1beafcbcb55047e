"""Optimizers the model families share: AdamW in its fastest form for the device, and
Muon for weight matrices with AdamW for the rest, stepped as one optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer


def adamw(params: Iterable[Any], *, lr: float, weight_decay: float = 0.0,
          betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over `params` (tensors or parameter groups), with
    torch's fused kernel when every tensor is a floating-point tensor on the CPU or a CUDA
    device (one kernel per step instead of several per tensor group), else the foreach
    implementation. The update is AdamW's either way; see docs/BENCHMARKS.md for what
    fused costs and saves."""
    params = list(params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                             **implementation(params))


def implementation(params: Sequence[Any]) -> dict[str, bool]:
    """``{"fused": True}`` when torch's fused Adam/AdamW kernel can take every tensor of
    `params` (tensors or parameter groups: floating point, on the CPU or a CUDA device),
    else ``{"foreach": True}``; keyword arguments for `torch.optim.Adam` and ``AdamW``."""
    tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    fused = bool(tensors) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)
    return {"fused": True} if fused else {"foreach": True}


def newton_schulz(update: torch.Tensor, coefficients: Sequence[float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """An approximately orthogonal matrix with `update`'s singular vectors (``U S' V^T``,
    S' ~ 0.5-1.5): Muon's quintic Newton-Schulz iteration (Jordan et al. 2024; the same
    coefficients and steps as `torch.optim.Muon`), computed in `dtype`.

    Args:
        update: a 2-D tensor (rows, cols).
        coefficients: (a, b, c) of X <- a X + (b A + c A^2) X, A = X X^T.
        steps: iterations.
        eps: floor of the norm `update` is divided by first.
        dtype: bfloat16 where matmuls in it are fast (CUDA, CPUs with AMX), else float32.
    """
    a, b, c = coefficients
    x = update.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls on `device` run in hardware (CUDA with bf16, or a CPU with
    AMX); elsewhere torch emulates them, several times slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        from genframe.hardware import cpu_has_amx_bf16

        return cpu_has_amx_bf16()
    return False


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` (same arguments, state and update), with the Newton-Schulz
    iterations in float32 on devices without fast bfloat16 matmuls (`fast_bf16`), where
    torch's bfloat16 iterations are emulated: on a CPU without AMX they made a small
    language model's whole training step about 6x slower."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = _evaluate(closure)
        for group in self.param_groups:
            dtype = torch.bfloat16 if group["params"] and fast_bf16(group["params"][0].device) else torch.float32
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
                lr = float(group["lr"]) * _muon_lr_ratio(group["adjust_lr_fn"], p.shape)
                p.mul_(1 - float(group["lr"]) * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr)
        return loss


def _muon_lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """`torch.optim.Muon`'s learning-rate scale for a (A, B) matrix."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":  # Liu et al. 2025: the update's RMS of AdamW's
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "spectral_unclamped":
        return math.sqrt(rows / cols)
    return math.sqrt(max(1, rows / cols))  # "original" (Jordan et al. 2024)


class MuonWithAdamW(Optimizer):
    """Muon for the hidden weight matrices, AdamW for every other tensor, as one optimizer
    (one ``step``, one ``state_dict``, one list of ``param_groups`` that learning-rate
    schedulers and gradient clipping see whole).

    Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) orthogonalises
    each matrix's momentum with Newton-Schulz iterations; it is `torch.optim.Muon` (as
    `Muon`, in float32 where bfloat16 is slow), with
    ``adjust_lr_fn="match_rms_adamw"`` (Liu et al. 2025, "Muon is Scalable for LLM
    Training", https://arxiv.org/abs/2502.16982) so that one learning rate and weight
    decay serve both halves. Embeddings, the output layer, gains and biases stay with
    AdamW, as in modded-nanoGPT.

    Args:
        matrices: 2-D parameters for Muon (the transformer blocks' linear weights).
        others: parameter groups for AdamW (dicts with ``params`` and any AdamW option).
        lr: the learning rate of both.
        weight_decay: Muon's decoupled weight decay (the AdamW groups carry their own).
        betas: AdamW's betas.
        momentum: Muon's momentum (Nesterov).

    Raises:
        ValueError: a Muon parameter that is not 2-D; no parameters at all.
    """

    def __init__(self, matrices: Sequence[torch.nn.Parameter], others: Sequence[dict[str, Any]], *,
                 lr: float, weight_decay: float, betas: Sequence[float] = (0.9, 0.95),
                 momentum: float = 0.95) -> None:
        members: list[Optimizer] = []
        if matrices:
            members.append(Muon(list(matrices), lr=lr, weight_decay=weight_decay,
                                momentum=momentum, adjust_lr_fn="match_rms_adamw"))
        groups = [g for g in others if g["params"]]
        if groups:
            members.append(adamw(groups, lr=lr, betas=betas))
        if not members:
            raise ValueError("MuonWithAdamW: no parameters to optimise")
        self.members = members
        super().__init__([p for m in members for g in m.param_groups for p in g["params"]], {"lr": lr})
        # The members' own group dicts: a scheduler or clipping that changes one changes
        # the member's.
        self.param_groups = [g for m in members for g in m.param_groups]

    @property
    def state(self) -> dict:  # type: ignore[override]
        """Every member's per-parameter state (the dicts themselves, so moving a tensor
        in one moves it in the member)."""
        merged: dict = {}
        for member in getattr(self, "members", ()):
            merged.update(member.state)
        return merged

    @state.setter
    def state(self, value: Any) -> None:
        """Optimizer.__init__ sets an empty state; the members hold the real one."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = _evaluate(closure)
        for member in self.members:
            member.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for member in self.members:
            member.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"members": [m.state_dict() for m in self.members]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        saved = state_dict.get("members")
        if not isinstance(saved, list) or len(saved) != len(self.members):
            raise ValueError("MuonWithAdamW.load_state_dict: the state of another optimizer")
        for member, state in zip(self.members, saved):
            member.load_state_dict(state)
        self.param_groups = [g for m in self.members for g in m.param_groups]


def _evaluate(closure) -> Any:
    """The loss of an optimizer's `closure` (forward and backward, with gradients on
    inside ``step``'s ``no_grad``), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
