"""One model's generation thread: requests queue up, compatible ones run as one batch.

A model is used by one thread only (its `ModelWorker`); request handlers submit `Job`s
and wait on their futures. Jobs that agree on everything but their size and their
prompt or label (same sampling options, no seed of their own, no streaming) are merged
into one ``generate`` call: the rows of a batch cost little more than one row on most
models, so concurrent requests share the work (dynamic batching, as inference servers
such as Triton and TGI do it). A job with a seed runs alone, so the same request with
the same seed gives the same samples; a streaming job runs alone too.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from genframe.samples import Samples


@dataclass
class Job:
    """One request's generation.

    Args:
        num_samples: rows this request asks for.
        prompt: the text prompt (text and text-to-image models), or None.
        label: the class label (class-conditional models), or None.
        seed: a seed of its own (the job then runs alone), or None.
        sampling: the model's sampling options (JSON values).
        stream: ``stream(row, piece)`` for text as it is made (the job runs alone).
        extra: sampling objects that are not JSON (a built sampler); part of the batch key
            through their ``repr``.
    """

    num_samples: int
    prompt: str | None = None
    label: int | None = None
    seed: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    stream: Callable[[int, str], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    future: Future = field(default_factory=Future)

    def key(self) -> tuple | None:
        """Jobs with equal keys can share a batch; None: this job runs alone."""
        if self.seed is not None or self.stream is not None:
            return None
        return (json.dumps(self.sampling, sort_keys=True, default=str),
                tuple(sorted((k, repr(v)) for k, v in self.extra.items())),
                self.prompt is not None, self.label is not None)


class ModelWorker:
    """The thread that runs `model.generate` for queued `Job`s.

    Args:
        model: a `GenerativeModule` in eval mode (used by this thread only).
        max_batch_size: the most rows one merged batch holds.
        window_s: how long the first job of a batch waits for others to join it.
        on_batch: called with (number of jobs, rows, seconds) after each batch.
    """

    def __init__(self, model, *, max_batch_size: int = 32, window_s: float = 0.01,
                 on_batch: Callable[[int, int, float], None] | None = None) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self.on_batch = on_batch
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: deque[Job] = deque()
        self._thread = threading.Thread(target=self._loop, name="genframe-model-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        """Queue `job`; its future gets the job's `Samples` (or the error raised)."""
        self._queue.put(job)
        return job.future

    def pending(self) -> int:
        """Jobs waiting (not yet running)."""
        return self._queue.qsize() + len(self._held)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _next(self, timeout: float | None) -> Job | None:
        if self._held:
            return self._held.popleft()
        return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()

    def _loop(self) -> None:
        while True:
            job = self._next(None)
            if job is None:
                return
            batch = [job]
            key = job.key()
            if key is not None:
                rows = job.num_samples
                deadline = time.monotonic() + self.window_s
                skipped: list[Job] = []
                while rows < self.max_batch_size:
                    try:
                        other = self._next(deadline - time.monotonic())
                    except queue.Empty:
                        break
                    if other is None:  # closing: finish this batch first
                        self._queue.put(None)
                        break
                    if other.key() == key and rows + other.num_samples <= self.max_batch_size:
                        batch.append(other)
                        rows += other.num_samples
                    else:
                        skipped.append(other)
                self._held.extend(skipped)
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        first = batch[0]
        total = sum(j.num_samples for j in batch)
        condition: dict[str, Any] = {}
        if first.prompt is not None:
            condition["prompt"] = [j.prompt for j in batch for _ in range(j.num_samples)]
        if first.label is not None:
            condition["label"] = [j.label for j in batch for _ in range(j.num_samples)]
        options = {**first.sampling, **first.extra}
        if first.stream is not None:
            options["stream"] = first.stream
        started = time.perf_counter()
        try:
            samples = self.model.generate(total, condition=condition or None, seed=first.seed, **options)
        except Exception as exc:
            if len(batch) > 1:  # one job's bad input must not fail the others: run each alone
                for j in batch:
                    self._run([j])
                return
            first.future.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(len(batch), total, time.perf_counter() - started)
        start = 0
        for j in batch:
            j.future.set_result(slice_samples(samples, start, start + j.num_samples))
            start += j.num_samples


def slice_samples(samples: Samples, start: int, stop: int) -> Samples:
    """Rows [start, stop) of `samples`, with the batch's metadata."""
    return Samples(
        images=None if samples.images is None else samples.images[start:stop],
        texts=None if samples.texts is None else samples.texts[start:stop],
        conditions=samples.conditions[start:stop],
        metadata=dict(samples.metadata),
        per_sample={k: v[start:stop] for k, v in samples.per_sample.items()},
    )
