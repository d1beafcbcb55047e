"""Exported networks: what a model hands to `genframe export format=onnx|torchscript`, the
two exporters, and the check that runs every exported file against PyTorch.

A model names the networks an application needs (a VAE's decoder, a GAN's generator,
one denoising step of a U-Net, a language model's forward with and without its key/value
cache) as `ExportGraph` values from `GenerativeModule.export_graphs`. Each is exported
on its own: ONNX with `torch.onnx.export` (the `torch.export`-based exporter, which needs
``onnxscript``) and run back with onnxruntime; TorchScript with `torch.jit.trace` and run
back with `torch.jit.load`. The names of the inputs and outputs follow diffusers and
Hugging Face Optimum where they have one (``sample``, ``timestep``, ``input_ids``,
``logits``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genframe.errors import UserError

GRAPH_FORMATS = ("onnx", "torchscript")
FORMATS = ("safetensors", *GRAPH_FORMATS)
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# An exported file agrees with PyTorch when every output differs by at most this much,
# relative to the output's largest magnitude (at least 1): float32 kernels that sum in
# another order differ by ~1e-6 of the scale; a wrong graph differs by the scale itself.
RELATIVE_TOLERANCE = 1e-3
# Graphs with more parameter bytes than this keep their weights in a `<name>.onnx.data`
# file beside the graph (protobuf files stop at 2 GiB).
ONNX_INLINE_BYTES = 1 << 30

log = logging.getLogger(__name__)


@dataclass
class ExportGraph:
    """One network of a model, ready to export: a module and example inputs.

    Args:
        module: an `nn.Module` whose ``forward`` takes the `inputs` as positional
            arguments in their order and returns a tensor or a tuple of tensors (one per
            name in `outputs`). It should hold only the parts it runs.
        inputs: example input tensors by name (the names the exported file uses).
        outputs: the names of the outputs.
        dynamic: the axes that may change size, per input: ``{"sample": {0: "batch"}}``;
            an axis name shared between inputs means the same size.
        check_inputs: more input sets with other sizes of the dynamic axes; the exported
            file is run on these as well, which catches a size baked into the graph.
        notes: what an application needs to use the graph (value ranges, the noise
            schedule, the null label), written to ``export.json``.
        output_axes: named axes of the outputs, as `dynamic` names the inputs'; default:
            axis 0 is ``batch`` when axis 0 of every input is.
    """

    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)
    check_inputs: list[dict[str, torch.Tensor]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    output_axes: dict[str, dict[int, str]] | None = None

    def describe(self) -> dict[str, Any]:
        """The inputs and outputs with their shapes (named axes for dynamic ones) and
        dtypes, for ``export.json``."""
        def shape(name: str, tensor: torch.Tensor) -> list[Any]:
            names = self.dynamic.get(name, {})
            return [names.get(i, n) for i, n in enumerate(tensor.shape)]

        outputs = _as_tuple(self.run(self.inputs))
        axes = self.output_axes
        if axes is None:
            batched = all(self.dynamic.get(k, {}).get(0) == "batch" for k in self.inputs)
            axes = {k: {0: "batch"} for k in self.outputs} if batched else {}
        return {
            "inputs": [{"name": k, "shape": shape(k, v), "dtype": str(v.dtype).removeprefix("torch.")}
                       for k, v in self.inputs.items()],
            "outputs": [{"name": k, "shape": [axes.get(k, {}).get(i, n) for i, n in enumerate(v.shape)],
                         "dtype": str(v.dtype).removeprefix("torch.")}
                        for k, v in zip(self.outputs, outputs)],
            **({"notes": self.notes} if self.notes else {}),
        }

    def run(self, inputs: dict[str, torch.Tensor]) -> Any:
        """PyTorch's outputs for `inputs` (no gradients)."""
        with torch.no_grad():
            return self.module(*inputs.values())


def check_format(fmt: str) -> None:
    """Raises UserError unless `fmt` is one of `FORMATS`, or its packages are missing."""
    if fmt not in FORMATS:
        raise UserError(f"format={fmt}: unknown export format; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
        if missing:
            raise UserError(f"format=onnx needs {', '.join(missing)}: pip install 'genframe[onnx]'")


def export_graph(graph: ExportGraph, path: Path, fmt: str) -> dict[str, Any]:
    """Export `graph` to `path` in `fmt` and check it: the file is loaded back and run on
    the example inputs and every `ExportGraph.check_inputs` set, against PyTorch.

    Returns:
        ``{"file", "max_abs_diff" (the largest difference over all outputs and input
        sets), "export_seconds", ...graph.describe()}``.

    Raises:
        UserError: the exporter cannot express the network (the first line of its
            error), or the exported file disagrees with PyTorch beyond
            `RELATIVE_TOLERANCE`. The caller removes the files.
    """
    graph.module.eval()
    started = time.perf_counter()
    try:
        with _quiet():
            if fmt == "onnx":
                _export_onnx(graph, path)
            else:
                _export_torchscript(graph, path)
    except UserError:
        raise
    except Exception as exc:  # the exporters raise many kinds; all mean "cannot export"
        cause = exc
        while cause.__cause__ is not None:  # torch.onnx wraps torch.export's error
            cause = cause.__cause__
        reason = (str(cause).strip().splitlines() or [""])[0][:300]
        raise UserError(f"the exporter for format={fmt} cannot express this network: "
                        f"{type(cause).__name__}: {reason}") from exc
    seconds = time.perf_counter() - started
    run = _onnx_runner(path) if fmt == "onnx" else _torchscript_runner(path)
    worst = 0.0
    for inputs in [graph.inputs, *graph.check_inputs]:
        expected = [t.float() for t in _as_tuple(graph.run(inputs))]
        try:
            got = run(inputs)
        except Exception as exc:  # onnxruntime's InvalidArgument, TorchScript's RuntimeError
            reason = (str(exc).strip().splitlines() or [""])[0][:300]
            raise UserError(f"the exported {fmt} graph refuses inputs of shapes {_shapes(inputs)} that "
                            f"PyTorch runs (a size is baked into it): {reason}") from exc
        if len(got) != len(expected):
            raise UserError(f"the exported file returns {len(got)} outputs, PyTorch {len(expected)}")
        for name, want, have in zip(graph.outputs, expected, got):
            if tuple(have.shape) != tuple(want.shape):
                raise UserError(f"output {name}: the exported file gives shape {tuple(have.shape)}, "
                                f"PyTorch {tuple(want.shape)} (inputs {_shapes(inputs)})")
            diff = float((have.float() - want).abs().max()) if want.numel() else 0.0
            scale = max(1.0, float(want.abs().max()) if want.numel() else 0.0)
            if not diff <= RELATIVE_TOLERANCE * scale:
                raise UserError(f"output {name}: the exported file differs from PyTorch by "
                                f"{diff:.3g} (allowed {RELATIVE_TOLERANCE * scale:.3g}) on inputs "
                                f"{_shapes(inputs)}")
            worst = max(worst, diff)
    return {"file": path.name, "max_abs_diff": worst, "checked_input_sets": 1 + len(graph.check_inputs),
            "export_seconds": round(seconds, 2), **graph.describe()}


def _export_onnx(graph: ExportGraph, path: Path) -> None:
    names = list(graph.inputs)
    dims: dict[str, Any] = {}
    specs = [{i: dims.setdefault(axis, torch.export.Dim(axis)) for i, axis in graph.dynamic[name].items()}
             if graph.dynamic.get(name) else None for name in names]
    # By position, as torch.export binds them to forward's parameters: a *args parameter
    # takes the rest as one tuple.
    params = list(inspect.signature(graph.module.forward).parameters.values())
    star = next((i for i, p in enumerate(params) if p.kind is p.VAR_POSITIONAL), None)
    dynamic_shapes = tuple(specs) if star is None else (*specs[:star], tuple(specs[star:]))
    size = sum(p.numel() * p.element_size() for p in graph.module.parameters())
    torch.onnx.export(
        graph.module, tuple(graph.inputs.values()), str(path), dynamo=True,
        input_names=names, output_names=list(graph.outputs),
        dynamic_shapes=dynamic_shapes if any(v is not None for v in specs) else None,
        external_data=size > ONNX_INLINE_BYTES, verbose=False,
    )


def _export_torchscript(graph: ExportGraph, path: Path) -> None:
    # A graph may hold a LightningModule, whose `trainer` property raises outside a
    # Trainer when the tracer looks at every attribute; Lightning's own `to_torchscript`
    # sets this flag for the same reason.
    from pytorch_lightning.core.module import _jit_is_scripting

    # Parameters traced without requires_grad: the saved module's outputs need no
    # `.detach()` or `torch.no_grad()` in an application.
    flags = [(p, p.requires_grad) for p in graph.module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with _jit_is_scripting():
            traced = torch.jit.trace(graph.module, tuple(graph.inputs.values()), check_trace=False)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    traced.save(str(path))


def _onnx_runner(path: Path):
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    expected = [i.name for i in session.get_inputs()]

    def run(inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # The exporter drops inputs the graph does not read (e.g. a mask that only
        # pools); feed the ones it kept.
        feed = {k: v.detach().cpu().numpy() for k, v in inputs.items() if k in expected}
        return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feed)]

    return run


def _torchscript_runner(path: Path):
    module = torch.jit.load(str(path), map_location="cpu")

    def run(inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(_as_tuple(module(*inputs.values())))

    return run


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _shapes(inputs: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())


@contextlib.contextmanager
def _quiet():
    """The exporters' progress prints and deprecation warnings, kept off the terminal
    (the log keeps them at debug level)."""
    buffer = io.StringIO()
    chatty = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in chatty]
    with warnings.catch_warnings(), contextlib.redirect_stdout(buffer):
        warnings.simplefilter("ignore")
        for logger in chatty:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(chatty, levels):
                logger.setLevel(level)
            if buffer.getvalue().strip():
                log.debug("%s", buffer.getvalue())


def latent_decoder_graph(module: nn.Module, latent_shape: tuple[int, ...], *, num_classes: int = 0,
                         notes: dict[str, Any] | None = None) -> ExportGraph:
    """The graph of a decoder from latents to images: ``module(latents[, labels])`` with
    latents (B, *latent_shape) and, when `num_classes` > 0, class labels (B,) (long),
    returning ``images`` (B, C, H, W). The batch axis is dynamic; the check runs batch 3
    beside the example's 2."""
    def inputs(batch: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(batch)
        device = next(module.parameters()).device
        made = {"latents": torch.randn((batch, *latent_shape), generator=gen).to(device)}
        if num_classes:
            made["labels"] = (torch.arange(batch) % num_classes).to(device)
        return made

    example = inputs(2)
    return ExportGraph(module, example, ("images",), {k: {0: "batch"} for k in example},
                       check_inputs=[inputs(3)], notes=dict(notes or {}))
