"""Small models used by tests."""

from __future__ import annotations

import contextlib
from typing import Any

from genframe_plugins.vae.model import VAE


class TokensModel(VAE):
    """A VAE that (wrongly for image data) declares it needs token batches."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.needs = frozenset({"tokens"})


class NaNAfterFirstEpoch(VAE):
    """A VAE whose loss turns NaN from the second epoch on."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.current_epoch >= 1 else loss


@contextlib.contextmanager
def serving(app):
    """Run the ASGI `app` with uvicorn on a free loopback port in a thread; yields its
    base URL, and stops it after the block."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
