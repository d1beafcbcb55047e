"""Preference pairs and DPO: the data module, the objective in the language model, and
the feedback loop's ``feedback.objective=dpo``; with them, labelled image feedback."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from genframe import hub
from genframe.data.preference import PreferenceDataModule, read_preference_jsonl
from genframe.errors import UserError
from genframe.feedback import FeedbackStore, SampleRecord, new_id
from genframe.tasks.feedback import feedback_training_set, preference_pairs
from genframe.text.tokenize import build_tokenizer
from tests.conftest import FAST, FAST_TRAINING


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    ('["a"]', "line 2: expected an object"),
    ('{"prompt": "x", "chosen": "a"}', "line 2: missing rejected"),
    ('{"chosen": "a", "rejected": "b", "score": 1}', "unknown keys score"),
    ('{"chosen": "a", "rejected": 3}', "rejected must be a string"),
    ('{"chosen": "", "rejected": "b"}', "chosen is empty"),
])
def test_bad_pair_files_are_refused_with_the_line(tmp_path, line, message):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, line])
    with pytest.raises(UserError, match=message):
        read_preference_jsonl(path)


def test_missing_and_empty_files_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_preference_jsonl(tmp_path / "none.jsonl")
    with pytest.raises(UserError, match="is a folder"):
        read_preference_jsonl(tmp_path)
    with pytest.raises(UserError, match="no preference pairs"):
        read_preference_jsonl(_write(tmp_path / "e.jsonl", [""]))


def test_pairs_are_read_as_every_jsonl_file_is(tmp_path):
    line = json.dumps({"prompt": "a\u2028b", "chosen": "c", "rejected": "d"}, ensure_ascii=False)
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\r\n")  # byte-order mark, raw U+2028, CRLF
    assert read_preference_jsonl(path) == [{"prompt": "a\u2028b", "chosen": "c", "rejected": "d"}]
    path.write_bytes(b'{"chosen": "caf\xe9", "rejected": "x"}\n')  # Latin-1, not UTF-8
    with pytest.raises(UserError, match="UTF-8"):
        read_preference_jsonl(path)
    path.write_text('{"choosen": "a", "rejected": "b"}\n')
    with pytest.raises(UserError, match="chosen"):
        read_preference_jsonl(path)


def _pairs_module(tmp_path, pairs, block_size=16, **kw):
    data = PreferenceDataModule(path=str(_write(tmp_path / "pairs.jsonl", pairs)), block_size=block_size,
                                batch_size=4, **{"val_fraction": 0.25, **kw})
    data.use_tokenizer(build_tokenizer("char", ["\nabcdefghijklmnopqrstuvwxyz .:?"]))
    return data


def test_rows_mask_the_completion_and_cut_the_prompt_first(tmp_path):
    pairs = [{"prompt": "q: ", "chosen": "yes", "rejected": "no"},
             {"prompt": "a long prompt: ", "chosen": "abcdefghij", "rejected": "xyz"},  # 15 + 10 > 11
             {"prompt": "same", "chosen": "ab", "rejected": "ab"},  # no preference: dropped
             {"chosen": "hello", "rejected": "bye"}]  # no prompt: the start token
    data = _pairs_module(tmp_path, pairs, block_size=10, val_fraction=0.25, seed=3)
    data.setup("fit")
    tok = data.tokenizer
    rows = {}
    for dataset in (data.train_set, data.val_set):
        for i in range(len(dataset)):
            item = dataset[i]
            for side in ("chosen", "rejected"):
                ids = item[f"{side}_tokens"].tolist()
                mask = item[f"{side}_loss_mask"].tolist()
                rows[tok.decode([t for t, m in zip(ids, mask) if m])] = (tok.decode(ids[:mask.index(1)]),
                                                                          len(ids))
    assert rows["yes"] == ("q: ", 11) and rows["no"] == ("q: ", 11)
    assert rows["abcdefghij"] == (" ", 11)  # one prompt token kept; the completion whole
    assert rows["hello"] == ("\n", 11) and rows["bye"] == ("\n", 11)
    assert "ab" not in rows and data.stats["train_dropped"] + data.stats["val_dropped"] == 1


def _tiny_lm(vocab):
    from plugins.transformer.model import Transformer

    torch.manual_seed(0)
    return Transformer(vocab_size=vocab, block_size=16, n_layer=1, n_head=2, n_embd=16, warmup_steps=0)


def _logp_by_hand(model, tokens, mask):
    """Sum of log p(target) over the masked targets, from the logits directly."""
    with torch.no_grad():
        logp = F.log_softmax(model(tokens[:, :-1]).float(), dim=-1)
    picked = logp.gather(-1, tokens[:, 1:, None])[..., 0]
    return (picked * mask[:, 1:]).sum(1)


def test_reference_and_dpo_loss_follow_the_paper(tmp_path):
    pairs = [{"prompt": f"q{i % 3}: ", "chosen": "yes" * (1 + i % 2), "rejected": "no"} for i in range(8)]
    data = _pairs_module(tmp_path, pairs)
    model = _tiny_lm(data.tokenizer.vocab_size)
    data.set_reference(model, source="the test")
    assert data.reference == "the test"
    cols = data.train_set.columns
    for side in ("chosen", "rejected"):
        expected = _logp_by_hand(model, cols[f"{side}_tokens"], cols[f"{side}_loss_mask"])
        assert torch.allclose(cols[f"reference_{side}_logps"], expected, atol=1e-5)
    batch = {k: v[:4] for k, v in cols.items()}
    losses, margin = model.preference_terms(batch)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-5)  # policy == reference
    # One gradient step on the DPO loss widens the margin of the pairs it saw.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(3):
        loss = model.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    losses, margin = model.preference_terms(batch)
    assert (margin > 0).all() and losses.mean() < math.log(2)
    by_hand = model.hparams.dpo_beta * (
        (_logp_by_hand(model, batch["chosen_tokens"], batch["chosen_loss_mask"]) - batch["reference_chosen_logps"])
        - (_logp_by_hand(model, batch["rejected_tokens"], batch["rejected_loss_mask"])
           - batch["reference_rejected_logps"]))
    assert torch.allclose(margin, by_hand, atol=1e-4)
    with pytest.raises(UserError, match="reference model's log-probabilities"):
        model.preference_terms({k: v for k, v in batch.items() if not k.startswith("reference")})


def test_preference_pairs_per_prompt_and_from_corrections():
    def rec(prompt, output, rating, corrected=None):
        return {"id": new_id(), "kind": "text", "prompt": prompt, "output": output, "rating": rating,
                "corrected_text": corrected}

    rated = [rec("A", "a1", 1), rec("A", "a2", -1), rec("A", "a3", -1), rec("B", "b1", 1),
             rec("C", "c1", -1, corrected="c fixed"), rec("D", "d1", 0.0)]
    pairs, used = preference_pairs(rated, min_rating=0.5, use_corrections=True)
    assert sorted((p["prompt"], p["chosen"], p["rejected"]) for p in pairs) == [
        ("A", "a1", "a2"), ("A", "a1", "a3"), ("C", "c fixed", "c1")]
    assert {r["output"] for r in used} == {"a1", "a2", "a3", "c1"}
    pairs, _ = preference_pairs(rated, min_rating=0.5, use_corrections=False)
    assert len(pairs) == 2  # B has no rejected sample, D is neutral, C's correction is left out


def test_train_refuses_preference_data_and_other_models_do_not_fit(tmp_path, cli):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 8)
    done = cli("train", "model=transformer", "data=preference", f"data.path={path}", "data.block_size=8",
               "model.block_size=8")
    assert done.returncode == 2 and "genframe finetune run=<trained model> data=preference" in done.stderr
    vae = cli("train", "model=vae", "data=preference", f"data.path={path}")
    assert vae.returncode == 2 and "needs batch keys image" in vae.stderr


def test_dpo_finetuning_prefers_the_chosen_completion(tiny_lm_run, tmp_path, cli):
    import genframe

    pairs = [{"prompt": "The ", "chosen": "value is", "rejected": "qqq zzz"} for _ in range(12)]
    path = _write(tmp_path / "pairs.jsonl", pairs)
    done = cli("finetune", f"run={tiny_lm_run}", "data=preference", f"data.path={path}", "data.block_size=32",
               "trainer.max_steps=25", "finetune.lr=0.003", "trainer.enable_progress_bar=false",
               "num_samples=1", f"hydra.run.dir={tmp_path / 'dpo'}")
    assert done.returncode == 0, done.stderr
    info = json.loads((tmp_path / "dpo" / "run.json").read_text())
    assert info["dpo_reference"] == str(tiny_lm_run)
    assert "val/reward_accuracy" in done.stdout

    def margin(source):
        model = genframe.load(source)
        data = _loaded_pairs(tmp_path, path, model)
        cols = data.train_set.columns
        return (model.sequence_logps(cols["chosen_tokens"], cols["chosen_loss_mask"])
                - model.sequence_logps(cols["rejected_tokens"], cols["rejected_loss_mask"])).mean().item()

    with torch.no_grad():
        before, after = margin(tiny_lm_run), margin(tmp_path / "dpo")
    assert after > before + 1.0, (before, after)
    # evaluate scores the held-out pairs against the reference the run recorded
    scored = cli("evaluate", f"run={tmp_path / 'dpo'}", "split=val", "trainer.enable_progress_bar=false")
    assert scored.returncode == 0, scored.stderr
    accuracy = float(scored.stdout.split("val/reward_accuracy")[1].split()[0])
    assert accuracy == 1.0
    unscored = cli("evaluate", f"run={tiny_lm_run}", "data=preference", f"data.path={path}",
                   "data.block_size=32", "split=val")
    assert unscored.returncode == 2 and "reference=<run dir>" in unscored.stderr


def _loaded_pairs(tmp_path, path, model):
    data = PreferenceDataModule(path=str(path), block_size=32, val_fraction=0.25)
    data.use_tokenizer(model.tokenizer)
    data.setup("fit")
    return data


def test_feedback_dpo_builds_pairs_trains_and_pushes(tiny_lm_run, tmp_path, cli, monkeypatch):
    env = {"GENFRAME_HUB": str(tmp_path / "hub"), "GENFRAME_FEEDBACK": str(tmp_path / "fb.sqlite")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    hub.push(tiny_lm_run, "lm", license="mit")
    store = FeedbackStore()
    ids = []
    for i in range(16):
        sid, up = new_id(), i % 4 < 2
        store.add_samples([SampleRecord(id=sid, source="serve", kind="text", prompt=f"P{i % 2} ",
                                        output=f"good text {i}" if up else f"bad text {i}", model="transformer",
                                        model_version="hub:lm:1")])
        store.add_feedback(sid, rating=1 if up else -1)
        ids.append(sid)
    images = cli("finetune", "finetune=feedback", "hub=lm", "feedback.objective=dop", env=env)
    assert images.returncode == 2 and "did you mean" in images.stderr.lower()
    done = cli("finetune", "finetune=feedback", "hub=lm", "feedback.objective=dpo", "feedback.min_samples=4",
               "trainer.max_steps=4", "trainer.enable_progress_bar=false", "num_samples=1",
               f"hydra.run.dir={tmp_path / 'ft'}", env=env)
    assert done.returncode == 0, done.stderr
    assert "pushed lm:2" in done.stdout
    pairs = [json.loads(line) for line in (tmp_path / "ft" / "feedback_data" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 8 and all(p["chosen"].startswith("good") and p["rejected"].startswith("bad")
                                   for p in pairs)
    assert {p["prompt"] for p in pairs} == {"P0 ", "P1 "}
    card = hub.verified("lm:2").card()
    assert card["lineage"]["feedback_snapshot"]["objective"] == "dpo"
    assert card["lineage"]["feedback_snapshot"]["pairs"] == 8


def _png(path, value):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)
    return path


def test_labelled_image_feedback_keeps_each_class_number(tmp_path, monkeypatch):
    from genframe.data.image_folder import ImageFolderDataModule

    monkeypatch.setenv("GENFRAME_FEEDBACK", str(tmp_path / "fb.sqlite"))
    store = FeedbackStore()
    labels = {}
    for i, label in enumerate([3, 3, 7, 7, 7, 3]):
        sid = new_id()
        file = _png(tmp_path / "gen" / f"{i}.png", 20 * i)
        store.add_samples([SampleRecord(id=sid, source="generate", kind="image", condition={"label": label},
                                        file=str(file), model="vae", model_version="v1")])
        store.add_feedback(sid, rating=1)
        labels[sid] = label
    data_cfg, _ = feedback_training_set(store, "v1", tmp_path / "run", min_rating=0.5, use_corrections=True,
                                        min_samples=1, base_data={"image_size": 8, "channels": 1,
                                                                  "num_levels": 17}, num_classes=10)
    assert data_cfg["classes"] == [str(k) for k in range(10)] and data_cfg["num_classes"] == 10
    settings = {**{k: v for k, v in data_cfg.items() if k != "name"}, "val_fraction": 0.2, "cache": True}
    module = ImageFolderDataModule(**settings)
    module.setup("fit")
    files = {p.stem: int(p.parent.name) for p in (tmp_path / "run" / "feedback_data").rglob("*.png")}
    assert files == labels  # each sample under its own label's folder
    got = sorted(int(module.train_set.labels[i]) for i in range(len(module.train_set)))
    got += sorted(int(module.val_set.labels[i]) for i in range(len(module.val_set)))
    assert sorted(got) == sorted(labels.values())  # 3 and 7 keep their numbers out of 10
    with pytest.raises(UserError, match="label 12"):
        sid = new_id()
        store.add_samples([SampleRecord(id=sid, source="generate", kind="image", condition={"label": 12},
                                        file=str(_png(tmp_path / "x.png", 1)), model="vae", model_version="v1")])
        store.add_feedback(sid, rating=1)
        feedback_training_set(store, "v1", tmp_path / "run", min_rating=0.5, use_corrections=True, min_samples=1,
                              base_data=None, num_classes=10)
    with pytest.raises(UserError, match="objective=dpo learns from preference pairs of texts"):
        feedback_training_set(store, "v1", tmp_path / "run", min_rating=0.5, use_corrections=True, min_samples=1,
                              base_data=None, objective="dpo")


def test_image_folder_classes_keep_numbers_of_missing_classes(tmp_path):
    from genframe.data.image_folder import ImageFolderDataModule

    for name in ("b", "d"):
        for i in range(3):
            _png(tmp_path / "imgs" / name / f"{i}.png", 10 * i)
    module = ImageFolderDataModule(root=str(tmp_path / "imgs"), classes=["a", "b", "c", "d"], image_size=8,
                                   channels=1, val_fraction=0.2, test_fraction=0.0)
    assert module.num_classes == 4 and module.class_names == ["a", "b", "c", "d"]
    assert sorted(set(module._file_labels)) == [1, 3]
    with pytest.raises(UserError, match="class folders d are not in data.classes"):
        ImageFolderDataModule(root=str(tmp_path / "imgs"), classes=["a", "b"], image_size=8, channels=1)
    with pytest.raises(UserError, match="data.labels=false"):
        ImageFolderDataModule(root=str(tmp_path / "imgs"), classes=["b", "d"], labels=False)


def test_class_conditional_feedback_end_to_end(tmp_path, cli, monkeypatch):
    env = {"GENFRAME_HUB": str(tmp_path / "hub"), "GENFRAME_FEEDBACK": str(tmp_path / "fb.sqlite")}
    trained = cli("train", "experiment=digits_vae", *FAST, "model.num_classes=10",
                  f"hydra.run.dir={tmp_path / 'vae'}", env=env)
    assert trained.returncode == 0, trained.stderr
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    hub.push(tmp_path / "vae", "cvae", license="mit")
    for label in (3, 7):
        made = cli("generate", "hub=cvae", "num_samples=6", f"condition.label={label}",
                   f"hydra.run.dir={tmp_path / f'gen{label}'}", env=env)
        assert made.returncode == 0, made.stderr
    store = FeedbackStore()
    for label in (3, 7):
        rows = (tmp_path / f"gen{label}" / "samples" / "manifest.jsonl").read_text().splitlines()
        for row in map(json.loads, rows):
            assert store.sample(row["id"])["condition"]["label"] == label
            store.add_feedback(row["id"], rating=1)
    tuned = cli("finetune", "finetune=feedback", "hub=cvae", *FAST_TRAINING, "feedback.min_samples=4",
                f"hydra.run.dir={tmp_path / 'ft'}", env=env)
    assert tuned.returncode == 0, tuned.stderr
    folders = {p.parent.name for p in (tmp_path / "ft" / "feedback_data").rglob("*.png")}
    assert folders == {"3", "7"} and "pushed cvae:2" in tuned.stdout


def test_a_resumed_dpo_run_measures_against_the_model_it_started_from(tiny_lm_run, tmp_path, compose_task,
                                                                       monkeypatch):
    from genframe.tasks.finetune import finetune
    from genframe.tasks.train import train
    from genframe.weights import load_model

    start = {k: v.clone() for k, v in load_model(str(tiny_lm_run))[0].state_dict().items()}
    seen = []
    original = PreferenceDataModule.set_reference

    def spy(self, model, *, source):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return original(self, model, source=source)

    monkeypatch.setattr(PreferenceDataModule, "set_reference", spy)
    path = _write(tmp_path / "pairs.jsonl", [{"prompt": "The ", "chosen": "value", "rejected": "qqq"}] * 8)
    first = finetune(compose_task("finetune", f"run={tiny_lm_run}", "data=preference", f"data.path={path}",
                                  "data.block_size=32", "trainer.max_steps=3", "finetune.lr=0.01",
                                  "trainer.enable_progress_bar=false", "num_samples=0"))
    more = train(compose_task("train", f"resume={first['run_dir']}"), overrides=["trainer.max_steps=6"])
    info = json.loads((more["run_dir"] / "run.json").read_text())
    assert info["steps"] == 6 and info["dpo_reference"] == str(tiny_lm_run)
    trained = load_model(str(first["run_dir"]))[0].state_dict()
    assert len(seen) == 2
    for state in seen:  # both times the starting weights, never the trained ones
        assert all(torch.equal(state[k], start[k]) for k in start)
    assert not all(torch.equal(trained[k], start[k]) for k in start)
