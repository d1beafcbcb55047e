"""The local model hub: finished runs stored as immutable, checksummed ``name:version`` entries.

The hub is a folder (``$GENFRAME_HUB``, else ``hub/`` in genframe's cache folder, see
`genframe.cache.cache_dir`) holding one folder per name and one per version::

    <hub>/<name>/<version>/   model.safetensors, run.json, config.yaml, metrics.json,
                              tokenizer.json, adapter.safetensors, evaluations.jsonl
                              (those the run has), MODEL_CARD.md, model_card.json and
                              manifest.json (sha256 and size of every other file)
    <hub>/<name>/.lock        held while a version of the name is pushed or removed
    <hub>/<name>/.last        the highest version ever given (numbers are never reused)

An entry is itself a run directory (run.json, config.yaml, the weights), so a task given
``hub=name:version`` reads it as ``run=<entry folder>`` after `verify` passed. A push
writes into a temporary folder beside the versions and renames it into place, so a crash
leaves no half entry; a removal renames the entry away before deleting it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from genframe.errors import UserError, did_you_mean, valid_list
from genframe.files import atomic_write_bytes, atomic_write_json
from genframe.runs import CONFIG, METRICS, RUN_INFO, WEIGHTS, open_run

__all__ = ["Entry", "hub_dir", "push", "resolve", "verify", "verified", "list_entries",
           "remove", "pull", "parse_ref"]

HUB_ENV = "GENFRAME_HUB"
MANIFEST = "manifest.json"
CARD = "MODEL_CARD.md"
CARD_JSON = "model_card.json"
TOKENIZER = "tokenizer.json"
EVALUATIONS = "evaluations.jsonl"
#: What a push copies from the run directory (the first three must be there), besides
#: the LoRA adapters (`genframe.lora.ADAPTER_FILE`; imported when used: it needs torch,
#: which `genframe hub list` should not wait for).
#: The ids of the rated samples a finetune=feedback run trained on (`genframe.tasks.feedback`).
FEEDBACK_SNAPSHOT = "feedback_snapshot.json"
COPIED = (RUN_INFO, CONFIG, WEIGHTS, METRICS, TOKENIZER, EVALUATIONS, FEEDBACK_SNAPSHOT)
REQUIRED = (RUN_INFO, CONFIG, WEIGHTS)
NAME = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")
_LOCK = ".lock"
_LAST = ".last"
_TMP = ".tmp-"
#: Assumed mean power draw of one device while training, for the energy estimate (W).
POWER_W = {"cpu": 65.0, "cuda": 300.0}
#: run.json keys that record where a run came from.
LINEAGE_KEYS = ("started_from", "resumed_from", "resume", "resumes", "subject_from", "lineage",
                "feedback_snapshot")


@dataclass(frozen=True)
class Entry:
    """One stored version: ``name:version`` in the folder `path`."""

    name: str
    version: int
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def card(self) -> dict[str, Any]:
        """The machine-readable model card ({} when it cannot be read)."""
        try:
            card = json.loads((self.path / CARD_JSON).read_text())
        except (OSError, ValueError):
            return {}
        return card if isinstance(card, dict) else {}


def hub_dir() -> Path:
    """The hub folder: ``$GENFRAME_HUB``, else ``<genframe cache>/hub`` (not created here)."""
    env = os.environ.get(HUB_ENV)
    if env:
        return Path(env).expanduser()
    from genframe.cache import cache_dir

    return cache_dir("hub")


def check_name(name: Any, key: str = "name") -> str:
    """`name` when it is a valid hub name (lower-case letters, digits, ``.``, ``_``, ``-``,
    starting with a letter or digit); else a `UserError`."""
    if isinstance(name, str) and ":" in name and NAME.match(name.split(":", 1)[0]):
        raise UserError(f"{key}={name}: a push takes a name without a version; versions are "
                        f"given in order (name={name.split(':', 1)[0]})")
    if not isinstance(name, str) or not NAME.match(name):
        raise UserError(f"{key}={name}: not a valid hub name; expected lower-case letters, "
                        "digits, '.', '_' and '-', starting with a letter or digit "
                        "(e.g. name=digits-vae)")
    return name


def parse_ref(ref: Any, key: str = "hub") -> tuple[str, str | None]:
    """``name``, ``name:3`` or ``name:latest`` -> (name, version text or None)."""
    text = str(ref).strip() if ref is not None else ""
    name, colon, version = text.partition(":")
    check_name(name, key)
    if colon and not (version == "latest" or version.isdigit() and int(version) >= 1):
        raise UserError(f"{key}={ref}: the version must be an integer >= 1 or 'latest' "
                        f"(e.g. {key}={name}:1 or {key}={name}:latest)")
    return name, (version if colon else None)


def _versions(name_dir: Path) -> list[int]:
    if not name_dir.is_dir():
        return []
    return sorted(int(p.name) for p in name_dir.iterdir() if p.name.isdigit() and p.is_dir())


def _names(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and NAME.match(p.name) and _versions(p))


def resolve(ref: Any, *, key: str = "hub") -> Entry:
    """The entry ``name`` / ``name:latest`` (the highest version) or ``name:N`` names.

    Raises:
        UserError: a malformed reference, an unknown name (with the known names) or an
            unknown version (with the versions the name has).
    """
    name, version = parse_ref(ref, key)
    root = hub_dir()
    versions = _versions(root / name)
    if not versions:
        names = _names(root)
        raise UserError(f"{key}={ref}: no model named '{name}' in the hub {root}."
                        f"{did_you_mean(name, names)} Names: {valid_list(names)} "
                        "(see `genframe hub list`)")
    if version in (None, "latest"):
        number = versions[-1]
    else:
        number = int(version)
        if number not in versions:
            raise UserError(f"{key}={ref}: '{name}' has no version {number}; versions: "
                            f"{', '.join(map(str, versions))} (latest: {versions[-1]})")
    return Entry(name, number, root / name / str(number))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    """Every file below `folder`, as POSIX paths relative to it (links and folders too)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if not p.is_dir() or p.is_symlink())


def verify(entry: Entry, *, checksums: bool = True) -> Entry:
    """Check every file of `entry` against its manifest: each listed file there, of its
    size and sha256, and no file the manifest does not list. Returns `entry`.
    ``checksums=False`` skips the sha256 of each file (what `hub list` checks: cheap for
    any size, and enough to see a partial, cut or added file).

    Raises:
        UserError: naming the entry and the first file that differs (a tampered, partial
            or damaged entry), with how to replace it.
    """
    fix = f"remove it (genframe hub rm name={entry.ref}) and push the run again"
    where = f"hub entry {entry.ref} ({entry.path})"
    try:
        manifest = json.loads((entry.path / MANIFEST).read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and all(isinstance(v, dict) for v in files.values())
    except FileNotFoundError:
        raise UserError(f"{where} is incomplete: it has no {MANIFEST}; {fix}") from None
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise UserError(f"{where}: {MANIFEST} is damaged (not the manifest a push "
                        f"writes); {fix}") from None
    present = set(_files(entry.path)) - {MANIFEST}
    for rel, record in sorted(files.items()):
        path = entry.path / rel
        if rel not in present or not path.is_file() or path.is_symlink():
            raise UserError(f"{where}: {rel} is missing; {fix}")
        if path.stat().st_size != record.get("size"):
            raise UserError(f"{where}: {rel} has {path.stat().st_size} bytes, the manifest "
                            f"says {record.get('size')} (the file was changed or cut short); {fix}")
        if checksums and _sha256(path) != record.get("sha256"):
            raise UserError(f"{where}: {rel} does not match its sha256 in {MANIFEST} (the file "
                            f"was changed after the push); {fix}")
    extra = sorted(present - set(files))
    if extra:
        raise UserError(f"{where}: {', '.join(extra[:3])} {'is' if len(extra) == 1 else 'are'} "
                        f"not part of the entry (written into it after the push); {fix}")
    return entry


def entry_at(path: str | os.PathLike) -> Entry | None:
    """The hub entry folder `path` is (``<hub>/<name>/<version>``), or None for any other
    path: a run given by its path inside the hub is still an entry, checked and never
    written to."""
    try:
        path = Path(path).expanduser().resolve()
        root = hub_dir().expanduser().resolve()
    except OSError:
        return None
    if path.parent.parent != root or not path.name.isdigit():
        return None
    return Entry(path.parent.name, int(path.name), path)


def verified(ref: Any, *, key: str = "hub") -> Entry:
    """`resolve` then `verify`: the entry to read, checked."""
    return verify(resolve(ref, key=key))


def list_entries() -> list[Entry]:
    """Every stored entry, by name and version (unverified: see `verify`)."""
    root = hub_dir()
    return [Entry(name, v, root / name / str(v)) for name in _names(root)
            for v in _versions(root / name)]


@contextlib.contextmanager
def _name_lock(name_dir: Path):
    """The OS file lock of one name (`filelock`, as `genframe.runs.run_lock`): pushes and
    removals of a name take turns; the kernel drops it when its holder dies."""
    from filelock import FileLock

    with FileLock(str(name_dir / _LOCK)):
        yield


def _writable(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write {what} {path}: {exc.strerror or exc}; set "
                        f"{HUB_ENV}=<a writable folder> (nothing was written)") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: the folder is not writable; set "
                        f"{HUB_ENV}=<a writable folder> (nothing was written)")


def _copy(src: Path, dst: Path) -> None:
    """Copy one file's bytes, flushed to disk (a push renames only whole files into place)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def push(run_dir: str | os.PathLike, name: str, *, license: str | None = None,
         intended_use: str | None = None, limitations: str | None = None) -> Entry:
    """Store a completed run as the next version of `name`.

    Copies the run's weights, run.json, config.yaml and, where the run has them,
    metrics.json, tokenizer.json, adapter.safetensors and evaluations.jsonl; writes the
    model card (``MODEL_CARD.md`` and ``model_card.json``) and ``manifest.json``. The
    entry is written in a temporary folder in the hub and renamed into place under the
    name's lock, so concurrent pushes get distinct versions and a crash leaves nothing.

    Args:
        run_dir: a run directory whose run.json says ``completed``.
        name: the hub name (see `check_name`).
        license, intended_use, limitations: the card's fields (stated as not given when None).

    Raises:
        UserError: a bad name, a path that is not a run, a run that did not complete or
            has no weights, a hub folder that cannot be written.
    """
    check_name(name)
    run = open_run(run_dir)
    status = run.info.get("status")
    if status != "completed":
        why = f": {run.info['error']}" if run.info.get("error") else ""
        raise UserError(f"run={run_dir}: the run is '{status}', not completed{why}; only a "
                        "completed run can be pushed (nothing was written)")
    missing = [f for f in REQUIRED if not (run.path / f).is_file()]
    if missing:
        raise UserError(f"run={run_dir}: the run has no {', '.join(missing)}; only a run "
                        "with its weights can be pushed (nothing was written)")
    root = hub_dir()
    name_dir = root / name
    _writable(name_dir, "the hub folder")
    tmp = name_dir / f"{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with _name_lock(name_dir):
            # Pushes and removals write temporary folders only while they hold this lock:
            # any found now was left by a process killed mid-push (SIGKILL, power loss).
            for stale in name_dir.glob(f"{_TMP}*"):
                shutil.rmtree(stale, ignore_errors=True)
            version = max([*_versions(name_dir), _last(name_dir)]) + 1
            tmp.mkdir()
            from genframe.lora import ADAPTER_FILE

            for file in (*COPIED, ADAPTER_FILE):
                if (run.path / file).is_file():
                    _copy(run.path / file, tmp / file)
            card = model_card(run, name, version, license=license,
                              intended_use=intended_use, limitations=limitations)
            atomic_write_json(tmp / CARD_JSON, card)
            atomic_write_bytes(tmp / CARD, card_markdown(card).encode())
            files = {rel: {"sha256": _sha256(tmp / rel), "size": (tmp / rel).stat().st_size}
                     for rel in _files(tmp)}
            atomic_write_json(tmp / MANIFEST, {"name": name, "version": version, "files": files})
            for rel in [*files, MANIFEST]:  # versions are immutable: read-only files
                (tmp / rel).chmod(0o444)
            _fsync_dir(tmp)
            os.rename(tmp, name_dir / str(version))
            _fsync_dir(name_dir)
            atomic_write_bytes(name_dir / _LAST, f"{version}\n".encode())
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise UserError(f"hub push {name}: cannot write {where}{exc.strerror or exc} "
                        "(nothing was stored)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Entry(name, version, name_dir / str(version))


def _last(name_dir: Path) -> int:
    try:
        return int((name_dir / _LAST).read_text().strip())
    except (OSError, ValueError):
        return 0


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove(ref: Any) -> list[Entry]:
    """Delete ``name:N`` (or ``name:latest``), or every version of a name with
    ``name:all``; a bare name is refused (say which). Returns the entries removed. Each
    entry is renamed away first, so no reader ever sees part of it; version numbers are
    never given again."""
    text = str(ref)
    if text.endswith(":all"):
        name = check_name(text[:-4], "name")
        entries = [resolve(f"{name}:{v}", key="name") for v in _versions(hub_dir() / name)]
        if not entries:
            resolve(name, key="name")  # the unknown-name message
    else:
        name, version = parse_ref(ref, "name")
        if version is None:
            versions = _versions(hub_dir() / name)
            if not versions:
                resolve(name, key="name")
            raise UserError(f"name={ref}: say which version to remove: "
                            f"{', '.join(f'{name}:{v}' for v in versions)}, {name}:latest, "
                            f"or {name}:all for every version")
        entries = [resolve(ref, key="name")]
    name_dir = hub_dir() / entries[0].name
    try:
        with _name_lock(name_dir):
            for entry in entries:
                trash = name_dir / f"{_TMP}rm-{entry.version}-{uuid.uuid4().hex[:8]}"
                os.rename(entry.path, trash)
                shutil.rmtree(trash)
    except OSError as exc:
        raise UserError(f"hub rm {ref}: cannot remove {exc.filename or name_dir}: "
                        f"{exc.strerror or exc}") from None
    return entries


def pull(ref: Any, out: str | os.PathLike) -> Path:
    """Copy the verified entry `ref` into the new folder `out` (checked again after the
    copy); the copy is written beside `out` and renamed, so a failure leaves nothing.

    Raises:
        UserError: an unknown or damaged entry, an `out` that exists and is not an empty
            folder, or cannot be written.
    """
    entry = verified(ref, key="name")
    out = Path(out).expanduser()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"out={out} already exists; give a new (or empty) folder "
                        "(nothing was written)")
    _writable(out.parent, "the folder")
    for stale in out.parent.glob(f".{out.name}{_TMP}*"):  # what a killed pull into `out` left
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}{_TMP}{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(entry.path, tmp)
        verify(Entry(entry.name, entry.version, tmp))
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except OSError as exc:
        raise UserError(f"hub pull {entry.ref}: cannot write {exc.filename or out}: "
                        f"{exc.strerror or exc} (nothing was written)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- the model card ----------------------------------------------------------------------


def _seconds(info: dict[str, Any], run_path: Path) -> float | None:
    """Training time: run.json's ``started`` to its ``ended``, else to metrics.json's
    modification time (written when the task finished)."""
    def parse(text: Any) -> float | None:
        try:
            return datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%S%z").timestamp()
        except (ValueError, TypeError):
            return None

    start = parse(info.get("started"))
    end = parse(info.get("ended"))
    if end is None and (run_path / METRICS).is_file():
        end = (run_path / METRICS).stat().st_mtime
    if start is None or end is None or end < start:
        return None
    return round(end - start, 1)


def _test_metrics(run_path: Path) -> dict[str, Any] | None:
    """The last ``split=test`` line of the run's evaluations.jsonl, or None."""
    found = None
    with contextlib.suppress(OSError):
        for line in (run_path / EVALUATIONS).read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("split") == "test":
                    found = record
    return found


def model_card(run, name: str, version: int, *, license: str | None = None,
               intended_use: str | None = None, limitations: str | None = None) -> dict[str, Any]:
    """The machine-readable model card of `run` (an opened `genframe.runs.Run`)."""
    from genframe.lora import ADAPTER_FILE

    info = run.info
    env = info.get("environment") or {}
    device = str(env.get("device") or "cpu")
    kind = "cuda" if device.startswith("cuda") else "cpu"
    seconds = _seconds(info, run.path)
    watts = POWER_W[kind]
    energy = None if seconds is None else round(seconds * watts / 3.6e6, 6)
    try:
        final = json.loads((run.path / METRICS).read_text())
    except (OSError, ValueError):
        final = {}
    test = _test_metrics(run.path)
    model = info.get("model") or {}
    data = info.get("data") or {}
    return {
        "name": name,
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"name": model.get("name"), "arguments": model.get("kwargs", {}),
                  "adapters": (run.path / ADAPTER_FILE).is_file()},
        "data": data,
        "metrics": {
            "test": test["metrics"] if test else None,
            "test_source": (f"genframe evaluate ({test.get('time')}, {test.get('evaluate_run')})"
                            if test else "none: the run was not evaluated on the test split "
                            "(genframe evaluate run=DIR before pushing)"),
            "final": final,
            "final_source": "metrics.json of the run: the train/ and val/ splits at its end",
        },
        "training": {"task": info.get("task"), "seconds": seconds, "device": device,
                     "steps": info.get("steps"), "epochs": info.get("epochs"),
                     "environment": env},
        "energy": {"kwh": energy, "assumed_watts": watts,
                   "formula": f"training seconds x {watts:g} W (assumed mean draw of one "
                              f"{kind.upper()} device) / 3,600,000 = kWh; an estimate, "
                              "not a measurement"},
        "plugins": info.get("plugins", {}),
        "genframe_version": info.get("genframe_version"),
        "git_revision": info.get("git_revision"),
        "lineage": {"run": str(run.path),
                    **{k: info[k] for k in LINEAGE_KEYS if info.get(k) is not None}},
        "license": license or "unspecified",
        "intended_use": intended_use or "not stated by the publisher",
        "limitations": limitations or (
            "not stated by the publisher; the model is only as good as its data "
            f"({data.get('name', 'unknown')}) and was measured only as listed under metrics"),
    }


def card_markdown(card: dict[str, Any]) -> str:
    """``MODEL_CARD.md``: the card for people."""
    def table(metrics: dict[str, Any] | None) -> list[str]:
        if not metrics:
            return ["(none)"]
        return ["| metric | value |", "| --- | --- |",
                *[f"| {k} | {v:.4f} |" if isinstance(v, (int, float)) else f"| {k} | {v} |"
                  for k, v in sorted(metrics.items())]]

    model, training, energy = card["model"], card["training"], card["energy"]
    lines = [
        f"# {card['name']}:{card['version']}", "",
        f"- model: `{model['name']}` {json.dumps(model['arguments'], sort_keys=True)}"
        + (" + LoRA adapters" if model["adapters"] else ""),
        f"- data: `{card['data'].get('name', 'unknown')}`",
        f"- license: {card['license']}",
        f"- intended use: {card['intended_use']}",
        f"- known limits: {card['limitations']}",
        f"- created: {card['created']}; genframe {card['genframe_version']}, "
        f"git {card['git_revision'] or 'unknown'}", "",
        "## Metrics on the test split", "",
        f"Source: {card['metrics']['test_source']}", "", *table(card["metrics"]["test"]), "",
        "## Metrics at the end of training", "",
        f"Source: {card['metrics']['final_source']}", "", *table(card["metrics"]["final"]), "",
        "## Training", "",
        f"- task: {training['task']}, {training['steps']} steps, {training['epochs']} epochs",
        f"- time: {training['seconds']} s on {training['device']}",
        f"- energy (estimate): {energy['kwh']} kWh = {energy['formula']}", "",
        "## Lineage", "",
        *[f"- {k}: {json.dumps(v, default=str)}" for k, v in card["lineage"].items()], "",
        "## Plugins", "",
        *[f"- {k}: {v.get('distribution')} {v.get('version')}" if isinstance(v, dict)
          else f"- {k}: {v}" for k, v in sorted(card["plugins"].items())], "",
    ]
    return "\n".join(lines)
