"""`genframe serve`: the HTTP API, OpenAI-compatible completions with streaming, limits,
the bearer token, batching of concurrent requests, feedback under concurrent writers, a
load test on loopback and a property-based fuzz that finds no 500."""

from __future__ import annotations

import base64
import io
import json
import multiprocessing
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from genframe.feedback import FeedbackStore, SampleRecord, UnknownSample, new_id
from genframe.samples import Samples
from genframe.serving.app import create_app
from genframe.serving.models import Limits, load_served
from genframe.serving.worker import Job, ModelWorker
from tests.support import serving

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(tiny_vae_run, tiny_lm_run):
    models = [load_served("digits", str(tiny_vae_run)), load_served("lm", str(tiny_lm_run))]
    yield models
    for m in models:
        m.worker.close()


@pytest.fixture
def app(served, tmp_path):
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    return create_app(served, limits=Limits(max_samples=8, max_new_tokens=24, max_body_bytes=4096),
                      token=TOKEN, store=store, samples_dir=tmp_path / "samples")


@pytest.fixture
def client(app):
    return TestClient(app)


def test_generate_images_and_texts_with_ids_recorded(client, app, tmp_path):
    r = client.post("/generate", json={"model": "digits", "num_samples": 3, "seed": 7}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"].endswith("run") and body["seed"] == 7 and len(body["samples"]) == 3
    image = Image.open(io.BytesIO(base64.b64decode(body["samples"][0]["image"])))
    assert image.size == (8, 8)
    again = client.post("/generate", json={"model": "digits", "num_samples": 3, "seed": 7}, headers=AUTH)
    assert [s["image"] for s in again.json()["samples"]] == [s["image"] for s in body["samples"]]
    store = app.state.store
    record = store.sample(body["samples"][0]["id"])
    assert record["source"] == "serve" and record["seed"] == 7 and record["kind"] == "image"
    assert (tmp_path / "samples" / f"{record['id']}.png").read_bytes() == base64.b64decode(
        body["samples"][0]["image"])
    text = client.post("/generate", json={"model": "lm", "num_samples": 2, "prompt": "The ",
                                          "sampling": {"max_new_tokens": 6, "temperature": 0.5}},
                       headers=AUTH).json()
    assert [len(s["text"]) > 0 for s in text["samples"]] == [True, True]
    stored = store.sample(text["samples"][1]["id"])
    assert stored["prompt"] == "The " and stored["output"] == text["samples"][1]["text"]
    assert stored["settings"]["temperature"] == 0.5


def test_openai_completions_chat_and_streaming(client):
    r = client.post("/v1/completions", headers=AUTH, json={
        "model": "lm", "prompt": ["The ", "A "], "max_tokens": 5, "n": 2, "temperature": 0, "user": "x",
        "logprobs": None, "echo": False, "frequency_penalty": 0})  # "off" values of what is not supported
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and len(body["choices"]) == 4
    assert body["usage"]["completion_tokens"] == 4 * 5  # four texts of max_tokens=5 (no stop)
    greedy = body["choices"][0]["text"]
    assert body["choices"][1]["text"] == greedy  # temperature 0: the same text twice
    with client.stream("POST", "/v1/completions", headers=AUTH, json={
            "model": "lm", "prompt": "The ", "max_tokens": 5, "temperature": 0, "stream": True}) as s:
        events = [line.removeprefix("data: ") for line in s.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"][0]["sample_id"]
    chat = client.post("/v1/chat/completions", headers=AUTH, json={
        "model": "lm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    with client.stream("POST", "/v1/chat/completions", headers=AUTH, json={
            "model": "lm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": True}) as s:
        events = [line.removeprefix("data: ") for line in s.iter_lines() if line]
    assert events[-1] == "[DONE]" and json.loads(events[0])["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("method, path, body, headers, status, said", [
    ("post", "/generate", {"model": "digits"}, {}, 401, "bearer token"),
    ("post", "/generate", {"model": "digits"}, {"Authorization": "Bearer wrong"}, 401, "bearer token"),
    ("get", "/metrics", None, {}, 401, "bearer token"),
    ("post", "/generate", {"model": "nope"}, AUTH, 404, "no model named 'nope'"),
    ("post", "/generate", {}, AUTH, 400, "give \"model\""),
    ("post", "/generate", {"model": "digits", "num_samples": 9}, AUTH, 413, "max_samples=8"),
    ("post", "/generate", {"model": "digits", "num_samples": 0}, AUTH, 422, "num_samples"),
    ("post", "/generate", {"model": "digits", "label": 3}, AUTH, 400, "not class-conditional"),
    ("post", "/generate", {"model": "digits", "prompt": "x"}, AUTH, 400, "takes no prompt"),
    ("post", "/generate", {"model": "digits", "steps": 5}, AUTH, 400, "no sampler steps"),
    ("post", "/generate", {"model": "digits", "sampling": {"nope": 1}}, AUTH, 400, "nope"),
    ("post", "/generate", {"model": "digits", "sampling": {"sampler": "ddim"}}, AUTH, 400, "sampling.sampler"),
    ("post", "/generate", {"model": "digits", "extra": 1}, AUTH, 422, "extra"),
    ("post", "/generate", {"model": "lm", "sampling": {"temperature": "hot"}}, AUTH, 400, "temperature"),
    ("post", "/generate", {"model": "lm", "sampling": {"max_new_tokens": 500}}, AUTH, 413, "max_new_tokens"),
    ("post", "/v1/completions", {"model": "digits", "prompt": "x"}, AUTH, 400, "makes images"),
    ("post", "/v1/completions", {"model": "lm", "prompt": "x" * 5000}, AUTH, 413, "max_body_bytes"),
    ("post", "/v1/completions", {"model": "lm", "prompt": "x", "n": 2, "stream": True}, AUTH, 400, "stream"),
    ("post", "/v1/completions", {"model": "lm", "prompt": [1, 2]}, AUTH, 422, "prompt"),
    ("post", "/v1/chat/completions", {"model": "lm", "messages": []}, AUTH, 422, "messages"),
    ("post", "/v1/chat/completions", {"model": "lm", "messages": [{"role": "robot", "content": "x"}]},
     AUTH, 422, "role"),
    ("post", "/feedback", {"sample_id": "nope", "rating": 1}, AUTH, 404, "no generated sample has id"),
    ("post", "/feedback", {"sample_id": "x", "rating": 5}, AUTH, 422, "rating"),
    ("post", "/feedback", {"sample_id": "x", "rating": True}, AUTH, 422, "rating"),
    ("post", "/generate", {"model": "lm", "prompt": "a\ud800b"}, AUTH, 422, "lone surrogate"),
    ("post", "/v1/chat/completions", {"model": "lm", "messages": [{"role": "user", "content": "\udfff"}]},
     AUTH, 422, "lone surrogate"),
    ("post", "/generate", {"model": "digits", "sampling": {"temperature": float("inf")}}, AUTH, 422,
     "temperature"),
    ("post", "/v1/completions", {"model": "lm", "prompt": "x" * 200, "stream": True, "max_tokens": 2},
     AUTH, 400, "context"),
    ("get", "/docs", None, {}, 401, "bearer token"),
    ("post", "/v1/completions", {"model": "lm", "prompt": "x", "logprobs": 2}, AUTH, 422, "logprobs is not supported"),
    ("post", "/v1/chat/completions", {"model": "lm", "messages": [{"role": "user", "content": "x"}],
                                      "tools": [{"type": "function"}]}, AUTH, 422, "tools is not supported"),
    ("get", "/v1/models/nope", None, AUTH, 404, "no model named 'nope'"),
    ("get", "/nothing", None, AUTH, 404, "Not Found"),
])
def test_bad_requests_get_a_4xx_with_a_reason(client, method, path, body, headers, status, said):
    # json.dumps escapes a lone surrogate as \\ud800, as a client's JSON encoder would.
    sent = {"content": json.dumps(body).encode(), "headers": {**headers, "content-type": "application/json"}} \
        if body is not None else {"headers": headers}
    r = client.request(method.upper(), path, **sent)
    assert r.status_code == status, r.text
    assert said in r.json()["detail"] and r.json()["error"]["message"] == r.json()["detail"]


def test_openai_extras(client, app):
    assert client.get("/v1/models/lm", headers=AUTH).json()["id"] == "lm"
    r = client.post("/v1/chat/completions", headers=AUTH, json={
        "model": "lm", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    with client.stream("POST", "/v1/chat/completions", headers=AUTH, json={
            "model": "lm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "stream": True, "stream_options": {"include_usage": True}}) as s:
        chunks = [json.loads(line.removeprefix("data: ")) for line in s.iter_lines()
                  if line and line != "data: [DONE]"]
    assert [("role" in c["choices"][0]["delta"]) for c in chunks].count(True) == 1
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    image = client.post("/generate", json={"model": "digits"}, headers=AUTH).json()["samples"][0]["id"]
    r = client.post("/feedback", headers=AUTH, json={"sample_id": image, "corrected_text": "a 3"})
    assert r.status_code == 400 and "is an image" in r.json()["detail"]


def test_anonymous_and_oversized_bodies_are_refused_before_they_are_parsed(client):
    """Bodies that are not JSON: a 401 or 413 (not the 422 parsing would give) shows the
    token and the size were checked first; the chunked body has no Content-Length to
    refuse up front, so its bytes are counted as they come."""
    def chunked():
        for _ in range(500):
            yield b"x" * 1024

    r = client.post("/feedback", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 401
    r = client.post("/feedback", content=chunked(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes=4096" in r.json()["detail"]
    r = client.post("/feedback", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401


def test_malformed_and_oversized_bodies(client):
    r = client.post("/generate", content=b"{not json", headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    r = client.post("/generate", content=b"x" * 5000, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413


def test_feedback_health_and_metrics(client, app):
    made = client.post("/generate", json={"model": "lm", "prompt": "A", "sampling": {"max_new_tokens": 3}},
                       headers=AUTH).json()["samples"][0]
    r = client.post("/feedback", headers=AUTH, json={"sample_id": made["id"], "rating": -1,
                                                     "corrected_text": "better", "flag": "wrong"})
    assert r.status_code == 201
    rows = app.state.store.feedback(made["id"])
    assert [(f["rating"], f["corrected_text"], f["flag"]) for f in rows] == [(-1, "better", "wrong")]
    health = client.get("/health").json()  # no token needed
    assert {m["name"]: m["kind"] for m in health["models"]} == {"digits": "image", "lm": "text"}
    client.post("/generate", json={"model": "zzz"}, headers=AUTH)
    text = client.get("/metrics", headers=AUTH).text
    assert 'genframe_requests_total{route="/feedback",status="201"} 1.0' in text
    assert 'genframe_errors_total{route="/generate",status="404"} 1.0' in text
    assert 'genframe_queue_depth{model="lm"} 0.0' in text
    assert 'genframe_request_seconds_count{route="/generate"}' in text


class _CountingModel:
    """Stands in for a model: records each generate() call's size and conditions."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict | None]] = []

    def generate(self, n, *, condition=None, seed=None, **sampling):
        time.sleep(0.05)  # a batch takes a while: later requests queue up meanwhile
        self.calls.append((n, condition))
        prompts = (condition or {}).get("prompt") or [""] * n
        return Samples(texts=[f"{p}!" for p in prompts], metadata={"seed": seed})


def test_concurrent_requests_are_batched_and_each_gets_its_rows():
    model = _CountingModel()
    worker = ModelWorker(model, max_batch_size=16, window_s=0.05)
    try:
        futures = [worker.submit(Job(2, prompt=f"p{i}", sampling={"t": 1})) for i in range(6)]
        alone = worker.submit(Job(1, prompt="seeded", seed=3, sampling={"t": 1}))
        other = worker.submit(Job(1, prompt="other", sampling={"t": 2}))
        results = [f.result(timeout=10) for f in futures]
        assert [r.texts for r in results] == [[f"p{i}!", f"p{i}!"] for i in range(6)]
        assert alone.result(timeout=10).texts == ["seeded!"] and other.result(timeout=10).texts == ["other!"]
    finally:
        worker.close()
    sizes = sorted(n for n, _ in model.calls)
    assert sum(sizes) == 14 and len(model.calls) < 8  # merged: fewer calls than requests
    assert (1, {"prompt": ["seeded"]}) in model.calls  # a seeded job runs alone


def test_one_bad_request_does_not_fail_its_batch():
    class Picky(_CountingModel):
        def generate(self, n, *, condition=None, seed=None, **sampling):
            if "bad" in (condition or {}).get("prompt", []):
                raise ValueError("bad prompt")
            return super().generate(n, condition=condition, seed=seed, **sampling)

    worker = ModelWorker(Picky(), window_s=0.05)
    try:
        good, bad = worker.submit(Job(1, prompt="good")), worker.submit(Job(1, prompt="bad"))
        assert good.result(timeout=10).texts == ["good!"]
        with pytest.raises(ValueError):
            bad.result(timeout=10)
    finally:
        worker.close()


def _write_rows(path, worker: int, count: int) -> None:
    store = FeedbackStore(path)
    for i in range(count):
        sid = new_id()
        store.add_samples([SampleRecord(id=sid, source="test", kind="text", output=f"{worker}-{i}")])
        store.add_feedback(sid, rating=1 if i % 2 else -1)


def test_feedback_store_loses_nothing_under_concurrent_writers(tmp_path):
    path = tmp_path / "fb.sqlite"
    FeedbackStore(path)
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_write_rows, args=(path, w, 40)) for w in range(6)]
    for p in procs:
        p.start()
    threads = [threading.Thread(target=_write_rows, args=(path, 100 + w, 40)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    store = FeedbackStore(path)
    assert store.counts() == {"samples": 400, "feedback": 400}
    assert len(store.rated_samples()) == 400
    with pytest.raises(UnknownSample):
        store.add_feedback("missing", rating=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_load_test_on_loopback_has_no_server_errors(app):
    """A few hundred requests, eight at a time, to a real server: no 5xx, every feedback
    row stored."""
    import httpx

    statuses: list[int] = []
    with serving(app) as base, httpx.Client(base_url=base, headers=AUTH, timeout=60) as http:
        def one(i: int) -> None:
            kind = i % 4
            if kind == 0:
                r = http.post("/generate", json={"model": "digits", "num_samples": 1 + i % 3})
            elif kind == 1:
                r = http.post("/v1/completions", json={"model": "lm", "prompt": "The ", "max_tokens": 3})
            elif kind == 2:
                r = http.post("/generate", json={"model": "digits", "num_samples": 99})  # 413
            else:
                r = http.post("/generate", json={"model": "lm", "prompt": "A",
                                                 "sampling": {"max_new_tokens": 2}})
            statuses.append(r.status_code)
            if r.status_code == 200:
                body = r.json()
                ids = [s["id"] for s in body.get("samples", [])] or [
                    c["sample_id"] for c in body.get("choices", [])]
                for sid in ids:
                    statuses.append(http.post("/feedback", json={"sample_id": sid, "rating": 1}).status_code)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(200)))
    assert not [s for s in statuses if s >= 500]
    assert statuses.count(413) == 50
    assert app.state.store.counts()["feedback"] == statuses.count(201) > 100


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=20), lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=10), c, max_size=3), max_leaves=8)
fields = {
    "/generate": ["model", "num_samples", "prompt", "label", "seed", "steps", "sampling"],
    "/v1/completions": ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "seed", "stop"],
    "/v1/chat/completions": ["model", "messages", "max_tokens", "temperature", "n", "stream"],
    "/feedback": ["sample_id", "rating", "flag", "corrected_text", "comment"],
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_requests_never_get_a_500(client, data):
    path = data.draw(st.sampled_from(sorted(fields)))
    names = data.draw(st.lists(st.sampled_from(fields[path]), max_size=4, unique=True))
    body = {name: data.draw(json_values) for name in names}
    if path != "/feedback" and data.draw(st.booleans()):
        body["model"] = data.draw(st.sampled_from(["digits", "lm"]))
    for key in ("num_samples", "max_tokens", "n", "steps"):  # keep accepted requests small
        if isinstance(body.get(key), int) and not isinstance(body[key], bool):
            body[key] = body[key] % 4
    if path == "/generate" and data.draw(st.booleans()):  # real option names, any values
        keys = data.draw(st.lists(st.sampled_from(["temperature", "top_k", "top_p", "stop", "mean",
                                                   "use_cache", "truncation"]), max_size=3, unique=True))
        body["sampling"] = {k: data.draw(st.none() | st.booleans() | st.integers(-3, 3)
                                         | st.floats(-2, 2) | st.text(max_size=5)) for k in keys}
    sampling = body.get("sampling")
    if isinstance(sampling, dict):
        sampling.pop("max_new_tokens", None)
    r = client.post(path, json=body, headers=AUTH)
    assert r.status_code < 500, (path, body, r.text)
    assert r.status_code in (200, 201) or r.json()["detail"]


def test_serve_command_refuses_bad_setups(cli, tiny_vae_run, tmp_path):
    nothing = cli("serve")
    assert nothing.returncode == 2 and "nothing to serve" in nothing.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = cli("serve", f"run={tiny_vae_run}", f"port={port}")
    assert busy.returncode == 2 and "cannot listen" in busy.stderr
    bad = cli("serve", f"run={tiny_vae_run}", "limits.max_samples=0", f"port={_free_port()}")
    assert bad.returncode == 2 and "limits.max_samples" in bad.stderr
    unknown = cli("serve", "hub=nothing-here", f"port={_free_port()}",
                  env={"GENFRAME_HUB": str(tmp_path / "hub")})
    assert unknown.returncode == 2 and "nothing-here" in unknown.stderr
    clash = cli("serve", f"run={tiny_vae_run}", f"models.vae={tiny_vae_run}", f"port={_free_port()}")
    assert clash.returncode == 2 and "taken" in clash.stderr


def test_serve_stops_cleanly_on_sigterm(tiny_vae_run, tmp_path):
    """SIGTERM is how services are stopped: exit status 0, run.json completed."""
    import os
    import signal
    import subprocess

    from tests.conftest import GENFRAME

    env = {**os.environ, "GENFRAME_FEEDBACK": str(tmp_path / "fb.sqlite")}
    env.pop("HYDRA_FULL_ERROR", None)
    server = subprocess.Popen([*GENFRAME, "serve", f"run={tiny_vae_run}", f"port={_free_port()}",
                               f"hydra.run.dir={tmp_path / 'srv'}"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        while line and not line.startswith("serving"):
            line = server.stdout.readline()
        assert line.startswith("serving"), server.stderr.read()
        time.sleep(1)
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=60)
    finally:
        server.kill()
    assert server.returncode == 0, err
    assert "stopped" in out
    assert json.loads((tmp_path / "srv" / "run.json").read_text())["status"] == "completed"
