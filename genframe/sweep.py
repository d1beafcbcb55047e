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
            metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
            rows.append({"job": job_dir.name, "dir": str(job_dir), "overrides": overrides,
                         "status": "completed" if metrics is not None else "failed",
                         "metrics": metrics or {}})
        if not rows:
            return
        (sweep_dir / "summary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(_table(rows, config), flush=True)

    # Hydra calls these too; a summary needs nothing from them.
    def on_job_start(self, config: Any, **kwargs: Any) -> None:
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
    header = ["job", "swept", *keys]
    body = [[r["job"], " ".join(o for o in r["overrides"] if o not in common) or "-",
             *(f"{r['metrics'][k]:.4f}" if k in r["metrics"] else r["status"] for k in keys)]
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [f"sweep summary ({len(rows)} jobs) in {config.hydra.sweep.dir}", fmt.format(*header)]
    lines += [fmt.format(*row) for row in body]
    return "\n".join(lines)
