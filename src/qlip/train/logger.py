"""Where training progress goes: JSONL always, TensorBoard when installed, a tqdm bar on rank 0.

Only the main process writes; the others get a logger whose methods do nothing, so call sites need no checks.

``metrics.jsonl`` has one JSON record per line and :func:`read_metrics` is the one reader of it in the package. A
run killed while writing leaves a torn last line, which the reader skips. When a run (re)starts at step S, the
records of steps after S are removed before it appends: after a resume those steps are trained again, and the log
holds one timeline with each step once. Rows of an abandoned timeline would otherwise survive wherever the new one
does not reach again (killed at 7, resumed from 4, killed at 5: keeping "the last row per step" would show 6 and 7
of the run that was thrown away). A fresh start (S = 0) over an older log moves that log aside to
``metrics.replaced-<UTC time>.jsonl`` instead of emptying it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from ..fileio import write_text_atomic

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan / inf
    return value


class RunLogger:
    """Metrics sink of one run.

    Args:
        run_dir: the run directory (``metrics.jsonl`` and ``tb/`` go there).
        enabled: False on non-main ranks.
        total_steps: the last step of this invocation (for the progress bar).
        start_step: where the run (re)starts.
        progress: show a tqdm bar.
        tensorboard: write TensorBoard events when ``tensorboard`` is installed.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 progress: bool = True, tensorboard: bool = True) -> None:  # fmt: skip
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_NAME
        self.bar = None
        self.tb = None
        if not enabled:
            return
        drop_metrics_after(run_dir, start_step)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # optional dependency: JSONL is always written
                log.info("tensorboard is not installed; metrics go to %s only", self.path)
        self._last_step = start_step

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        """Append one record (``{"step", "kind", "time", **metrics}``) and mirror it to TensorBoard."""
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def progress(self, step: int, postfix: dict[str, Any] | None = None) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self._last_step)
        self._last_step = step
        if postfix:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                 refresh=False)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def metrics_file(source: str | Path) -> Path:
    """``source`` itself when it is a file, else ``source/metrics.jsonl``."""
    source = Path(source)
    return source if source.is_file() else source / METRICS_NAME


def _parsed_lines(path: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """Every line of ``path`` with its record (None for a line that is not a JSON object)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out: list[tuple[str, dict[str, Any] | None]] = []
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        out.append((line, record if isinstance(record, dict) else None))
    return out


def read_metrics(source: str | Path, kind: str | None = "train") -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``, in order.

    Args:
        source: the run directory, or the metrics file itself.
        kind: keep only records of this kind ("train", "eval"; a record without one counts as "train"), or all
            with None.

    A torn last line (a run killed while writing) is skipped quietly, other lines that are not JSON objects with a
    warning. A missing file gives no records.
    """
    path = metrics_file(source)
    if not path.is_file():
        return []
    parsed = _parsed_lines(path)
    bad = [i for i, (_, record) in enumerate(parsed) if record is None]
    if bad and bad != [len(parsed) - 1]:
        log.warning("%s: skipped %d lines that are not JSON objects", path, len(bad))
    records = [r for _, r in parsed if r is not None]
    return [r for r in records if kind is None or r.get("kind", "train") == kind]


def drop_metrics_after(run_dir: str | Path, step: int) -> None:
    """Prepare ``run_dir/metrics.jsonl`` for a run (re)starting at ``step``: remove the records of later steps and
    any torn line (rewritten atomically); at step 0 an older log is moved aside whole instead."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return
    raw = path.read_text(encoding="utf-8", errors="replace")
    parsed = _parsed_lines(path)
    keep = [line for line, r in parsed if r is not None and isinstance(r.get("step"), (int, float))
            and r["step"] <= step]
    if len(keep) == len(parsed) and (not raw or raw.endswith("\n")):
        return
    if step == 0:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = path.with_name(f"metrics.replaced-{stamp}.jsonl")
        n = 0
        while aside.exists():
            n += 1
            aside = path.with_name(f"metrics.replaced-{stamp}-{n}.jsonl")
        os.replace(path, aside)
        log.warning("%s holds %d records of an earlier run; moved to %s (this run starts at step 0)",
                    path, len(parsed), aside.name)  # fmt: skip
        return
    write_text_atomic(path, "".join(line + "\n" for line in keep))
    log.info("%s: removed %d records after step %d (they are trained again) and any torn line",
             path, len(parsed) - len(keep), step)  # fmt: skip
