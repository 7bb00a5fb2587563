"""The top-level ipc/ and kernels/ folders (installed as embresume.ipc and
embresume.kernels) are inert when imported under their bare names.

From the repository root (the current directory on the path), transformers
probes for Hugging Face's "kernels" package with ``import_module("kernels")``
and finds this repository's folder; it must find nothing usable there instead
of importing embresume (which fails where embresume is installed elsewhere)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_bare_kernels_and_ipc_define_nothing():
    r = run("import sys, kernels, ipc\n"
            "assert kernels.__all__ == [] and ipc.__all__ == [], (kernels.__all__, ipc.__all__)\n"
            "assert not hasattr(kernels, 'scatter_chunk') and not hasattr(ipc, 'ShmRing')\n"
            "assert not any(m == 'embresume' or m.startswith('embresume.') for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith('embresume'))\n"
            "import embresume.kernels, embresume.ipc\n"
            "assert callable(embresume.kernels.scatter_chunk) and embresume.ipc.ShmRing\n")
    assert r.returncode == 0, r.stderr


def test_transformers_kernels_probe_from_the_repository_root():
    pytest.importorskip("transformers")
    r = run("from transformers.utils.import_utils import is_kernels_available\n"
            "assert is_kernels_available() is False\n")
    assert r.returncode == 0, r.stderr
