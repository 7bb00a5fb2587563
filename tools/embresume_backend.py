"""The build backend: setuptools' own (``setuptools.build_meta``), with one fix
to its editable install.

Why: the repository installs three top-level folders inside the package
(``ipc/`` as ``embresume.ipc``, ``kernels/`` and ``bench/`` likewise), so
setuptools' editable install cannot be a plain path entry; it installs an
import hook (``__editable___embresume_*_finder``) instead, and appends that
hook to ``sys.meta_path``, *after* Python's own path finder.  Any folder named
``embresume`` in the current directory (the clone itself, seen from its
parent directory) then wins: the path finder takes it as a namespace package
before the hook is asked, and ``from embresume import Config`` fails with
"cannot import name 'Config' from 'embresume' (unknown location)".

The fix: the editable wheel's ``.pth`` line installs the hook as before and
then moves it in front of the path finder, so that the names it maps
(``embresume`` and the three folders) always resolve to this checkout.  It
answers for those names only, so nothing else is affected.  A regular
(non-editable) wheel is setuptools' own, untouched: there ``embresume`` is a
regular package in site-packages, which a namespace folder never shadows.

tests/test_packaging.py builds an editable wheel with this backend and
imports from a directory holding an ``embresume`` folder.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import zipfile

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every other hook is setuptools' own)

#: the import line setuptools writes into the editable wheel's .pth
_INSTALL = re.compile(rb"^import (__editable___[A-Za-z0-9_]+_finder); \1\.install\(\)\s*$")


def first_line(finder: str) -> str:
    """The .pth line: install ``finder``'s hook, then put it before the path finder."""
    return (f"import sys, {finder} as _f; _f.install(); _h = _f._EditableFinder; "
            "sys.meta_path.remove(_h) if _h in sys.meta_path else None; "
            "sys.meta_path.insert(next((i for i, m in enumerate(sys.meta_path) "
            "if getattr(m, '__name__', '') == 'PathFinder'), len(sys.meta_path)), _h)\n")


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def put_finder_first(wheel_path: str) -> bool:
    """Rewrite the editable wheel's ``__editable__.*.pth`` (and its RECORD
    line) so that the hook goes first.  False, and the wheel untouched, when
    the wheel has no such line (setuptools chose a plain path entry)."""
    with zipfile.ZipFile(wheel_path) as z:
        entries = [(info, z.read(info.filename)) for info in z.infolist()]
    pth = [(info, data) for info, data in entries
           if info.filename.startswith("__editable__.") and info.filename.endswith(".pth")
           and _INSTALL.match(data)]
    if len(pth) != 1:
        return False
    pth_info, pth_data = pth[0]
    new = first_line(_INSTALL.match(pth_data).group(1).decode()).encode()
    out = []
    for info, data in entries:
        if info.filename == pth_info.filename:
            data = new
        elif info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            lines = [f"{pth_info.filename},{_record_hash(new)},{len(new)}"
                     if ln.split(",", 1)[0] == pth_info.filename else ln for ln in lines]
            data = ("\n".join(lines) + "\n").encode()
        out.append((info, data))
    tmp = wheel_path + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for info, data in out:
            z.writestr(info, data)
    os.replace(tmp, wheel_path)
    return True


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    put_finder_first(os.path.join(wheel_directory, name))
    return name
