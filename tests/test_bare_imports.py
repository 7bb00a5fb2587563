"""The top-level ipc/ and kernels/ folders (installed as embresume.ipc and
embresume.kernels) are inert when imported under their bare names.

From the repository root (the current directory on the path), transformers
probes for Hugging Face's "kernels" package (``find_spec("kernels")``, its
distribution's version, else ``import_module("kernels")``) and finds this
repository's folder first; it must find nothing usable there instead of
importing embresume (which fails where embresume is installed elsewhere), and
its answer must be the one it gives outside the repository: "not available"
without Hugging Face's package, whatever that package's presence says with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(code: str, cwd: Path = ROOT, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_bare_kernels_and_ipc_define_nothing():
    r = run("import sys, kernels, ipc\n"
            "assert kernels.__all__ == [] and ipc.__all__ == [], (kernels.__all__, ipc.__all__)\n"
            "assert not hasattr(kernels, 'scatter_chunk') and not hasattr(ipc, 'ShmRing')\n"
            "assert not any(m == 'embresume' or m.startswith('embresume.') for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith('embresume'))\n"
            "import embresume.kernels, embresume.ipc\n"
            "assert callable(embresume.kernels.scatter_chunk) and embresume.ipc.ShmRing\n")
    assert r.returncode == 0, r.stderr


PROBE = ("import importlib.util, json, sys\n"
         "from transformers.utils.import_utils import is_kernels_available\n"
         "spec = importlib.util.find_spec('kernels')\n"
         "print(json.dumps({'available': bool(is_kernels_available()), 'origin': spec and spec.origin,\n"
         "                  'embresume': sorted(m for m in sys.modules if m.split('.')[0] == 'embresume')}))\n")


def _probe(cwd: Path, env: Optional[dict] = None) -> dict:
    r = run(PROBE, cwd, env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _outside_env() -> dict:
    """This environment without the repository root on PYTHONPATH."""
    env = dict(os.environ)
    keep = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    env["PYTHONPATH"] = os.pathsep.join(keep)
    return env


def test_transformers_kernels_probe_from_the_repository_root(tmp_path):
    """The probe's answer never comes from the repository's kernels/ folder: from
    the root it is what it is from a directory without that folder on the path
    (False without Hugging Face's ``kernels``, whatever its version says with it),
    and what the probe found there, imported, is inert."""
    pytest.importorskip("transformers")
    outside = _probe(tmp_path, _outside_env())
    assert outside["origin"] is None or not Path(outside["origin"]).resolve().is_relative_to(ROOT), outside
    root = _probe(ROOT)
    assert not root["embresume"], f"the probe imported embresume from the repository root: {root['embresume']}"
    assert root["available"] == outside["available"], (
        f"from the repository root transformers' probe says kernels available={root['available']}, elsewhere "
        f"{outside['available']}: the answer comes from the repository's kernels/ ({root['origin']})")
    if root["origin"] and Path(root["origin"]).resolve().is_relative_to(ROOT):
        # what transformers imports when it uses the package: nothing usable, nothing of embresume
        r = run("import sys, kernels\n"
                "public = [n for n, v in vars(kernels).items() if not n.startswith('_') and callable(v)]\n"
                "assert kernels.__all__ == [] and not public, (kernels.__all__, public)\n"
                "assert not any(m.split('.')[0] == 'embresume' for m in sys.modules)\n")
        assert r.returncode == 0, r.stderr
