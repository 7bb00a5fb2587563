"""The endpoint classes stay I/O shells: small, and out of their room machines' records.

Each endpoint class is the I/O shell around its room machine (docs/design.md,
"Room state machines"): what is not I/O lives in the machine
(embresume/rooms/), the handshakes (embresume/handshake/) or a small module
of its own.  These checks keep it that way: a shell class that grows past
500 lines, or that writes into the machine's records, fails here.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import embresume
from embresume.rooms.language import Req

PKG = Path(embresume.__file__).parent
LIMIT = 500


def _class(path: Path, name: str) -> ast.ClassDef:
    tree = ast.parse(path.read_text())
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


@pytest.mark.parametrize("module, name", [("language.py", "LanguageEndpoint"), ("encoder.py", "EncoderEndpoint")])
def test_each_endpoint_class_is_under_500_lines(module, name):
    cls = _class(PKG / module, name)
    lines = cls.end_lineno - cls.lineno + 1         # from `class X` to its last statement
    assert lines < LIMIT, (f"{name} is {lines} lines: move what is not I/O out of the shell (into the room "
                           f"machine, the handshakes, or a small module of its own) rather than cramming lines")


def test_the_language_machines_record_holds_no_shell_state():
    """Merge buffer, result and latch are the shell's (embresume.shell_rooms), not the machine's record's."""
    assert not {"merge", "result", "event", "latch"} & set(Req.__slots__)


def _req_writes(tree: ast.AST) -> list:
    """Assignments and deletions, in the shell, on a machine record (``req.x = ...``,
    ``a.req.x = ...``) or on the machine's request table."""
    bad = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for t in targets:
            if isinstance(t, ast.Attribute):
                base = t.value
                if (isinstance(base, ast.Name) and base.id == "req") or \
                        (isinstance(base, ast.Attribute) and base.attr == "req"):
                    bad.append(ast.unparse(t))
            if isinstance(t, ast.Subscript) and "reqs" in ast.unparse(t.value):
                bad.append(ast.unparse(t))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("pop", "clear") \
                and "_rooms.reqs" in ast.unparse(node.func.value):
            bad.append(ast.unparse(node))
    return bad


def test_the_language_shell_never_writes_a_machine_record():
    cls = _class(PKG / "language.py", "LanguageEndpoint")
    assert _req_writes(cls) == []


def test_the_encoder_writer_reads_no_room_state_outside_the_lock():
    """The writing thread reads what the Write action hands it (``seq``, ``ended``), never the room's tracker."""
    from embresume.encoder import EncoderEndpoint
    src = inspect.getsource(EncoderEndpoint._write)
    assert "tracker" not in src and ".chunks" not in src
