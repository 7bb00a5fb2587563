"""Request statuses and the table of allowed transitions.

    small:  Bootstrapping -> WaitingForInput -> Success
    large:  Bootstrapping -> WaitingForInput -> Transferring (-> Transferring ...) -> Success
    any non-terminal -> Failed

Transferring -> Transferring is allowed: a request may be resumed any number
of times.  Success and Failed are terminal.
"""

from __future__ import annotations

import enum

from .errors import EmbResumeError


class Status(enum.IntEnum):
    # numeric values follow the KVPoll convention of SGLang-style engines
    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4

    @property
    def terminal(self) -> bool:
        return self in (Status.Success, Status.Failed)

    def __str__(self) -> str:               # print(lang.poll(room)) -> "Success", not "4"
        return self.name

    def __format__(self, spec: str) -> str:  # f"{status}" too; a numeric spec ("d") formats the value
        return self.name if not spec else format(int(self), spec)


ALLOWED: dict[Status, frozenset[Status]] = {
    Status.Bootstrapping: frozenset({Status.WaitingForInput, Status.Failed}),
    Status.WaitingForInput: frozenset({Status.Transferring, Status.Success, Status.Failed}),
    Status.Transferring: frozenset({Status.Transferring, Status.Success, Status.Failed}),
    Status.Success: frozenset(),
    Status.Failed: frozenset(),
}


class InvalidTransition(EmbResumeError, RuntimeError):
    def __init__(self, old: Status, new: Status):
        super().__init__(f"status transition {old.name} -> {new.name} is not allowed")
        self.old, self.new = old, new


def check_transition(old: Status, new: Status) -> None:
    if new not in ALLOWED[old]:
        raise InvalidTransition(old, new)


class StatusTracker:
    """Status of one request with its full history (for tests and logs)."""

    __slots__ = ("status", "history")

    def __init__(self, initial: Status = Status.Bootstrapping):
        self.status = initial
        self.history = [initial]

    def set(self, new: Status) -> None:
        check_transition(self.status, new)
        self.status = new
        self.history.append(new)

    def fail(self) -> bool:
        """Move to Failed unless already terminal; returns whether it moved."""
        if self.status.terminal:
            return False
        self.set(Status.Failed)
        return True
