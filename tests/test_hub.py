"""The local model hub: push, list, show, pull, rm, integrity, and hub= in the tasks."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

from genframe import hub
from genframe.cli import main as cli_main
from genframe.errors import UserError
from tests.conftest import FAST


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny completed VAE run shared by the tests below (never written to)."""
    from genframe.config import compose
    from genframe.tasks.train import train

    out = tmp_path_factory.mktemp("hubtrain") / "run"
    return train(compose("train", [*FAST, f"paths.output_dir={out}"]))["run_dir"]


@pytest.fixture
def hub_root(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    monkeypatch.setenv(hub.HUB_ENV, str(root))
    return root


def copy_run(run_dir, dest, **changes):
    """A copy of the run with run.json keys changed."""
    shutil.copytree(run_dir, dest)
    info = json.loads((dest / "run.json").read_text())
    info.update(changes)
    (dest / "run.json").write_text(json.dumps(info))
    return dest


def hub_cli(*args, capsys):
    code = cli_main(["hub", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_hub_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(hub.HUB_ENV, raising=False)
    monkeypatch.setenv("GENFRAME_CACHE", str(tmp_path / "c"))
    assert hub.hub_dir() == tmp_path / "c" / "hub"
    monkeypatch.setenv(hub.HUB_ENV, str(tmp_path / "h"))
    assert hub.hub_dir() == tmp_path / "h"


def test_push_list_show_versions_and_latest(run_dir, hub_root, capsys):
    code, out, _ = hub_cli("push", f"run={run_dir}", "name=digits-vae", "license=MIT",
                           capsys=capsys)
    assert code == 0 and "digits-vae:1" in out
    entry = hub_root / "digits-vae" / "1"
    for name in ("model.safetensors", "run.json", "config.yaml", "metrics.json",
                 "MODEL_CARD.md", "model_card.json", "manifest.json"):
        assert (entry / name).is_file(), name
    manifest = json.loads((entry / "manifest.json").read_text())["files"]
    assert set(manifest) == {p.name for p in entry.iterdir()} - {"manifest.json"}
    card = json.loads((entry / "model_card.json").read_text())
    assert card["license"] == "MIT" and card["model"]["name"] == "vae"
    assert card["data"]["name"] == "digits" and card["metrics"]["test"] is None
    assert "not evaluated on the test split" in card["metrics"]["test_source"]
    assert card["metrics"]["final"]["val/loss"] > 0
    assert "W" in card["energy"]["formula"] and card["training"]["device"] == "cpu"
    assert card["lineage"]["run"] == str(run_dir) and "vae" in card["plugins"]

    code, out, _ = hub_cli("push", f"run={run_dir}", "name=digits-vae", capsys=capsys)
    assert code == 0 and "digits-vae:2" in out
    assert hub.resolve("digits-vae:latest").version == 2
    assert hub.resolve("digits-vae").version == 2
    assert hub.resolve("digits-vae:1").path == entry

    code, out, _ = hub_cli("list", capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["NAME:VERSION", "MODEL", "DATA"]
    assert [ln.split()[0] for ln in lines[1:]] == ["digits-vae:1", "digits-vae:2"]
    code, out, _ = hub_cli("list", "--json", capsys=capsys)
    assert [r["ref"] for r in json.loads(out)] == ["digits-vae:1", "digits-vae:2"]

    code, out, _ = hub_cli("show", "name=digits-vae:1", capsys=capsys)
    assert code == 0 and "# digits-vae:1" in out and "license: MIT" in out
    assert "model.safetensors" in out and "checksums verified" in out
    code, out, _ = hub_cli("show", "name=digits-vae", "--json", capsys=capsys)
    assert json.loads(out)["card"]["version"] == 2


def test_generate_from_the_hub_and_refuse_a_tampered_entry(run_dir, hub_root, cli, tmp_path):
    hub.push(run_dir, "vae")
    env = {hub.HUB_ENV: str(hub_root)}
    ok = cli("generate", "hub=vae:1", "num_samples=2", f"hydra.run.dir={tmp_path / 'gen'}", env=env)
    assert ok.returncode == 0, ok.stderr
    assert len(list((tmp_path / "gen" / "samples").glob("0*.png"))) == 2
    assert json.loads((tmp_path / "gen" / "run.json").read_text())["status"] == "completed"

    both = cli("generate", "hub=vae:1", f"run={run_dir}", env=env)
    assert both.returncode == 2 and "not both" in both.stderr

    weights = hub_root / "vae" / "1" / "model.safetensors"
    assert weights.stat().st_mode & 0o222 == 0  # pushed files are read-only
    weights.chmod(0o644)
    with open(weights, "ab") as f:
        f.write(b"x")
    bad = cli("generate", "hub=vae:1", "num_samples=2", f"hydra.run.dir={tmp_path / 'gen2'}",
              env=env)
    assert bad.returncode == 2 and "model.safetensors" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "gen2" / "samples").exists()
    # The entry given by its path is the same entry: checked too.
    by_path = cli("generate", f"run={hub_root / 'vae' / '1'}", "num_samples=2", env=env)
    assert by_path.returncode == 2 and "hub entry vae:1" in by_path.stderr and "model.safetensors" in by_path.stderr


def test_finetune_and_export_take_hub(run_dir, hub_root, cli, tmp_path):
    entry = hub.push(run_dir, "vae")
    env = {hub.HUB_ENV: str(hub_root)}
    tuned = cli("finetune", "hub=vae", *[o for o in FAST if not o.startswith("model.")],
                f"hydra.run.dir={tmp_path / 'ft'}", env=env)
    assert tuned.returncode == 0, tuned.stderr
    info = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert info["status"] == "completed" and str(entry.path) in json.dumps(info["started_from"])
    exported = cli("export", "hub=vae:1", f"out={tmp_path / 'exp'}", env=env)
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "exp" / "model.safetensors").is_file()
    hub.verify(entry)  # the tasks read the entry, they never write into it
    missing = cli("export", "hub=nothing:1", f"out={tmp_path / 'exp2'}", env=env)
    assert missing.returncode == 2 and "no model named 'nothing'" in missing.stderr


def test_tampered_missing_and_extra_files_are_refused(run_dir, hub_root, capsys):
    entry = hub.push(run_dir, "vae")
    hub.verify(entry)
    card = entry.path / "model_card.json"
    card.chmod(0o644)
    original = card.read_bytes()
    card.write_bytes(original.replace(b'"vae"', b'"vaf"', 1))  # same size, other bytes
    with pytest.raises(UserError, match="model_card.json does not match its sha256"):
        hub.verified("vae:1")
    card.write_bytes(original)
    hub.verify(entry)

    (entry.path / "metrics.json").unlink()
    code, _, err = hub_cli("show", "name=vae:1", capsys=capsys)
    assert code == 2 and "metrics.json is missing" in err
    other = hub.push(run_dir, "other")
    code, out, _ = hub_cli("list", "--json", capsys=capsys)
    status = {row["ref"]: row["status"] for row in json.loads(out)}
    assert code == 0 and status == {"vae:1": "damaged", "other:1": "complete"}
    code, out, err = hub_cli("verify", capsys=capsys)  # every entry, with checksums
    assert code == 2 and "other:1: all files match" in out and "metrics.json is missing" in out
    assert "1 hub entry is damaged" in err
    code, out, _ = hub_cli("list", capsys=capsys)
    assert code == 0 and "STATUS" in out and "damaged" in out.splitlines()[1 + sorted(status).index("vae:1")]
    hub.remove(other.ref)

    entry = hub.push(run_dir, "vae")
    (entry.path / "notes.txt").write_text("added later")
    with pytest.raises(UserError, match="notes.txt is not part of the entry"):
        hub.verify(entry)
    (entry.path / "manifest.json").unlink()
    with pytest.raises(UserError, match="incomplete: it has no manifest.json"):
        hub.verify(entry)


def test_rm_and_versions_are_never_reused(run_dir, hub_root, capsys):
    hub.push(run_dir, "vae")
    hub.push(run_dir, "vae")
    code, _, err = hub_cli("rm", "name=vae", capsys=capsys)
    assert code == 2 and "vae:1, vae:2" in err and "vae:all" in err
    code, out, _ = hub_cli("rm", "name=vae:latest", capsys=capsys)
    assert code == 0 and "vae:2" in out
    assert not (hub_root / "vae" / "2").exists()
    assert hub.push(run_dir, "vae").version == 3  # 2 stays gone
    code, out, _ = hub_cli("rm", "name=vae:all", capsys=capsys)
    assert code == 0 and "vae:1" in out and "vae:3" in out
    assert hub.list_entries() == []
    assert not [p for p in (hub_root / "vae").iterdir() if p.is_dir()]
    code, out, _ = hub_cli("list", capsys=capsys)
    assert code == 0 and "is empty" in out
    code, _, err = hub_cli("rm", "name=vae:1", capsys=capsys)
    assert code == 2 and "no model named 'vae'" in err


def test_pull_copies_a_verified_entry(run_dir, hub_root, tmp_path, capsys):
    hub.push(run_dir, "vae")
    out = tmp_path / "pulled"
    killed = tmp_path / ".pulled.tmp-deadbeef"  # what a pull killed mid-copy leaves
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    code, _, _ = hub_cli("pull", "name=vae", f"out={out}", capsys=capsys)
    assert code == 0 and not killed.exists()
    assert (out / "model.safetensors").read_bytes() == (run_dir / "model.safetensors").read_bytes()
    hub.verify(hub.Entry("vae", 1, out))
    code, _, err = hub_cli("pull", "name=vae", f"out={out}", capsys=capsys)
    assert code == 2 and "already exists" in err
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.parametrize("status", ["failed", "running"])
def test_push_refuses_a_run_that_did_not_complete(run_dir, hub_root, tmp_path, capsys, status):
    bad = copy_run(run_dir, tmp_path / "bad", status=status, error="boom")
    code, _, err = hub_cli("push", f"run={bad}", "name=vae", capsys=capsys)
    assert code == 2 and f"'{status}', not completed" in err
    assert hub.list_entries() == []


def test_unknown_names_versions_and_bad_input(run_dir, hub_root, tmp_path, capsys):
    hub.push(run_dir, "digits")
    code, _, err = hub_cli("show", "name=digitz", capsys=capsys)
    assert code == 2 and "no model named 'digitz'" in err and "'digits'" in err
    code, _, err = hub_cli("show", "name=digits:7", capsys=capsys)
    assert code == 2 and "no version 7" in err and "versions: 1" in err
    code, _, err = hub_cli("show", "name=digits:x", capsys=capsys)
    assert code == 2 and "integer >= 1 or 'latest'" in err
    code, _, err = hub_cli("push", f"run={run_dir}", "name=Bad Name", capsys=capsys)
    assert code == 2 and "not a valid hub name" in err
    code, _, err = hub_cli("push", f"run={run_dir}", capsys=capsys)
    assert code == 2 and "name=..." in err
    code, _, err = hub_cli("push", f"run={run_dir}", "name=x", "licence=MIT", capsys=capsys)
    assert code == 2 and "Did you mean 'license'" in err
    code, _, err = hub_cli("pusj", capsys=capsys)
    assert code == 2 and "Did you mean 'push'" in err
    code, _, err = hub_cli("push", f"run={tmp_path / 'nope'}", "name=x", capsys=capsys)
    assert code == 2 and "no such directory" in err


def test_a_hub_that_cannot_be_written_is_refused(run_dir, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(hub.HUB_ENV, str(blocker / "hub"))
    code, _, err = hub_cli("push", f"run={run_dir}", "name=vae", capsys=capsys)
    assert code == 2 and "cannot write the hub folder" in err and hub.HUB_ENV in err
    assert blocker.read_text() == "not a folder"


def test_a_crash_mid_push_leaves_nothing(run_dir, hub_root, monkeypatch):
    real, copied = hub._copy, []

    def copy_then_crash(src, dst):
        if copied:
            raise RuntimeError("killed mid-push")
        real(src, dst)
        copied.append(dst)

    monkeypatch.setattr(hub, "_copy", copy_then_crash)
    with pytest.raises(RuntimeError, match="killed mid-push"):
        hub.push(run_dir, "vae")
    assert copied  # the crash came after a file was written
    assert hub.list_entries() == []
    assert [p.name for p in (hub_root / "vae").iterdir() if p.is_dir()] == []
    monkeypatch.setattr(hub, "_copy", real)
    killed = hub_root / "vae" / ".tmp-999999-deadbeef"  # what a SIGKILL mid-push leaves
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    assert hub.push(run_dir, "vae").version == 1
    assert not killed.exists()


def test_concurrent_pushes_get_distinct_versions(run_dir, hub_root, monkeypatch):
    real = hub._copy

    def slow_copy(src, dst):  # widen the window two unlocked pushes would collide in
        time.sleep(0.05)
        real(src, dst)

    monkeypatch.setattr(hub, "_copy", slow_copy)
    results, errors = [], []

    def push():
        try:
            results.append(hub.push(run_dir, "vae").version)
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=push) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == [1, 2]
    for entry in hub.list_entries():
        hub.verify(entry)


def test_concurrent_pushes_from_two_processes_get_distinct_versions(run_dir, hub_root):
    import os
    import subprocess
    import sys

    script = ("import sys, time; from genframe import hub; real = hub._copy\n"
              "hub._copy = lambda s, d: (time.sleep(0.1), real(s, d))\n"
              "print(hub.push(sys.argv[1], 'vae').version)")
    env = {**os.environ, hub.HUB_ENV: str(hub_root)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(run_dir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert sorted(int(out) for out, _ in outs) == [1, 2]
    for entry in hub.list_entries():
        hub.verify(entry)


def test_card_reports_test_split_metrics_from_evaluate(run_dir, hub_root, tmp_path):
    run = copy_run(run_dir, tmp_path / "evaluated", started="2026-01-01T10:00:00+0000",
                   ended="2026-01-01T11:00:00+0000")
    line = {"time": "2026-01-01T12:00:00", "evaluate_run": "/x", "split": "test",
            "metrics": {"test/loss": 12.5}}
    (run / "evaluations.jsonl").write_text(json.dumps(line) + "\n")
    card = hub.push(run, "vae").card()
    assert card["metrics"]["test"] == {"test/loss": 12.5}
    assert card["training"]["seconds"] == 3600.0
    assert card["energy"]["kwh"] == pytest.approx(3600 * hub.POWER_W["cpu"] / 3.6e6)
    text = (hub_root / "vae" / "1" / "MODEL_CARD.md").read_text()
    assert "| test/loss | 12.5000 |" in text


def test_a_bad_hub_source_leaves_no_run_directory(cli, tmp_path, monkeypatch):
    """Refused before Hydra makes the task's run directory."""
    monkeypatch.setenv("GENFRAME_HUB", str(tmp_path / "hub"))
    done = cli("generate", "hub=nothing-here:1", env={"GENFRAME_HUB": str(tmp_path / "hub")})
    assert done.returncode == 2 and "nothing-here" in done.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("run.json"))


def test_evaluate_takes_hub_and_leaves_the_entry_unchanged(run_dir, hub_root, tmp_path):
    """evaluate writes evaluations.jsonl into a run it reads; a hub entry is never changed."""
    from genframe.config import compose
    from genframe.tasks import _with_hub
    from genframe.tasks.evaluate import evaluate

    entry = hub.push(run_dir, "vae")
    cfg = compose("evaluate", ["hub=vae", "metrics.enabled=false", "trainer.limit_val_batches=1",
                               "trainer.enable_progress_bar=false",
                               f"paths.output_dir={tmp_path / 'eval'}"])
    result = evaluate(_with_hub(cfg))
    assert "test/loss" in result["metrics"]
    assert not (entry.path / "evaluations.jsonl").exists()
    hub.verify(entry)
    by_path = compose("evaluate", [f"run={entry.path}", "metrics.enabled=false",
                                   "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
                                   f"paths.output_dir={tmp_path / 'eval2'}"])
    evaluate(by_path)  # the entry given by its path is not written to either
    hub.verify(entry)
    source = json.loads((tmp_path / "eval" / "run.json").read_text())["source"]
    assert source["hub"] == "vae" and source["run"] == str(entry.path)
