"""Engines pin the threads that call an adapter (vLLM's CPU build binds each worker's
OpenMP threads, the calling thread included); threads inherit their creator's affinity.
``embresume.integrations._common.unpinned`` lets embresume's own threads run on every
core the process may use, and gives the calling thread its own binding back."""

from __future__ import annotations

import os
import threading

import pytest

from embresume.integrations._common import process_cpus, unpinned

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                reason="needs Linux thread affinity and at least 2 cores")


def _started_thread_cpus() -> set:
    seen = {}
    t = threading.Thread(target=lambda: seen.setdefault("cpus", os.sched_getaffinity(0)))
    t.start()
    t.join(10)
    return set(seen["cpus"])


def _run_pinned(fn):
    """Run ``fn`` on a fresh thread pinned to one core, as the engine pins its worker."""
    out = {}

    def body():
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        out["value"] = fn()
        out["after"] = os.sched_getaffinity(0)
    t = threading.Thread(target=body)
    t.start()
    t.join(30)
    return out


def test_a_pinned_thread_starts_threads_pinned_without_it():
    got = _run_pinned(_started_thread_cpus)
    assert len(got["value"]) == 1           # what happened to the connector's threads before


def test_threads_started_inside_unpinned_run_everywhere_and_the_caller_keeps_its_binding():
    def inside():
        with unpinned():
            return _started_thread_cpus()
    got = _run_pinned(inside)
    assert got["value"] == set(process_cpus()) and len(got["value"]) >= 2
    assert len(got["after"]) == 1           # the engine's binding of the calling thread is back


def test_unpinned_can_be_turned_off():
    def inside():
        with unpinned(False):
            return _started_thread_cpus()
    assert len(_run_pinned(inside)["value"]) == 1
