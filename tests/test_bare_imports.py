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

from conftest import FROM_CHECKOUT, child_env

ROOT = Path(__file__).resolve().parent.parent


def run(code: str, cwd: Path = ROOT, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    if env is None:
        # these children test the current directory on the path (where the suite tests an
        # installed wheel it sets PYTHONSAFEPATH, which keeps it off)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_bare_kernels_and_ipc_define_nothing():
    bare = ("import sys, kernels, ipc\n"
            "assert kernels.__all__ == [] and ipc.__all__ == [], (kernels.__all__, ipc.__all__)\n"
            "assert not hasattr(kernels, 'scatter_chunk') and not hasattr(ipc, 'ShmRing')\n"
            "assert not any(m == 'embresume' or m.startswith('embresume.') for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith('embresume'))\n")
    installed = ("import embresume.kernels, embresume.ipc\n"
                 "assert callable(embresume.kernels.scatter_chunk) and embresume.ipc.ShmRing\n")
    if FROM_CHECKOUT:
        r = run(bare + installed)
    else:
        # from the root the checkout's embresume/ would be imported, not the installed one
        r = run(bare)
        assert r.returncode == 0, r.stderr
        r = run(installed, cwd=ROOT.parent, env=child_env())
    assert r.returncode == 0, r.stderr


def test_bare_kernels_is_hugging_faces_package_where_that_is_installed(tmp_path):
    """Where another "kernels" package is on the path, a bare ``import kernels``
    from the repository root gets it (transformers then uses the real one),
    not the repository's folder."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text('__version__ = "9.9"\n\n\ndef get_kernel(name):\n    return name\n')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    env["PYTHONPATH"] = str(tmp_path)
    r = run("import sys, kernels\n"
            "assert sys.modules['kernels'] is kernels and kernels.get_kernel('x') == 'x'\n"
            "print(kernels.__file__)\n", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "kernels" / "__init__.py")


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
