"""What the server serves: models by name, each with its worker thread, and the limits
every request is held to."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genframe.errors import UserError
from genframe.serving.worker import ModelWorker


@dataclass(frozen=True)
class Limits:
    """Bounds on one request (refused with a 4xx beyond them).

    Args:
        max_samples: samples (images or texts, ``n``) one request may ask for.
        max_new_tokens: tokens one text may grow by (``max_tokens``); also the default.
        max_steps: sampler steps of a diffusion request (``steps``).
        max_prompt_chars: characters of a prompt (or of all chat messages together).
        max_body_bytes: bytes of a request body (413 beyond).
        timeout_s: how long a request waits for its samples (503 after).
    """

    max_samples: int = 16
    max_new_tokens: int = 256
    max_steps: int = 100
    max_prompt_chars: int = 4000
    max_body_bytes: int = 65536
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for key, value in vars(self).items():
            whole = key != "timeout_s"
            kind = int if whole else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
                raise UserError(f"limits.{key} must be a positive {'integer' if whole else 'number'}, "
                                f"got {value!r}")


@dataclass
class ServedModel:
    """One model the server answers for.

    Args:
        name: the name requests use (``"model": name``).
        model: the `GenerativeModule`, in eval mode.
        version: what it is, for the records: ``hub:NAME:VERSION`` or the run directory.
        worker: the thread that runs it.
        chat_template: the template `/v1/chat/completions` renders (language models).
    """

    name: str
    model: Any
    version: str
    worker: ModelWorker
    chat_template: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``"text"`` for a language model, else ``"image"``."""
        text = "prompt" in getattr(self.model, "condition_keys", ()) and "image" not in self.model.needs
        return "text" if text else "image"

    def describe(self) -> dict[str, Any]:
        """What `/health` and `/v1/models` tell about it."""
        model = self.model
        return {"name": self.name, "kind": self.kind, "model": model.registered_name,
                "version": self.version, "conditions": sorted(model.condition_keys),
                "num_classes": int(getattr(model, "num_classes", 0) or 0),
                "sampling_options": model.sampling_options(), **self.info}


def load_served(name: str, source: str, *, device: Any = "cpu", max_batch_size: int = 32,
                window_s: float = 0.01, on_batch=None) -> ServedModel:
    """Load `source` (a run directory, a weights file, or ``hub:NAME[:VERSION]``) and start
    its worker.

    Raises:
        UserError: a bad name or source (`genframe.load`'s errors).
    """
    from genframe.api import HUB_PREFIX, load
    from genframe.hub import check_name

    check_name(name, key="models")
    version = source
    run = None
    if source.startswith(HUB_PREFIX):
        from genframe.hub import resolve

        entry = resolve(source[len(HUB_PREFIX):], key="hub")
        version = f"{HUB_PREFIX}{entry.ref}"
        source = version
        run = entry.path
    else:
        path = Path(source).expanduser().resolve()
        version = str(path)
        run = path if path.is_dir() else None
    model = load(source, device=device)
    template = None
    if getattr(model, "tokenizer", None) is not None and model.hparams.get("block_size"):
        from genframe.runs import open_run
        from genframe.text.chat import ChatTemplate

        opened = open_run(str(run)) if run is not None else None
        data = opened.data_config if opened is not None else None
        template = (ChatTemplate.from_mapping(data.get("template"), where=f"{run}: data.template")
                    if isinstance(data, dict) and data.get("name") == "chat" else ChatTemplate())
    worker = ModelWorker(model, max_batch_size=max_batch_size, window_s=window_s,
                         on_batch=None if on_batch is None else (lambda *a: on_batch(name, *a)))
    return ServedModel(name=name, model=model, version=version, worker=worker, chat_template=template)
