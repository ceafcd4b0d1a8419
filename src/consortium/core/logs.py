"""Process logging: every long-running process logs to a file whose path it prints."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from consortium.core.config import default_log_dir


def setup_logging(role: str, log_file: Path | None, port: int = 0) -> Path:
    path = Path(log_file) if log_file else default_log_dir() / f"{role}-{port or f'pid{os.getpid()}'}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    return path.resolve()
