"""Checkpoints: `checkpoints/step_N/` in the run directory, written atomically.

A checkpoint is the learner's files (PEFT adapter + `learner_state.pt`: optimizer, scheduler,
RNG, weight version) and the driver's state (`driver_state.json`: step, data position,
rollout sampling counter). It is written into a hidden temporary folder and renamed into
place, so a half-written checkpoint is never picked up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

DRIVER_STATE = "driver_state.json"
_PREFIX = "step_"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, files: dict[str, bytes], driver_state: dict[str, Any], total_limit: int = 0) -> Path:
    """Write step `step` atomically, then keep only the newest `total_limit` (0: keep all)."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"{_PREFIX}{step}", root / f".tmp-{_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, data in {**files, DRIVER_STATE: json.dumps(driver_state).encode()}.items():
        with open(tmp / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    if total_limit > 0:
        for old in list_checkpoints(run_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    found = [p for p in root.glob(f"{_PREFIX}*") if p.name[len(_PREFIX) :].isdigit() and (p / DRIVER_STATE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def load_checkpoint(path: Path) -> tuple[dict[str, bytes], dict[str, Any]]:
    """(learner files, driver state) of a checkpoint folder."""
    path = Path(path)
    driver_state = json.loads((path / DRIVER_STATE).read_text())
    files = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and p.name != DRIVER_STATE}
    return files, driver_state


def find_resume_point(output_dir: Path, run_name: str | None, resume: str) -> tuple[Path | None, Path | None]:
    """(run dir to continue, checkpoint to load) for `resume` = auto | a checkpoint path.

    auto continues the named run (logging.run_name) or, without a name, the newest run under
    logging.output_dir that has a checkpoint; with nothing to continue it starts afresh.
    """
    if resume != "auto":
        path = Path(resume)
        if not (path / DRIVER_STATE).exists():
            raise FileNotFoundError(f"resume={resume!r} is not a complete checkpoint folder (no {DRIVER_STATE})")
        return path.parent.parent, path
    output_dir = Path(output_dir)
    runs = [output_dir / run_name] if run_name else sorted(output_dir.glob("*"), key=lambda p: p.stat().st_mtime)
    for run_dir in reversed(runs):
        checkpoints = list_checkpoints(run_dir) if run_dir.is_dir() else []
        if checkpoints:
            return run_dir, checkpoints[-1]
    return None, None
