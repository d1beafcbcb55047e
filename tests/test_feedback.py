"""The feedback loop: the report, and finetune=feedback building its training set from
well-rated samples and corrected texts, then pushing the next hub version."""

from __future__ import annotations

import json

import pytest

from genframe import hub
from genframe.errors import UserError
from genframe.feedback import FeedbackStore, SampleRecord, new_id
from genframe.tasks.feedback import feedback_training_set, summarize
from tests.conftest import FAST_TRAINING


@pytest.fixture
def env(tmp_path, monkeypatch):
    values = {"GENFRAME_HUB": str(tmp_path / "hub"), "GENFRAME_FEEDBACK": str(tmp_path / "fb.sqlite")}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return values


def _text_samples(store, version, rows):
    ids = []
    for prompt, output, settings in rows:
        sid = new_id()
        store.add_samples([SampleRecord(id=sid, source="serve", kind="text", prompt=prompt, output=output,
                                        model="transformer", model_version=version, settings=settings)])
        ids.append(sid)
    return ids


def test_report_groups_by_version_prompt_and_setting(env, tmp_path, capsys):
    from genframe.cli import main

    store = FeedbackStore()
    a = _text_samples(store, "hub:lm:1", [("Q: ", "yes", {"temperature": 0.5}), ("Q: ", "no", {"temperature": 1.0})])
    b = _text_samples(store, "hub:lm:2", [("Hi", "there", {"temperature": 0.5})])
    store.add_feedback(a[0], rating=1)
    store.add_feedback(a[0], rating=1, flag="good")
    store.add_feedback(a[1], rating=-1, corrected_text="yes")
    store.add_feedback(b[0], rating=1)
    summary = summarize(store)
    by_version = {r["key"]: (r["samples"], r["mean_rating"], r["rated_up"]) for r in summary["by_version"]}
    assert by_version == {"hub:lm:1": (2, 0.0, 0.5), "hub:lm:2": (1, 1.0, 1.0)}
    assert {r["key"]: r["samples"] for r in summary["by_prompt"]} == {"Q: ": 2, "Hi": 1}
    assert summary["corrected"] == 1 and summary["flags"] == 1 and summary["feedback"] == 4
    assert main(["feedback", "report", f"out={tmp_path / 'rep'}"]) == 0
    out = capsys.readouterr().out
    assert "hub:lm:1" in out and "by setting" in out
    assert (tmp_path / "rep" / "ratings.png").stat().st_size > 1000
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["rated_samples"] == 2 + 1
    assert main(["feedback", "report", "model=hub:lm:2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rated_samples"] == 1
    assert main(["feedback", "report", "model=hub:lm:9"]) == 2
    assert "rated versions: hub:lm:1, hub:lm:2" in capsys.readouterr().err
    assert main(["feedback", "report", "bad=1"]) == 2
    assert main(["feedback", "report", f"db={tmp_path / 'none.sqlite'}"]) == 2
    assert main(["feedback", "reprot"]) == 2
    assert "report" in capsys.readouterr().err


def test_text_training_set_keeps_liked_samples_and_corrections(tmp_path, env):
    store = FeedbackStore()
    ids = _text_samples(store, "run-a", [("P1 ", "good", {}), ("P2 ", "bad", {}), ("P3 ", "meh", {}),
                                         ("P4 ", "x", {})])
    store.add_feedback(ids[0], rating=1)
    store.add_feedback(ids[1], rating=-1)
    store.add_feedback(ids[2], rating=-1, corrected_text="fixed")
    store.add_feedback(ids[3], rating=1)
    store.add_feedback(ids[3], rating=-1)  # mean 0: not kept
    data, snapshot = feedback_training_set(store, "run-a", tmp_path, min_rating=0.5, use_corrections=True,
                                           min_samples=1, base_data={"name": "text", "tokenizer": "char"})
    texts = [json.loads(line)["text"] for line in open(data["path"])]
    assert texts == ["P1 good", "P3 fixed"] and data["name"] == "text" and data["tokenizer"] == "char"
    assert snapshot["samples"] == 2 and snapshot["corrected"] == 1
    recorded = json.loads((tmp_path / "feedback_snapshot.json").read_text())
    assert sorted(recorded["sample_ids"]) == sorted([ids[0], ids[2]])
    with pytest.raises(UserError, match="feedback.min_samples=3"):
        feedback_training_set(store, "run-a", tmp_path, min_rating=0.5, use_corrections=True,
                              min_samples=3, base_data=None)
    with pytest.raises(UserError, match="rated versions: run-a"):
        feedback_training_set(store, "other", tmp_path, min_rating=0.5, use_corrections=True,
                              min_samples=0, base_data=None)


def test_finetune_on_feedback_pushes_the_next_version(tiny_vae_run, env, cli, tmp_path):
    hub.push(tiny_vae_run, "digits", license="apache-2.0")
    made = cli("generate", "hub=digits", "num_samples=12", f"hydra.run.dir={tmp_path / 'gen'}", env=env)
    assert made.returncode == 0, made.stderr
    rows = [json.loads(line) for line in (tmp_path / "gen" / "samples" / "manifest.jsonl").read_text().splitlines()]
    store = FeedbackStore()
    liked = {r["id"] for r in rows[::2]}
    for r in rows:
        record = store.sample(r["id"])
        assert record["model_version"] == "hub:digits:1" and record["file"].endswith(r["file"])
        store.add_feedback(r["id"], rating=1 if r["id"] in liked else -1)
    few = cli("finetune", "finetune=feedback", "hub=digits", "feedback.min_samples=100", env=env)
    assert few.returncode == 2 and "feedback.min_samples=100" in few.stderr
    with_data = cli("finetune", "finetune=feedback", "hub=digits", "data=digits", env=env)
    assert with_data.returncode == 2 and "give no data=" in with_data.stderr
    tuned = cli("finetune", "finetune=feedback", "hub=digits", *FAST_TRAINING, "method=lora", "feedback.min_samples=4",
                "finetune.lora.target_modules=[decoder.*]",
                f"hydra.run.dir={tmp_path / 'ft'}", env=env)
    assert tuned.returncode == 0, tuned.stderr
    assert "pushed digits:2" in tuned.stdout
    kept = {p.stem for p in (tmp_path / "ft" / "feedback_data").glob("*.png")}
    assert kept == liked
    info = json.loads((tmp_path / "ft" / "run.json").read_text())
    snapshot = info["feedback_snapshot"]
    assert snapshot["samples"] == 6 and snapshot["model_version"] == "hub:digits:1"
    assert info["finetune_choices"] == {"finetune": "feedback", "method": "lora"}
    entry = hub.verified("digits:2")
    card = entry.card()
    assert card["lineage"]["feedback_snapshot"]["samples"] == 6
    assert sorted(json.loads((entry.path / "feedback_snapshot.json").read_text())["sample_ids"]) == sorted(liked)
    assert card["license"] == "apache-2.0"
