"""The HTTP API (FastAPI): generation, OpenAI-compatible completions, feedback, metrics,
and the page at ``/`` to try a model and rate what it makes.

Endpoints (all JSON; with a token, every one but ``/`` and ``/health`` needs
``Authorization: Bearer <token>``):

- ``POST /generate``: ``{"model", "num_samples", "prompt", "label", "seed", "steps",
  "sampling"}`` -> ``{"model", "version", "samples": [{"id", "image" (PNG, base64) |
  "text", ...}]}``.
- ``POST /v1/completions`` and ``POST /v1/chat/completions``: OpenAI's request and
  response shapes for language models, ``"stream": true`` as server-sent events.
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).
- ``POST /feedback``: ``{"sample_id", "rating" (-1, 0, 1), "flag", "corrected_text",
  "comment"}`` -> 201.

A user's mistake is a 4xx with a reason (``{"detail": ..., "error": {"message": ...}}``,
the second for OpenAI clients): 400 a value the model refuses, 401 a missing or wrong
token, 404 an unknown model or sample id, 413 a body or request over the limits, 422 a
malformed body, 503 a request that waited longer than ``limits.timeout_s``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from starlette.exceptions import HTTPException

from genframe.errors import UserError
from genframe.feedback import FeedbackStore, UnknownSample, new_id, sample_records
from genframe.samples import Samples
from genframe.serving.models import Limits, ServedModel
from genframe.serving.page import PAGE
from genframe.serving.worker import Job

log = logging.getLogger(__name__)

Finite = Annotated[float, Strict(), AllowInfNan(False)]
Scalar = StrictInt | Finite | StrictBool | StrictStr | None
# Sampling options that are objects, not JSON values (or belong to the server).
RESERVED = ("stream", "sampler", "init_image", "generator")
MAX_SEED = 2**63 - 1


class ApiError(Exception):
    """A request the server refuses: HTTP `status` with `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- request bodies --------------------------------------------------------------------


class _Body(BaseModel):
    """A request body: every text in it must be valid Unicode (JSON's "\\ud800" escapes
    can carry a lone surrogate, which no tokenizer, file or database takes)."""

    @model_validator(mode="after")
    def _unicode(self):
        def walk(value: Any, where: str) -> None:
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{where} is not valid Unicode (it holds a lone surrogate)") from None
            elif isinstance(value, BaseModel):
                for key in type(value).model_fields:
                    walk(getattr(value, key), f"{where}.{key}" if where else key)
            elif isinstance(value, dict):
                for key, item in value.items():
                    walk(key, where)
                    walk(item, f"{where}.{key}")
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    walk(item, f"{where}[{i}]")

        walk(self, "")
        return self


class GenerateRequest(_Body):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = Field(None, description="the served model's name (optional with one)")
    num_samples: StrictInt = Field(1, ge=1)
    prompt: StrictStr | None = None
    label: StrictInt | None = Field(None, ge=0)
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    steps: StrictInt | None = Field(None, ge=1, description="DDIM steps (diffusion models)")
    sampling: dict[StrictStr, Scalar] = Field(default_factory=dict)


class _TextRequest(_Body):
    """The fields OpenAI's completion and chat requests share."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send more (logprobs, user, ...)
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Finite | StrictInt = Field(1.0, ge=0, le=10)
    top_p: Finite | StrictInt | None = Field(None, gt=0, le=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)  # OpenAI's newer name of max_tokens
    stream_options: dict[StrictStr, StrictBool] | None = None
    # OpenAI options genframe does not implement: accepted at their "off" values only, so a
    # client that relies on one is told instead of silently getting something else.
    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = None
    best_of: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    tools: Any = None
    functions: Any = None
    response_format: Any = None

    @model_validator(mode="after")
    def _unsupported(self):
        off = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
               "best_of": (None, 1), "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
               "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
               "response_format": (None, {"type": "text"})}
        for key, allowed in off.items():
            value = getattr(self, key)
            if not any(value == a and type(value) is type(a) for a in allowed if a is not None) and value is not None:
                raise ValueError(f"{key} is not supported by genframe serve (leave it out)")
        return self
    n: StrictInt = Field(1, ge=1)
    stream: StrictBool = False
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)


class CompletionRequest(_TextRequest):
    prompt: StrictStr | list[StrictStr] = ""
    stop: StrictStr | list[StrictStr] | None = None


class ContentPart(_Body):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class Message(_Body):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[ContentPart]

    def text(self) -> str:
        """The content as one text (OpenAI's list of text parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_TextRequest):
    messages: list[Message] = Field(min_length=1)


class FeedbackRequest(_Body):
    model_config = ConfigDict(extra="forbid", strict=True)  # "rating": true is not 1
    sample_id: StrictStr = Field(min_length=1, max_length=64)
    rating: Literal[-1, 0, 1] | None = None
    flag: StrictStr | None = Field(None, min_length=1, max_length=64)
    corrected_text: StrictStr | None = Field(None, max_length=100_000)
    comment: StrictStr | None = Field(None, max_length=10_000)

    @field_validator("rating", mode="before")
    @classmethod
    def _not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # True == 1 in Python; a rating is -1, 0 or 1
            raise ValueError("rating must be -1, 0 or 1 (a number, not true/false)")
        return value


# -- the app -------------------------------------------------------------------------------


class _Metrics:
    """The Prometheus series of one app (its own registry, so apps never share counts)."""

    def __init__(self, served: dict[str, ServedModel]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("genframe_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.errors = Counter("genframe_errors", "HTTP responses with status >= 400",
                              ["route", "status"], registry=r)
        self.latency = Histogram("genframe_request_seconds", "request latency by route", ["route"],
                                 registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.samples = Counter("genframe_samples", "samples generated", ["model"], registry=r)
        self.batch_rows = Histogram("genframe_batch_rows", "rows of each generate() batch", ["model"],
                                    registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batch_jobs = Histogram("genframe_batch_requests", "requests merged into one batch", ["model"],
                                    registry=r, buckets=(1, 2, 4, 8, 16, 32))
        self.feedback = Counter("genframe_feedback", "feedback stored", ["rating"], registry=r)
        queue_depth = Gauge("genframe_queue_depth", "requests waiting for a model", ["model"], registry=r)
        for name, sm in served.items():
            queue_depth.labels(name).set_function(sm.worker.pending)

    def on_batch(self, model: str, jobs: int, rows: int, seconds: float) -> None:
        self.batch_rows.labels(model).observe(rows)
        self.batch_jobs.labels(model).observe(jobs)


def create_app(served: list[ServedModel], *, limits: Limits | None = None, token: str | None = None,
               store: FeedbackStore | None = None, samples_dir: Path | None = None) -> FastAPI:
    """The FastAPI app serving `served`.

    Args:
        served: the models, by their distinct names.
        limits: per-request bounds (`Limits`).
        token: a bearer token every request but ``/`` and ``/health`` must carry.
        store: where generated samples and feedback are recorded (None: not recorded, and
            ``/feedback`` answers 503).
        samples_dir: where images are saved as ``<id>.png`` (None: not saved).
    """
    limits = limits or Limits()
    models = {m.name: m for m in served}
    if len(models) != len(served):
        raise UserError("two served models have the same name; give each its own")
    metrics = _Metrics(models)
    for m in served:
        m.worker.on_batch = (lambda name: lambda jobs, rows, s: metrics.on_batch(name, jobs, rows, s))(m.name)
    app = FastAPI(title="genframe", version=_version(), docs_url="/docs", redoc_url=None)
    app.state.models, app.state.metrics, app.state.store = models, metrics, store

    auth: list[Any] = []  # the token is checked by `_Guard`, before any body is read
    app.add_middleware(_Guard, token=token, max_body=int(limits.max_body_bytes))

    @app.middleware("http")
    async def measure(request: Request, call_next):
        route = _route(request)
        started = time.perf_counter()
        response = await call_next(request)
        metrics.latency.labels(route).observe(time.perf_counter() - started)
        metrics.requests.labels(route, str(response.status_code)).inc()
        if response.status_code >= 400:
            metrics.errors.labels(route, str(response.status_code)).inc()
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        return _error(404 if isinstance(exc, UnknownSample) else 400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: "
                             f"{e.get('msg')}" for e in exc.errors()[:5])
        return _error(422, f"invalid request: {problems}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__} (see the server log)")

    # -- pages and status ------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": [m.describe() for m in models.values()],
                "feedback": store is not None, "auth": token is not None}

    @app.get("/metrics", dependencies=auth)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_object(m: ServedModel) -> dict[str, Any]:
        return {"id": m.name, "object": "model", "created": 0, "owned_by": "genframe",
                "genframe": m.describe()}

    @app.get("/v1/models", dependencies=auth)
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_object(m) for m in models.values()]}

    @app.get("/v1/models/{name}", dependencies=auth)
    def get_model(name: str) -> dict[str, Any]:
        return model_object(pick(name))

    # -- generation ------------------------------------------------------------------------

    def pick(name: str | None) -> ServedModel:
        if name is None:
            if len(models) == 1:
                return next(iter(models.values()))
            raise ApiError(400, f"give \"model\": one of {', '.join(sorted(models))}")
        if name not in models:
            raise ApiError(404, f"no model named {name!r} is served; served: {', '.join(sorted(models))}")
        return models[name]

    def wait(sm: ServedModel, job: Job) -> Samples:
        future = sm.worker.submit(job)
        try:
            return future.result(timeout=limits.timeout_s)
        except FutureTimeout:
            future.cancel()
            raise ApiError(503, f"the request waited over limits.timeout_s={limits.timeout_s} s; "
                                "try again later or ask for fewer samples") from None
        except (ValueError, TypeError) as exc:  # a value the model's checks let through
            raise ApiError(400, f"the model refused the request: {exc}") from None

    def check_count(n: int) -> None:
        if n > limits.max_samples:
            raise ApiError(413, f"{n} samples asked for; at most limits.max_samples={limits.max_samples}")

    def check_prompt(text: str) -> None:
        if len(text) > limits.max_prompt_chars:
            raise ApiError(413, f"the prompt has {len(text)} characters; at most "
                                f"limits.max_prompt_chars={limits.max_prompt_chars}")

    def text_options(sm: ServedModel, max_tokens: int | None, **options: Any) -> dict[str, Any]:
        if sm.kind != "text":
            raise ApiError(400, f"model {sm.name!r} makes images, not text; use POST /generate")
        if max_tokens is not None and max_tokens > limits.max_new_tokens:
            raise ApiError(413, f"max_tokens={max_tokens}; at most limits.max_new_tokens="
                                f"{limits.max_new_tokens}")
        chosen = {"max_new_tokens": max_tokens or limits.max_new_tokens,
                  **{k: v for k, v in options.items() if v is not None}}
        sm.model.check_sampling(chosen)
        return chosen

    def record(sm: ServedModel, samples: Samples, *, settings: dict[str, Any]) -> tuple[list[str], list[bytes]]:
        """Give each sample an id, save images as PNG files (`samples_dir`) and record every
        sample in the store; returns the ids and the PNG bytes of image samples ([] for texts)."""
        ids = [new_id() for _ in range(len(samples))]
        metrics.samples.labels(sm.name).inc(len(samples))
        files: list[str | None] = [None] * len(samples)
        pngs: list[bytes] = []
        if samples.images is not None:
            from genframe.sample_writer import png_bytes

            pngs = [png_bytes(image) for image in samples.images]
            if samples_dir is not None:
                samples_dir.mkdir(parents=True, exist_ok=True)
                for i, data in enumerate(pngs):
                    path = samples_dir / f"{ids[i]}.png"
                    path.write_bytes(data)
                    files[i] = str(path)
        if store is not None:
            store.add_samples(sample_records(samples, ids, source="serve", model=sm.model.registered_name,
                                             model_version=sm.version, settings=settings, files=files))
        return ids, pngs

    @app.post("/generate", dependencies=auth)
    def generate(body: GenerateRequest) -> dict[str, Any]:
        sm = pick(body.model)
        check_count(body.num_samples)
        bad = [k for k in body.sampling if k in RESERVED]
        if bad:
            raise ApiError(400, f"sampling.{bad[0]} cannot be given here"
                                + ("; use \"steps\" for a diffusion model's DDIM steps" if bad[0] == "sampler" else ""))
        options = dict(body.sampling)
        extra: dict[str, Any] = {}
        if body.prompt is not None:
            check_prompt(body.prompt)
            if "prompt" not in sm.model.condition_keys:
                raise ApiError(400, f"model {sm.name!r} takes no prompt")
        if body.label is not None:
            if "label" not in sm.model.condition_keys:
                raise ApiError(400, f"model {sm.name!r} is not class-conditional; it takes no label")
            num_classes = int(getattr(sm.model, "num_classes", 0) or 0)
            if body.label >= num_classes:
                raise ApiError(400, f"label={body.label}: model {sm.name!r} has classes 0..{num_classes - 1}")
        if sm.kind == "text":
            options = text_options(sm, options.pop("max_new_tokens", None), **options)
        if body.steps is not None:
            if "sampler" not in sm.model.sampling_options():
                raise ApiError(400, f"steps: model {sm.name!r} has no sampler steps (diffusion models do)")
            if body.steps > limits.max_steps:
                raise ApiError(413, f"steps={body.steps}; at most limits.max_steps={limits.max_steps}")
            from genframe.samplers.ddim import DDIMSampler

            extra["sampler"] = DDIMSampler(steps=body.steps)
        sm.model.check_sampling({**options, **extra})
        samples = wait(sm, Job(body.num_samples, prompt=body.prompt, label=body.label, seed=body.seed,
                               sampling=options, extra=extra))
        settings = {**options, **({"steps": body.steps} if body.steps else {})}
        ids, pngs = record(sm, samples, settings=settings)
        out = []
        for i, sample_id in enumerate(ids):
            item: dict[str, Any] = {"id": sample_id, "condition": _plain(samples.conditions[i])}
            if pngs:
                item["image"] = base64.b64encode(pngs[i]).decode()
            else:
                item["text"] = samples.texts[i]
                item.update({("finish_reason" if k == "finish_reasons" else k): v[i]
                             for k, v in samples.per_sample.items()})
            out.append(item)
        return {"model": sm.name, "version": sm.version, "seed": samples.metadata.get("seed"),
                "samples": out}

    def completion(sm: ServedModel, prompts: list[str], *, n: int, seed: int | None, stream: bool,
                   options: dict[str, Any], kind: str, chat: bool, usage: bool = False):
        """Run the prompts (n each) and answer in OpenAI's shapes (or stream them)."""
        check_count(len(prompts) * n)
        created = int(time.time())
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if stream:
            if len(prompts) * n != 1:
                raise ApiError(400, "stream=true takes one prompt and n=1")
            return _stream(sm, prompts[0], seed, options, ident, created, chat, record, usage)
        futures = [sm.worker.submit(Job(n, prompt=p, seed=seed, sampling=options)) for p in prompts]
        results = []
        for future in futures:
            try:
                results.append(future.result(timeout=limits.timeout_s))
            except FutureTimeout:
                raise ApiError(503, f"the request waited over limits.timeout_s={limits.timeout_s} s") from None
            except (ValueError, TypeError) as exc:
                raise ApiError(400, f"the model refused the request: {exc}") from None
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for samples in results:
            ids, _ = record(sm, samples, settings=dict(options))
            for i, sample_id in enumerate(ids):
                text = samples.texts[i]
                reason = samples.per_sample.get("finish_reasons", ["length"] * len(samples))[i]
                choice: dict[str, Any] = {"index": len(choices), "finish_reason": reason,
                                          "sample_id": sample_id}
                choice.update({"message": {"role": "assistant", "content": text}} if chat
                              else {"text": text, "logprobs": None})
                choices.append(choice)
                completion_tokens += samples.per_sample.get("tokens_generated", [0] * len(samples))[i]
            prompt_tokens += samples.per_sample.get("prompt_tokens", [0])[0]
        return {"id": ident, "object": kind, "created": created, "model": sm.name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    @app.post("/v1/completions", dependencies=auth)
    def completions(body: CompletionRequest):
        sm = pick(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise ApiError(400, "prompt: give a text or a list of texts")
        for p in prompts:
            check_prompt(p)
        options = text_options(sm, body.max_completion_tokens or body.max_tokens, temperature=body.temperature,
                               top_p=body.top_p, stop=body.stop)
        return completion(sm, prompts, n=body.n, seed=body.seed, stream=body.stream, options=options,
                          kind="text_completion", chat=False, usage=_include_usage(body))

    @app.post("/v1/chat/completions", dependencies=auth)
    def chat_completions(body: ChatRequest):
        sm = pick(body.model)
        if sm.chat_template is None:
            raise ApiError(400, f"model {sm.name!r} is not a language model; it cannot chat")
        template = sm.chat_template
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        check_prompt("".join(m["content"] for m in messages))
        prompt = template.render(messages, add_generation_prompt=True)
        options = text_options(sm, body.max_completion_tokens or body.max_tokens, temperature=body.temperature,
                               top_p=body.top_p, stop=list(template.stop) or None)
        return completion(sm, [prompt], n=body.n, seed=body.seed, stream=body.stream, options=options,
                          kind="chat.completion", chat=True, usage=_include_usage(body))

    # -- feedback --------------------------------------------------------------------------

    @app.post("/feedback", status_code=201, dependencies=auth)
    def feedback(body: FeedbackRequest) -> dict[str, Any]:
        if store is None:
            raise ApiError(503, "this server records no feedback (feedback.record=false)")
        if body.corrected_text is not None:
            sample = store.sample(body.sample_id)
            if sample is not None and sample["kind"] != "text":
                raise ApiError(400, f"corrected_text: sample {body.sample_id} is an image; a correction "
                                    "is a text (rate it, or flag it)")
        row = store.add_feedback(body.sample_id, rating=body.rating, flag=body.flag,
                                 corrected_text=body.corrected_text, comment=body.comment)
        metrics.feedback.labels(str(body.rating)).inc()
        return {"id": row, "sample_id": body.sample_id, "stored": True}

    def _stream(sm: ServedModel, prompt: str, seed: int | None, options: dict[str, Any], ident: str,
                created: int, chat: bool, record_fn, usage: bool) -> StreamingResponse:
        """Server-sent events: each new piece of text as it is made, then the final chunk
        (with the finish reason and the sample id; with ``usage`` the token counts) and
        ``[DONE]``. The job starts before the response: a request the model refuses
        before its first piece is a 400, as without streaming."""
        pieces: queue.Queue[tuple[str, Any]] = queue.Queue()
        job = Job(1, prompt=prompt, seed=seed, sampling=options,
                  stream=lambda row, piece: pieces.put(("piece", piece)))
        future = sm.worker.submit(job)
        future.add_done_callback(lambda f: pieces.put(("done", None)))
        kind = "chat.completion.chunk" if chat else "text_completion"
        deadline = time.monotonic() + limits.timeout_s

        def next_event() -> tuple[str, Any]:
            try:
                return pieces.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return "timeout", None

        first = next_event()
        if first[0] == "timeout":
            future.cancel()
            raise ApiError(503, f"the request waited over limits.timeout_s={limits.timeout_s} s")
        if first[0] == "done" and future.exception() is not None:
            exc = future.exception()
            raise ApiError(400, str(exc) if isinstance(exc, UserError)
                           else f"the model refused the request: {exc}")

        def event(delta: str | None, reason: str | None = None, **more: Any) -> str:
            if chat:
                content = {} if delta is None else {"content": delta}
                if not sent_role:
                    content = {"role": "assistant", **content}
                choice = {"index": 0, "delta": content, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
            body = {"id": ident, "object": kind, "created": created, "model": sm.name,
                    "choices": [{**choice, **more}]}
            return f"data: {json.dumps(body)}\n\n"

        sent_role = False

        def events() -> Iterator[str]:
            nonlocal sent_role
            what, piece = first
            while what == "piece":
                yield event(piece)
                sent_role = True
                what, piece = next_event()
            if what == "timeout":
                yield f"data: {json.dumps({'error': {'message': 'timed out'}})}\n\n"
                return
            try:
                samples = future.result()
            except Exception as exc:  # failed after the first piece: the status is sent
                yield f"data: {json.dumps({'error': {'message': str(exc)}})}\n\n"
                return
            ids, _ = record_fn(sm, samples, settings=dict(options))
            reason = samples.per_sample.get("finish_reasons", ["length"])[0]
            final = event(None, reason, sample_id=ids[0])
            if usage:
                prompt_tokens = samples.per_sample.get("prompt_tokens", [0])[0]
                made = samples.per_sample.get("tokens_generated", [0])[0]
                body = json.loads(final.removeprefix("data: "))
                body["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": made,
                                 "total_tokens": prompt_tokens + made}
                final = f"data: {json.dumps(body)}\n\n"
            yield final
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class _BodyTooLarge(BaseException):
    """Raised from `_Guard`'s receive when a body grows past the limit (a BaseException,
    so no handler inside the app turns it into a 500)."""


class _Guard:
    """ASGI middleware in front of the app: the bearer token (every path but `PUBLIC`) and
    the body size are checked before the app reads a byte of the body, so an anonymous
    or oversized request (a declared Content-Length, or a chunked body as it arrives)
    costs nothing."""

    PUBLIC = ("/", "/health")

    def __init__(self, app, *, token: str | None, max_body: int) -> None:
        self.app = app
        self.token = token
        self.max_body = max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.token is not None and scope["path"] not in self.PUBLIC:
            scheme, _, value = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip().encode(),
                                                                        self.token.encode()):
                await _error(401, "a valid bearer token is needed: Authorization: Bearer <token>")(
                    scope, receive, send)
                return
        too_large = _error(413, f"the request body is over limits.max_body_bytes={self.max_body}")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await too_large(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await too_large(scope, receive, send)


def _include_usage(body: _TextRequest) -> bool:
    """OpenAI's ``stream_options: {"include_usage": true}``."""
    return bool((body.stream_options or {}).get("include_usage"))


def _route(request: Request) -> str:
    """The route's path template (a fixed set of labels), or ``other``."""
    for route in request.app.routes:
        match, _ = route.matches(request.scope)
        if match.name == "FULL":
            return getattr(route, "path", "other")
    return "other"


def _error(status: int, message: str) -> JSONResponse:
    kind = "authentication_error" if status == 401 else "invalid_request_error" if status < 500 else "server_error"
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": message, "error": {"message": message, "type": kind}},
                        status_code=status, headers=headers)


def _plain(value: Any) -> Any:
    """`value` with what JSON cannot hold (tensors, objects) as text."""
    return json.loads(json.dumps(value, default=str))


def _version() -> str:
    from genframe import __version__

    return __version__


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` with uvicorn in a background thread for the duration of the block;
    yields its base URL (``http://host:port``). Port 0 takes a free one. For notebooks,
    benchmarks and tests; `genframe serve` runs uvicorn in the foreground.

    Raises:
        RuntimeError: the server did not start within 30 s.
    """
    import socket

    import uvicorn

    if port == 0:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, name="genframe-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    if not server.started:
        server.should_exit = True
        raise RuntimeError(f"the server on {host}:{port} did not start")
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
