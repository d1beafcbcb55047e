"""A Hydra callback that summarises a multirun: one row per job with its metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


class SweepSummary(Callback):
    """At the end of `-m` sweeps, print each job's overrides and metrics and write
    ``summary.jsonl`` into the sweep directory."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = []
        for job_dir in sorted(sweep_dir.iterdir(), key=lambda p: (len(p.name), p.name)):
            metrics_path = job_dir / "metrics.json"
            overrides_path = job_dir / ".hydra" / "overrides.yaml"
            if not job_dir.is_dir() or not overrides_path.exists():
                continue
            from omegaconf import OmegaConf

            overrides = list(OmegaConf.load(overrides_path))
            metrics = _read_json(metrics_path) if metrics_path.exists() else None
            info = _read_json(job_dir / "run.json") or {}
            status = info.get("status") or ("completed" if metrics is not None else "failed")
            row = {"job": job_dir.name, "dir": str(job_dir), "overrides": overrides,
                   "status": status, "metrics": metrics or {}}
            if info.get("error"):
                row["error"] = info["error"]
            rows.append(row)
        if not rows:
            return
        from genframe.files import atomic_write_bytes

        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write_bytes(sweep_dir / "summary.jsonl", text.encode())
        print(_table(rows, config), flush=True)

    # Hydra calls these too; a summary needs nothing from them.
    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        return None


def _read_json(path: Path) -> Any:
    """A job's JSON file, or None when it is missing or damaged (the job died writing)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _table(rows: list[dict], config: Any) -> str:
    monitor = config.get("monitor")
    keys = sorted({k for r in rows for k in r["metrics"] if k.startswith("val/")})
    if monitor in keys:
        keys.remove(monitor)
        keys.insert(0, monitor)
    keys = keys[:4]
    # Show only the overrides that differ between jobs (the swept ones).
    common = set.intersection(*(set(r["overrides"]) for r in rows))
    header = ["job", "status", "swept", *keys]
    body = [[r["job"], r["status"], " ".join(o for o in r["overrides"] if o not in common) or "-",
             *(f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "-" for k in keys)]
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [f"sweep summary ({len(rows)} jobs) in {config.hydra.sweep.dir}", fmt.format(*header)]
    lines += [fmt.format(*row) for row in body]
    return "\n".join(lines)
