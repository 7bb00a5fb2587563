"""Command lines for the children the tests signal.

A process that ignores SIGINT (started under ``nohup``, by some CI runners)
passes SIG_IGN on to every child, across exec, and Python installs its
KeyboardInterrupt handler only where SIGINT is not ignored at start: a test
that sends SIGINT (a terminal's Ctrl-C) to a child it started would then
signal nothing.  :func:`sigint_default` puts SIGINT back to its default in
the child itself, right before the child's program starts (an exec: the pid,
the session and the pipes stay), so the pytest process's own signals are never
touched.
"""

from __future__ import annotations

import sys

_RESTORE = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
            "os.execv(sys.argv[1], sys.argv[1:])")


def sigint_default(argv: list[str]) -> list[str]:
    """``argv`` (its first item an executable's path) run with SIGINT's default disposition."""
    return [sys.executable, "-c", _RESTORE, *argv]
