"""The runtime's log, as runc writes it: stderr for people, `--log FILE` for engines.

containerd reads the last error from the log file when a runtime call fails, so with
`--log-format json` every record is one JSON object per line with `level`, `msg` and `time`
(logrus's keys); the text format is logrus's `time=... level=... msg=...`.
"""

from __future__ import annotations

import os
import sys

from . import _jsonfast as json
from ._state import rfc3339_now


class Log:
    """Where the runtime's messages go; one per CLI invocation."""

    __slots__ = ("debug_enabled", "fmt", "path")

    def __init__(self, path: str | None = None, fmt: str = "text", debug: bool = False) -> None:
        self.path = path
        self.fmt = fmt
        self.debug_enabled = debug

    def _write_file(self, level: str, msg: str) -> None:
        if not self.path:
            return
        if self.fmt == "json":
            line = json.dumps({"level": level, "msg": msg, "time": rfc3339_now()})
        else:
            line = f"time={json.dumps(rfc3339_now())} level={level} msg={json.dumps(msg)}"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
        except OSError as e:
            sys.stderr.write(f"corral: cannot write log {self.path}: {e.strerror}\n")

    def error(self, msg: str) -> None:
        sys.stderr.write(f"corral: {msg}\n")
        sys.stderr.flush()
        self._write_file("error", msg)

    def warning(self, msg: str) -> None:
        sys.stderr.write(f"corral: warning: {msg}\n")
        sys.stderr.flush()
        self._write_file("warning", msg)

    def debug(self, msg: str) -> None:
        if not self.debug_enabled:
            return
        if self.path:
            self._write_file("debug", msg)
        else:
            sys.stderr.write(f"corral: debug: {msg}\n")


NULL = Log()
