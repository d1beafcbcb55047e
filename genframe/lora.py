"""LoRA adapters on any genframe model, through `peft`.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes a layer's weight ``W`` and
learns a low-rank update ``W + (alpha / r) * B @ A``. peft's ``inject_adapter_in_model``
swaps the chosen layers of a plain ``nn.Module`` in place for LoRA layers: the model keeps
its class, ``training_step`` and ``generate``; only the targeted layers' state-dict keys
change (``attn.qkv.weight`` becomes ``attn.qkv.base_layer.weight`` next to
``attn.qkv.lora_A.default.weight`` and ``...lora_B.default.weight``).

genframe resolves glob patterns to exact module names itself (peft's own matching is by
name suffix or one regex, with no message that shows the valid names) and records the
resolved config in ``model.model_spec.lora``, so a weights file that holds adapters
rebuilds its model (`genframe.weights.build_from_spec`). peft's ``merge_and_unload``
lives on ``PeftModel``/``LoraModel`` only; for an injected model `merge_lora` does the same
with each LoRA layer's own ``merge()``.

Functions: `apply_lora`, `save_adapter`, `load_adapter`, `merge_lora`, `has_lora`,
`resolve_targets`, `parameter_counts`.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genframe.errors import UserError, valid_list

#: Safetensors metadata key of an adapter file (the LoRA config); the base model's spec
#: goes under `BASE_KEY`. Neither is `genframe.weights.SPEC_KEY`: an adapter file alone
#: cannot rebuild a model.
ADAPTER_KEY = "genframe_lora"
BASE_KEY = "genframe_base_model"
#: Metadata key of a few values of each adapted layer's base weight (`base_signature`), so
#: an adapter is refused on the same model trained elsewhere (same names and shapes).
BASE_SIGNATURE_KEY = "genframe_base_signature"
ADAPTER_FILE = "adapter.safetensors"
#: The layer types peft can wrap with LoRA (its default dispatcher).
SUPPORTED = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ADAPTER = "default"  # peft's adapter name; one adapter per model in genframe


def has_lora(model: nn.Module) -> bool:
    """Whether `model` carries LoRA layers."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def supported_modules(model: nn.Module) -> list[str]:
    """Names of the sub-modules LoRA can adapt, in model order."""
    return [name for name, m in model.named_modules() if name and isinstance(m, SUPPORTED)]


def resolve_targets(model: nn.Module, patterns: Sequence[str], *, key: str = "lora.target_modules") -> list[str]:
    """Exact names of the supported layers matched by glob `patterns` (``"*.attn.qkv"``).

    A pattern matches whole module names (`fnmatch`, case-sensitive). A pattern that
    matches no supported layer is a `UserError` that lists the valid names (layer indices
    shown as ``*`` so the list stays short).
    """
    if isinstance(patterns, str) or not patterns:
        raise UserError(f"{key}: expected a non-empty list of module-name patterns, got {patterns!r}")
    names = supported_modules(model)
    chosen: set[str] = set()
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, str(pattern))]
        if not hits:
            others = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
                      if n and fnmatch.fnmatchcase(n, str(pattern))]
            what = (f"matches only modules LoRA cannot adapt: {valid_list(others, 5)}" if others
                    else "matches no module")
            raise UserError(
                f"{key}: pattern '{pattern}' {what}. LoRA adapts {', '.join(t.__name__ for t in SUPPORTED)}"
                f" layers; this model has: {valid_list(generalise_names(names), 30)}"
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]


def generalise_names(names: Sequence[str]) -> list[str]:
    """``blocks.0.attn.qkv``, ``blocks.1.attn.qkv`` -> ``blocks.*.attn.qkv``."""
    return sorted({".".join("*" if part.isdigit() else part for part in n.split(".")) for n in names})


def apply_lora(model: nn.Module, *, r: int, alpha: float, dropout: float = 0.0,
               target_modules: Sequence[str]) -> dict[str, Any]:
    """Inject LoRA adapters into `model` in place and freeze everything else.

    Args:
        model: any ``nn.Module`` (a genframe model gets ``model_spec.lora``).
        r: the rank of each update.
        alpha: the scale numerator; the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter's input during training.
        target_modules: glob patterns over module names, resolved to the supported layers
            they match (`resolve_targets`).

    Returns:
        A summary: ``target_modules`` (the resolved names), ``trainable_parameters``,
        ``total_parameters`` (base and adapters) and ``trainable_fraction``.
    """
    if has_lora(model):
        raise UserError("the model already carries LoRA adapters; merge them first (merge_lora)")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UserError(f"lora.r: expected a positive integer rank, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise UserError(f"lora.alpha: expected a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UserError(f"lora.dropout: expected a number in [0, 1), got {dropout!r}")
    names = resolve_targets(model, list(target_modules))
    _refuse_tied(model, names)
    config = {"r": int(r), "alpha": float(alpha), "dropout": float(dropout), "target_modules": names}
    _inject(model, config)
    return {"target_modules": names, **parameter_counts(model)}


def _refuse_tied(model: nn.Module, names: list[str]) -> None:
    """A weight shared by two modules (tied embeddings) cannot take a LoRA update: merging
    it would change the other module too."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name in names:
        weight = getattr(model.get_submodule(name), "weight", None)
        shared = [o for o in owners.get(id(weight), []) if o != f"{name}.weight"]
        if shared:
            raise UserError(
                f"lora.target_modules: '{name}' shares its weight with {', '.join(shared)} (tied "
                "weights); LoRA on it would change both when merged. Leave it out of target_modules."
            )


def _inject(model: nn.Module, config: dict[str, Any]) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    # An anchored regex of the exact names: peft's list form matches name *suffixes*, so
    # "mlp.fc" would also hit "blocks.0.mlp.fc".
    regex = "^(?:" + "|".join(re.escape(n) for n in config["target_modules"]) + ")$"
    peft_config = LoraConfig(r=config["r"], lora_alpha=config["alpha"], lora_dropout=config["dropout"],
                             target_modules=regex, bias="none")
    # Names are those of the plain model here; merge_lora restores this state.
    model._genframe_frozen_before_lora = {n for n, p in model.named_parameters() if not p.requires_grad}
    inject_adapter_in_model(peft_config, model, adapter_name=_ADAPTER)
    # peft already marks only adapter weights trainable; say so here rather than rely on it.
    adapter = {id(p) for p in _adapter_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter)
    # The spec carries the config into weights files; the attribute serves any nn.Module.
    model.genframe_lora = {**config, "target_modules": list(config["target_modules"])}
    spec = getattr(model, "model_spec", None)
    if spec is not None:
        spec.lora = dict(model.genframe_lora)
    hook = getattr(model, "on_lora_applied", None)
    if callable(hook):
        hook()


def _adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    from peft.tuners.lora import LoraLayer

    params = []
    for m in model.modules():
        if isinstance(m, LoraLayer):
            for attr in m.adapter_layer_names:  # lora_A, lora_B, lora_embedding_A/B, ...
                params += list(getattr(m, attr).parameters())
    return params


def lora_config(model: nn.Module) -> dict[str, Any]:
    """The LoRA config (r, alpha, dropout, resolved target_modules) of an adapted model."""
    config = getattr(model, "genframe_lora", None)
    if config is None or not has_lora(model):
        raise UserError("the model carries no LoRA adapters (apply_lora or load_adapter first)")
    return config


def parameter_counts(model: nn.Module) -> dict[str, Any]:
    """Trainable and total parameter counts (shared tensors counted once)."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"trainable_parameters": trainable, "total_parameters": total,
            "trainable_fraction": trainable / total if total else 0.0}


def describe(summary: dict[str, Any]) -> str:
    """One line for the user: how many parameters train."""
    return (f"trainable parameters: {summary['trainable_parameters']:,} of "
            f"{summary['total_parameters']:,} ({100 * summary['trainable_fraction']:.2f}%)")


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write only the LoRA weights of `model` to a safetensors file, atomically.

    The metadata holds the LoRA config (`ADAPTER_KEY`) and the base model's spec
    (`BASE_KEY`: the model's spec without ``"lora"``).
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    from genframe.files import atomic_write_bytes

    config = lora_config(model)
    # Keys without the adapter name: "blocks.0.attn.qkv.lora_A.weight".
    state = get_peft_model_state_dict(model, adapter_name=_ADAPTER)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    spec = getattr(model, "model_spec", None)
    base = {k: v for k, v in (spec.to_dict() if spec is not None else {}).items() if k != "lora"}
    meta = {ADAPTER_KEY: json.dumps(config), BASE_KEY: json.dumps(base),
            BASE_SIGNATURE_KEY: json.dumps(base_signature(model, config["target_modules"]))}
    atomic_write_bytes(Path(path), save(state, metadata=meta))
    return Path(path)


_SIGNATURE_VALUES = 16  # per layer: two different trainings never agree on all of them


def base_signature(model: nn.Module, names: Sequence[str]) -> dict[str, list[float]]:
    """A few values of each named layer's base weight, at fixed positions (seeded by the
    layer's name): what an adapter was trained on top of. Compared with a relative
    tolerance (`same_signature`), so the same weights kept in half precision still match.
    """
    import zlib

    out = {}
    for name in names:
        layer = model.get_submodule(name)
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        weight = base.weight.detach().flatten()
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        at = torch.randint(0, weight.numel(), (_SIGNATURE_VALUES,), generator=g)
        out[name] = [float(v) for v in weight[at.to(weight.device)].float().cpu()]
    return out


def same_signature(a: dict[str, list[float]], b: dict[str, list[float]]) -> bool:
    """Whether two `base_signature` values describe the same weights."""
    if set(a) != set(b):
        return False
    return all(len(a[k]) == len(b[k]) and torch.allclose(torch.tensor(a[k]), torch.tensor(b[k]),
                                                         rtol=2e-2, atol=1e-4) for k in a)


def read_adapter(path: str | Path, *, key: str = "adapter", where: str | None = None,
                 ) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """Return (LoRA config, base model spec, adapter weights) from an adapter file.

    Raises:
        UserError: naming `where` (default ``key=path``) when the file is missing, empty,
            damaged or not a genframe adapter file.
    """
    config, base, _, state = _read_adapter(path, where=where or f"{key}={path}")
    return config, base, state


def _read_adapter(path: str | Path, *, where: str):
    """(config, base spec, base signature or None, weights) of an adapter file."""
    from genframe.files import read_safetensors

    meta, state = read_safetensors(Path(path).expanduser(), key=where)
    if ADAPTER_KEY not in meta:
        hint = (" (it holds a whole model: give it as ckpt=, or its run as run=)"
                if "genframe" in meta else "")
        raise UserError(f"{where}: not a genframe LoRA adapter file (no '{ADAPTER_KEY}' "
                        f"metadata){hint}; give the adapter.safetensors of a method=lora run")
    try:
        config = json.loads(meta[ADAPTER_KEY])
        base = json.loads(meta.get(BASE_KEY, "{}"))
        signature = json.loads(meta.get(BASE_SIGNATURE_KEY, "null"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: its metadata is not valid JSON ({exc}); the file is damaged") from exc
    if not isinstance(config, dict) or not {"r", "alpha", "dropout", "target_modules"} <= set(config):
        raise UserError(f"{where}: its LoRA config is incomplete (r, alpha, dropout, "
                        "target_modules); the file is damaged")
    return config, base, signature, state


def load_adapter(model: nn.Module, path: str | Path, *, where: str | None = None) -> dict[str, Any]:
    """Add the adapters of an adapter file (`save_adapter`) to `model` and load their
    weights. Returns the summary of `apply_lora`.

    The adapter must have been made for this model: the same registered name, layers of
    the same shapes, and (for files that record it) the same base weights of the adapted
    layers -- an adapter trained on another run of the same model is refused.

    Raises:
        UserError: naming `where` (default ``adapter=path``) and what does not fit.
    """
    where = where or f"adapter={path}"
    config, base, signature, state = _read_adapter(path, where=where)
    spec = getattr(model, "model_spec", None)
    name = spec.name if spec is not None else None
    if base.get("name") and name and base["name"] != name:
        raise UserError(f"{where}: made for model '{base['name']}', not '{name}'; give the run "
                        "it was fine-tuned from (its run.json names it under started_from)")
    try:
        summary = apply_lora(model, r=config["r"], alpha=config["alpha"], dropout=config["dropout"],
                             target_modules=config["target_modules"])
    except UserError as exc:
        raise UserError(f"{where}: its modules do not fit this model: {exc}") from exc
    if signature is not None:
        try:
            ours = base_signature(model, list(signature))
        except (AttributeError, IndexError, RuntimeError):
            ours = {}
        if not same_signature(signature, ours):
            raise UserError(
                f"{where}: made for other weights of model '{name or base.get('name')}' (the "
                "base weights of its layers differ: it was trained on top of another run); "
                "give the run it was fine-tuned from (its run.json names it under started_from)"
            )
    load_lora_weights(model, state, where=where)
    return summary


def load_lora_weights(model: nn.Module, state: dict[str, torch.Tensor], *, where: str) -> None:
    """Load adapter weights (keys without the adapter name) into an adapted model."""
    from peft import set_peft_model_state_dict

    try:
        result = set_peft_model_state_dict(model, state, adapter_name=_ADAPTER)
    except RuntimeError as exc:  # shape mismatches from load_state_dict
        raise UserError(f"{where}: the adapter weights do not fit the model ({str(exc).splitlines()[-1].strip()})") from exc
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise UserError(
            f"{where}: the adapter weights do not fit the model: unexpected {result.unexpected_keys[:5]}, "
            f"missing {missing[:5]}"
        )


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base layer and put the plain layer back, in place.

    The state dict has the plain model's keys again, ``model_spec.lora`` becomes None,
    and each parameter's ``requires_grad`` is as it was before `apply_lora` froze it (peft's
    ``merge_and_unload`` would leave the base frozen). Returns `model`.
    """
    from peft.tuners.lora import LoraLayer

    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in targets:
        # safe_merge: merge into a copy and refuse NaNs before touching the base weight.
        try:
            layer.merge(safe_merge=True)
        except ValueError as exc:
            raise UserError(f"cannot merge the LoRA adapter of '{name}': {exc}") from exc
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    frozen = getattr(model, "_genframe_frozen_before_lora", set())
    for pname, p in model.named_parameters():
        p.requires_grad_(pname not in frozen)
    for attr in ("peft_config", "genframe_lora", "_genframe_frozen_before_lora"):
        if hasattr(model, attr):
            delattr(model, attr)
    spec = getattr(model, "model_spec", None)
    if spec is not None:
        spec.lora = None
    return model
