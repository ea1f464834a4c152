"""Typed errors for mistakes a user can fix, and the debug switch.

Library code raises a ``UserError`` subclass whose message says what is wrong and what to change;
entry points (``molm_ds.cli.run``) turn it into one line ``error: <message>`` on stderr and exit code
2, with no traceback. Anything else is a bug and keeps its traceback. ``MOLM_DS_DEBUG=1`` shows the
traceback of a user error too, and turns on the value checks that read tensor contents (they force
a host sync, so they are off in the training step by default).
"""

from __future__ import annotations

import os

__all__ = ["UserError", "ConfigError", "CheckpointError", "DataError", "debug_enabled", "one_line"]


class UserError(Exception):
    """A mistake in what the user asked for (config, paths, data); the message says what to change."""


class ConfigError(UserError, ValueError):
    """A job file, ds_config, override or command-line value that cannot run as given."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, partial or does not fit the job."""


class DataError(UserError, ValueError):
    """Input data or a shard directory that cannot be used as given."""


def debug_enabled() -> bool:
    """``MOLM_DS_DEBUG=1``: tracebacks for user errors and value checks on tensors (host syncs)."""
    return os.environ.get("MOLM_DS_DEBUG", "0") not in ("", "0")


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (multi-line messages joined with '; ')."""
    parts = [p.strip() for p in str(exc).splitlines() if p.strip()]
    return "; ".join(parts) or type(exc).__name__
