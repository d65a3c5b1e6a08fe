"""Logging set-up from the reference's flags (klog ``--v``, controller-runtime ``--zap-*``) or ours.

Levels: ``--zap-log-level`` (debug, info, error, panic, or a verbosity N), else ``--log-level``,
else ``--v`` N (the reference's default 2). A verbosity of 4 (the reference's DEBUG) or more logs
at DEBUG, below it at INFO. ``--zap-devel`` means debug level and console output, as in
controller-runtime. ``--zap-encoder json`` writes one JSON object per line with zap's keys
(``level``, ``ts``, ``logger``, ``msg``, and ``error`` with the traceback); ``--zap-time-encoding``
chooses the time format (epoch seconds by default for JSON, ISO 8601 for the console).
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson

DEBUG_VERBOSITY = 4  # the reference's logutil.DEBUG
DEFAULT_VERBOSITY = 2  # the reference's logutil.DEFAULT
ZAP_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR,
              "dpanic": logging.CRITICAL, "panic": logging.CRITICAL, "fatal": logging.CRITICAL}
TIME_ENCODINGS = ("epoch", "millis", "nano", "iso8601", "rfc3339", "rfc3339nano")
_ZAP_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error",
              logging.CRITICAL: "panic"}


def verbosity_level(v: int) -> int:
    return logging.DEBUG if v >= DEBUG_VERBOSITY else logging.INFO


def level_of(zap_log_level: str | None, log_level: str | None, v: int | None) -> int:
    """The Python level the flags ask for; ValueError naming the flag for a bad value."""
    if zap_log_level is not None:
        text = zap_log_level.strip().lower()
        if text in ZAP_LEVELS:
            return ZAP_LEVELS[text]
        if text.isdigit() and int(text) > 0:
            return verbosity_level(int(text))
        raise ValueError(f"--zap-log-level: expected debug, info, error, panic or a number > 0, got {zap_log_level!r}")
    if log_level is not None:
        level = logging.getLevelName(log_level.strip().upper())
        if not isinstance(level, int):
            raise ValueError(f"--log-level: expected debug, info, warning or error, got {log_level!r}")
        return level
    return verbosity_level(DEFAULT_VERBOSITY if v is None else v)


def _timestamp(created: float, encoding: str) -> str | float | int:
    if encoding == "epoch":
        return created
    if encoding == "millis":
        return created * 1000.0
    if encoding == "nano":
        return int(created * 1e9)
    stamp = datetime.fromtimestamp(created, UTC)
    if encoding == "rfc3339":
        return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
    if encoding == "rfc3339nano":
        return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"  # iso8601


class JsonFormatter(logging.Formatter):
    """One zap-style JSON object per record."""

    def __init__(self, time_encoding: str = "epoch") -> None:
        super().__init__()
        self.time_encoding = time_encoding

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {"level": _ZAP_NAMES.get(record.levelno, record.levelname.lower()),
                                    "ts": _timestamp(record.created, self.time_encoding), "logger": record.name,
                                    "caller": f"{record.module}.py:{record.lineno}", "msg": record.getMessage()}
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class ConsoleFormatter(logging.Formatter):
    def __init__(self, time_encoding: str = "iso8601") -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.time_encoding = time_encoding

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return str(_timestamp(record.created, self.time_encoding))


def configure(level: int, encoder: str = "console", time_encoding: str | None = None) -> None:
    """Route the root logger to stderr with the chosen format (replacing earlier handlers)."""
    if encoder not in ("console", "json"):
        raise ValueError(f"--zap-encoder: expected json or console, got {encoder!r}")
    if time_encoding is not None and time_encoding not in TIME_ENCODINGS:
        raise ValueError(f"--zap-time-encoding: expected one of {', '.join(TIME_ENCODINGS)}, got {time_encoding!r}")
    handler = logging.StreamHandler(sys.stderr)
    if encoder == "json":
        handler.setFormatter(JsonFormatter(time_encoding or "epoch"))
    else:
        handler.setFormatter(ConsoleFormatter(time_encoding or "iso8601"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
