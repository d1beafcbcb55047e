"""Serving trained models over HTTP: the FastAPI app (`genframe.serving.app`), the models
it serves and their limits (`genframe.serving.models`), the thread that batches each
model's requests (`genframe.serving.worker`) and the page at ``/``. `genframe serve`
(`genframe.tasks.serve`) builds them from its config and runs uvicorn."""
