"""The feedback loop's two ends: ``genframe feedback report`` (what people said, by model
version, prompt and setting, with a plot) and the training set ``finetune=feedback``
builds from well-rated samples and corrected texts.

Two objectives learn from the ratings:

- ``sft`` fine-tunes on the samples people rated well (and on their corrections), the
  rejection-sampling form of learning from feedback (RAFT, Dong et al. 2023,
  https://arxiv.org/abs/2304.06767; the "best-of-n" fine-tuning of Touvron et al. 2023,
  https://arxiv.org/abs/2307.09288): the model is pulled toward what was preferred.
- ``dpo`` (language models) also pushes away from what was rated down: preference pairs
  of one prompt, a sample rated up (or a corrected text) against one rated down (or the
  text it corrected), trained with Direct Preference Optimization (Rafailov et al. 2023,
  https://arxiv.org/abs/2305.18290; `genframe.data.preference`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from genframe.errors import UserError, did_you_mean
from genframe.feedback import FeedbackStore
from genframe.files import atomic_write_bytes, atomic_write_json
from genframe.hub import FEEDBACK_SNAPSHOT as SNAPSHOT
from genframe.tasks.common import parse_key_values

DATA_DIR = "feedback_data"
#: What ``feedback.objective`` may be.
OBJECTIVES = ("sft", "dpo")


# -- the training set -------------------------------------------------------------------


def feedback_training_set(store: FeedbackStore, model_version: str, out_dir: Path, *,
                          min_rating: float, use_corrections: bool, min_samples: int,
                          base_data: dict[str, Any] | None, objective: str = "sft",
                          num_classes: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write the training set `objective` learns from the rated samples of
    `model_version` into ``<out_dir>/feedback_data/``, and return (the data config that
    reads it, the snapshot recorded with the run).

    ``sft``: the samples rated at least `min_rating` (mean of their ratings) and, for
    texts, the corrected texts. Images are copied as PNG files (an ``image_folder``, at
    the base data's size, channels and grey levels; a class-conditional model's samples
    go into one sub-folder per label, every one of its `num_classes` classes keeping its
    number); texts are written one sample per document (``text`` data from that file):
    the prompt followed by the output, or by the corrected text where one was given.

    ``dpo``: preference pairs (`preference_pairs`) as ``preference`` data.

    Raises:
        UserError: fewer than `min_samples` usable samples (pairs for ``dpo``); ``dpo``
            on images; an image file that is gone; a label outside the model's classes.
    """
    if objective not in OBJECTIVES:
        raise UserError(f"feedback.objective={objective}: expected one of {', '.join(OBJECTIVES)}."
                        f"{did_you_mean(str(objective), OBJECTIVES)}")
    rated = store.rated_samples(model_version)
    if objective == "dpo":
        return _preference_set(store, rated, model_version, out_dir, min_rating=min_rating,
                               use_corrections=use_corrections, min_samples=min_samples,
                               base_data=base_data)
    chosen = [r for r in rated
              if (r["rating"] is not None and r["rating"] >= min_rating)
              or (use_corrections and r["kind"] == "text" and r["corrected_text"])]
    if len(chosen) < max(1, min_samples):
        versions = sorted({str(r.get("model_version")) for r in store.rated_samples()})
        raise UserError(
            f"finetune=feedback: {len(chosen)} samples of {model_version} are rated >= "
            f"feedback.min_rating={min_rating}{' or corrected' if use_corrections else ''}; at "
            f"least feedback.min_samples={min_samples} are needed (the store {store.path} has "
            f"{len(rated)} rated samples of it; rated versions: {', '.join(versions) or 'none'})")
    kinds = {r["kind"] for r in chosen}
    folder = out_dir / DATA_DIR
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if kinds == {"text"}:
        documents = [(r.get("prompt") or "") + (r["corrected_text"] if use_corrections and r["corrected_text"]
                                                 else (r.get("output") or "")) for r in chosen]
        path = folder / "texts.jsonl"
        atomic_write_bytes(path, "".join(json.dumps({"text": d}) + "\n" for d in documents).encode())
        # A small set: a quarter held out to pick the checkpoint, none for a test split.
        data = {**_keep(base_data, ("tokenizer", "block_size", "batch_size")),
                "name": "text", "source": "jsonl", "path": str(path), "val_fraction": 0.25,
                "test_fraction": 0.0}
    elif kinds == {"image"}:
        labels = [(r.get("condition") or {}).get("label") for r in chosen]
        labelled = num_classes > 0
        if labelled and any(not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < num_classes
                            for k in labels):
            bad = next(k for k in labels if not isinstance(k, int) or not 0 <= k < num_classes)
            raise UserError(f"finetune=feedback: a rated sample of {model_version} has label {bad!r}; the "
                            f"model's classes are 0..{num_classes - 1} (was it made by another model?)")
        for r, label in zip(chosen, labels):
            source = Path(r.get("file") or "")
            if not source.is_file():
                raise UserError(f"finetune=feedback: the image of sample {r['id']} ({source}) is gone; "
                                "remove its feedback or generate and rate again")
            target = folder / str(label) if labelled else folder
            target.mkdir(exist_ok=True)
            shutil.copyfile(source, target / f"{r['id']}.png")
        base = base_data or {}
        class_keys = ({"labels": True, "classes": [str(k) for k in range(num_classes)],
                       "num_classes": num_classes} if labelled else {"labels": False})
        data = {"name": "image_folder", "root": str(folder), **class_keys,
                "image_size": base.get("image_size", 32), "channels": base.get("channels", 3),
                "num_levels": base.get("num_levels", 256),
                "batch_size": min(int(base.get("batch_size", 64)), max(1, len(chosen) // 2)),
                "val_fraction": 0.2, "test_fraction": 0.0}
    else:
        raise UserError(f"finetune=feedback: the rated samples of {model_version} mix images and texts")
    return data, _snapshot(store, chosen, rated, out_dir, model_version=model_version, objective="sft",
                           min_rating=min_rating, use_corrections=use_corrections)


def _snapshot(store: FeedbackStore, used: list[dict[str, Any]], rated: list[dict[str, Any]], out_dir: Path,
              **settings: Any) -> dict[str, Any]:
    """What run.json records of the feedback a training set was built from (the ids
    themselves go to ``<out_dir>/feedback_snapshot.json``)."""
    ids = sorted({r["id"] for r in used})
    snapshot = {
        "store": str(store.path), **settings, "samples": len(ids),
        "corrected": sum(bool(r["corrected_text"]) for r in {r["id"]: r for r in used}.values()),
        "rated_samples_of_version": len(rated),
        "feedback_rows_up_to": max((f["id"] for f in store.feedback()), default=0),
        "sample_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
    }
    atomic_write_json(out_dir / SNAPSHOT, {**snapshot, "sample_ids": ids})
    return snapshot


def preference_pairs(rated: list[dict[str, Any]], *, min_rating: float,
                     use_corrections: bool) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """Preference pairs ``{"prompt", "chosen", "rejected"}`` from rated text samples, and
    the samples they use.

    For each prompt, the samples rated at least `min_rating` (chosen; a corrected sample
    by its corrected text) are paired with those rated below 0 (rejected), round robin so
    that every sample of the larger group is used once. With `use_corrections`, each
    corrected text is also paired against the sample's own output.
    """
    groups: dict[str, dict[str, list[tuple[str, dict[str, Any]]]]] = defaultdict(
        lambda: {"chosen": [], "rejected": []})
    pairs: list[dict[str, str]] = []
    used: list[dict[str, Any]] = []
    for r in rated:
        if r["kind"] != "text":
            continue
        prompt, output = r.get("prompt") or "", r.get("output") or ""
        corrected = r["corrected_text"] if use_corrections and r["corrected_text"] else None
        if corrected is not None and corrected != output and output:
            pairs.append({"prompt": prompt, "chosen": corrected, "rejected": output})
            used.append(r)
        if r["rating"] is None:
            continue
        if r["rating"] >= min_rating and (corrected or output):
            groups[prompt]["chosen"].append((corrected or output, r))
        elif r["rating"] < 0 and output:
            groups[prompt]["rejected"].append((output, r))
    for prompt, sides in groups.items():
        chosen, rejected = sides["chosen"], sides["rejected"]
        if not chosen or not rejected:
            continue
        for i in range(max(len(chosen), len(rejected))):
            (good, a), (bad, b) = chosen[i % len(chosen)], rejected[i % len(rejected)]
            if good != bad:
                pairs.append({"prompt": prompt, "chosen": good, "rejected": bad})
                used += [a, b]
    return pairs, used


def _preference_set(store: FeedbackStore, rated: list[dict[str, Any]], model_version: str, out_dir: Path, *,
                    min_rating: float, use_corrections: bool, min_samples: int,
                    base_data: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    if any(r["kind"] != "text" for r in rated):
        raise UserError(f"feedback.objective=dpo learns from preference pairs of texts; the rated samples "
                        f"of {model_version} are images: use feedback.objective=sft")
    pairs, used = preference_pairs(rated, min_rating=min_rating, use_corrections=use_corrections)
    if len(pairs) < max(1, min_samples):
        raise UserError(
            f"finetune=feedback feedback.objective=dpo: {len(pairs)} preference pairs from the {len(rated)} "
            f"rated samples of {model_version} in {store.path}; at least feedback.min_samples={min_samples} "
            f"are needed. A pair is a sample rated >= feedback.min_rating={min_rating} and one rated below "
            "0 for the same prompt, or a corrected text and the output it corrects")
    folder = out_dir / DATA_DIR
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = folder / "pairs.jsonl"
    atomic_write_bytes(path, "".join(json.dumps(p) + "\n" for p in pairs).encode())
    data = {**_keep(base_data, ("tokenizer", "block_size", "batch_size")), "name": "preference",
            "path": str(path), "val_fraction": 0.2, "test_fraction": 0.0}
    snapshot = _snapshot(store, used, rated, out_dir, model_version=model_version, objective="dpo",
                         min_rating=min_rating, use_corrections=use_corrections)
    return data, {**snapshot, "pairs": len(pairs)}


def _keep(node: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: node[k] for k in keys if node and node.get(k) is not None}


# -- the report --------------------------------------------------------------------------


def summarize(store: FeedbackStore, model_version: str | None = None) -> dict[str, Any]:
    """Ratings by model version, by prompt (text) or condition, and by sampling setting:
    for each group the samples rated, the mean rating and the share rated up."""
    rows = store.rated_samples(model_version)
    groups: dict[str, dict[str, list[float]]] = {"version": defaultdict(list), "prompt": defaultdict(list),
                                                 "setting": defaultdict(list)}
    for r in rows:
        if r["rating"] is None:
            continue
        groups["version"][str(r["model_version"])].append(r["rating"])
        key = r["prompt"] if r["prompt"] is not None else json.dumps(r["condition"] or {}, sort_keys=True)
        groups["prompt"][key].append(r["rating"])
        settings = r["settings"] or {}
        shown = {k: settings[k] for k in ("temperature", "top_k", "top_p", "steps", "guidance",
                                          "truncation", "max_new_tokens") if settings.get(k) is not None}
        groups["setting"][json.dumps(shown, sort_keys=True)].append(r["rating"])

    def table(values: dict[str, list[float]]) -> list[dict[str, Any]]:
        return sorted(({"key": k, "samples": len(v), "mean_rating": sum(v) / len(v),
                        "rated_up": sum(x > 0 for x in v) / len(v)} for k, v in values.items()),
                      key=lambda row: (-row["samples"], row["key"]))

    counts = store.counts()
    return {"store": str(store.path), "samples": counts["samples"], "feedback": counts["feedback"],
            "rated_samples": len(rows), "corrected": sum(bool(r["corrected_text"]) for r in rows),
            "flags": sum(len(r["flags"]) for r in rows),
            **{f"by_{name}": table(values) for name, values in groups.items()}}


def plot(summary: dict[str, Any], path: Path) -> Path:
    """A bar chart of the mean rating and the share rated up per model version (PNG).

    Raises:
        UserError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        raise UserError("the plot of feedback report out=... needs matplotlib: "
                        "pip install 'genframe[serve]' (or leave out out=)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["by_version"]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.5), dpi=100)
    labels = [r["key"] if len(r["key"]) <= 28 else "..." + r["key"][-25:] for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["mean_rating"] for r in rows], width=0.4, label="mean rating (-1..1)")
    ax.bar([i + 0.2 for i in x], [r["rated_up"] for r in rows], width=0.4, label="share rated up")
    for i, r in enumerate(rows):
        ax.annotate(f"n={r['samples']}", (i, 1.02), ha="center", fontsize=8)
    ax.set_xticks(list(x), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(-1, 1.15)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_title("feedback by model version")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


HELP = """usage: genframe feedback report [db=FILE] [model=VERSION] [out=DIR] [--json]

What people said about generated samples (the feedback store: db=, $GENFRAME_FEEDBACK,
or the genframe cache's feedback.sqlite): ratings by model version, by prompt and by
sampling setting. out=DIR also writes report.json and ratings.png (a plot by version).
model=VERSION keeps one version (hub:NAME:VERSION or a run directory).
"""
KEYS = ("db", "model", "out")


def main(args: list[str]) -> int:
    """``genframe feedback report key=value ...``; returns the exit status."""
    if not args or args[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    verb, rest = args[0], args[1:]
    if verb != "report":
        raise UserError(f"feedback {verb}: unknown command.{did_you_mean(verb, ['report'])} "
                        "Use: genframe feedback report")
    opts, as_json = parse_key_values(rest, KEYS, "feedback report")
    db = opts.get("db")
    if db is not None and not Path(db).expanduser().is_file():
        raise UserError(f"feedback report: db={db}: no such file")
    store = FeedbackStore(db)
    summary = summarize(store, opts.get("model"))
    if opts.get("model") and not summary["rated_samples"]:
        versions = sorted({r["key"] for r in summarize(store)["by_version"]})
        raise UserError(f"feedback report: no rated samples of model={opts['model']} in {store.path}; "
                        f"rated versions: {', '.join(versions) or 'none'}")
    if opts.get("out"):
        out = Path(opts["out"]).expanduser()
        if out.exists() and not out.is_dir():
            raise UserError(f"feedback report: out={out} is a file, not a folder")
        out.mkdir(parents=True, exist_ok=True)
        summary["plot"] = str(plot(summary, out / "ratings.png"))
        atomic_write_json(out / "report.json", summary)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print(_text(summary))
    sys.stdout.flush()
    return 0


def _text(summary: dict[str, Any]) -> str:
    lines = [f"feedback store {summary['store']}: {summary['samples']} samples, "
             f"{summary['feedback']} feedback rows, {summary['rated_samples']} samples rated "
             f"({summary['corrected']} corrected, {summary['flags']} flags)"]
    for name in ("version", "prompt", "setting"):
        rows = summary[f"by_{name}"]
        if not rows:
            continue
        lines += ["", f"by {name}:", f"  {'samples':>7}  {'mean':>6}  {'up':>5}  {name}"]
        for r in rows[:20]:
            key = r["key"].replace("\n", "\\n")
            lines.append(f"  {r['samples']:>7}  {r['mean_rating']:>6.2f}  {r['rated_up']:>5.0%}  "
                         f"{key[:70]}")
        if len(rows) > 20:
            lines.append(f"  ... {len(rows) - 20} more (--json for all)")
    if "plot" in summary:
        lines += ["", f"plot: {summary['plot']}"]
    return "\n".join(lines)
