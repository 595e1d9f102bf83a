"""Where training progress goes (issue 4, part 8): JSONL always, TensorBoard when installed, a tqdm bar on rank 0.

Only the main process writes; the others get a logger whose methods do nothing, so call sites need no checks.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = None
        self.tb = None
        if not enabled:
            return
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


def read_metrics(run_dir: str | Path, kind: str | None = "train") -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (of one kind, or all with ``kind=None``)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]
