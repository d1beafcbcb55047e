"""`genframe serve`: trained models behind an HTTP API, with a page to try and rate them."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from genframe.errors import UserError
from genframe.runs import start_run, update_run
from genframe.tasks.build import to_plain

TOKEN_ENV = "GENFRAME_SERVE_TOKEN"


def serve(cfg: DictConfig) -> dict[str, Any]:
    """Serve ``run``/``ckpt``/``hub`` (named ``name``) and every ``models.<name>`` until
    Ctrl-C, on ``host``:``port`` (see `genframe.serving.app` for the endpoints).

    Every sample made is recorded in the feedback store (``feedback.db``) unless
    ``feedback.record=false``; images are also saved under ``<run dir>/samples/``.

    Returns:
        dict with ``run_dir``, ``metrics`` ({}) and ``models`` (name -> version).

    Raises:
        UserError: no model or a bad one, a bad limit, a port that is taken.
    """
    _check_installed()
    import uvicorn

    from genframe.feedback import FeedbackStore
    from genframe.serving.app import create_app
    from genframe.serving.models import Limits, load_served

    sources = _sources(cfg)
    limits = Limits(**to_plain(cfg.limits))
    batching = to_plain(cfg.batching)
    size, window = batching.get("max_batch_size"), batching.get("window_ms")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"batching.max_batch_size must be an integer >= 1, got {size!r}")
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 <= window <= 10_000:
        raise UserError(f"batching.window_ms must be a number of milliseconds in [0, 10000], got {window!r}")
    token = cfg.get("token") or os.environ.get(TOKEN_ENV) or None
    host, port = str(cfg.host), int(cfg.port)
    _check_port(host, port)
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: host={host} serves every interface without a token (set token=... "
              f"or ${TOKEN_ENV})", file=sys.stderr)
    store = FeedbackStore(cfg.feedback.db) if cfg.feedback.record else None
    out_dir = Path(cfg.paths.output_dir)
    served = [load_served(name, source, device=cfg.device,
                          max_batch_size=int(batching["max_batch_size"]),
                          window_s=float(batching["window_ms"]) / 1000)
              for name, source in sources.items()]
    versions = {m.name: m.version for m in served}
    start_run(out_dir, cfg, "serve", models=versions,
              feedback_store=str(store.path) if store is not None else None)
    app = create_app(served, limits=limits, token=token, store=store, samples_dir=out_dir / "samples")
    print(f"serving {', '.join(versions)} on http://{host}:{port}/ (the page; API: /generate, "
          f"/v1/completions, /v1/chat/completions, /feedback, /metrics); Ctrl-C stops",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    from genframe.tasks import Terminated

    try:
        server.run()
    except (KeyboardInterrupt, Terminated):  # uvicorn stops cleanly on Ctrl-C / SIGTERM,
        pass                                 # then raises the signal again
    finally:
        for m in served:
            m.worker.close()
    update_run(out_dir, status="completed")
    print("stopped", flush=True)
    return {"run_dir": out_dir, "metrics": {}, "models": versions}


def _check_installed() -> None:
    """Refuse, naming the extra, when the serving libraries are not installed."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"genframe serve needs {', '.join(missing)}: pip install 'genframe[serve]'")


def _sources(cfg: DictConfig) -> dict[str, str]:
    """Served name -> source (a run directory, a weights file, or ``hub:NAME[:VERSION]``)."""
    sources: dict[str, str] = {}
    given = [k for k in ("hub", "ckpt") if cfg.get(k) is not None]
    if cfg.get("hub") is not None:
        source = f"hub:{cfg.hub}"
        default = str(cfg.hub).split(":")[0]
    elif cfg.get("ckpt") is not None or cfg.get("run") is not None:
        source = str(Path(str(cfg.get("ckpt") or cfg.run)).expanduser().resolve())
        default = None
    else:
        source = default = None
    if len(given) > 1:
        raise UserError("give one of run=, ckpt= or hub= for the model (models.<name>= for more)")
    if source is not None:
        name = cfg.get("name") or default
        if name is None:
            from genframe.weights import load_model

            name = load_model(cfg.get("run"), cfg.get("ckpt"))[0].registered_name
        sources[str(name)] = source
    for name, value in (to_plain(cfg.get("models")) or {}).items():
        if not isinstance(value, str) or not value:
            raise UserError(f"models.{name}: expected a run directory, a weights file or "
                            f"hub:NAME[:VERSION], got {value!r}")
        if name in sources:
            raise UserError(f"models.{name}: the name is taken by the main model; choose another")
        sources[str(name)] = value
    if not sources:
        raise UserError("nothing to serve: give hub=NAME[:VERSION], run=DIR or ckpt=FILE, "
                        "and/or models.<name>=<source>")
    return sources


def _check_port(host: str, port: int) -> None:
    """Refuse a port that is taken or out of range before any model is loaded."""
    if not 0 < port < 65536:
        raise UserError(f"port={port}: expected 1..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except socket.gaierror:
            raise UserError(f"host={host}: not an address or a name this machine can resolve; "
                            "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose "
                            "another port=... (or stop what uses it)") from None
