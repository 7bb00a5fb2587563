"""What users install: the wheel built from this source tree holds every
module of it (a subpackage forgotten by the package list fails here, where an
editable install would hide it), a new subpackage is picked up without
editing a list, the version has one source, and an editable install is not
shadowed by a folder named ``embresume`` in the current directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import embresume

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
#: the design's layout: folder in the repository -> the package it is installed as
LAYOUT = {"embresume": "embresume", "ipc": "embresume.ipc", "kernels": "embresume.kernels",
          "bench": "embresume.bench"}
_SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
                               ".pytest_cache", "bench-results")


def _child_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONSAFEPATH", None)      # these children test what the current directory does
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the source tree (building writes build/ and *.egg-info into it)."""
    pytest.importorskip("build", reason="the 'test' extra's build package is needed to build the wheel")
    src = tmp_path_factory.mktemp("pkg") / "src"
    shutil.copytree(REPO, src, ignore=_SKIP)
    return src


def build_wheel(src: Path, out: Path) -> Path:
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"wheel build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    (wheel,) = out.glob("embresume-*.whl")
    return wheel


def expected_modules(src: Path) -> set[str]:
    """The wheel path of every module in the source tree's packaged folders."""
    out = set()
    for folder, package in LAYOUT.items():
        for path in (src / folder).rglob("*.py"):
            rel = path.relative_to(src / folder)
            out.add("/".join([*package.split("."), *rel.parts]))
    return out


def missing_from_wheel(src: Path, wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    return sorted(expected_modules(src) - names)


def test_wheel_holds_every_module_of_the_source_tree(source, tmp_path):
    wheel = build_wheel(source, tmp_path / "dist")
    missing = missing_from_wheel(source, wheel)
    assert not missing, f"the wheel {wheel.name} lacks {len(missing)} module(s) of the source tree: {missing}"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert not any(n.startswith(("tests/", "tools/", "examples/", "ipc/", "kernels/", "bench/")) for n in names)
    assert f"Version: {embresume.__version__}" in meta.splitlines(), "the wheel and embresume.__version__ differ"
    assert "embresume = embresume.cli:main" in entry_points


def test_a_new_subpackage_is_in_the_wheel_without_editing_a_list(source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source, src, ignore=_SKIP)
    for folder in ("embresume/newpart", "ipc/newpart"):
        (src / folder).mkdir()
        (src / folder / "__init__.py").write_text('"""added by the test"""\n')
        (src / folder / "mod.py").write_text("X = 1\n")
    wheel = build_wheel(src, tmp_path / "dist")
    assert missing_from_wheel(src, wheel) == []
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {"embresume/newpart/mod.py", "embresume/ipc/newpart/mod.py"} <= names


def test_one_version():
    from importlib.metadata import version
    assert embresume.__version__ == version("embresume")
    r = subprocess.run([sys.executable, "-m", "embresume", "--version"], capture_output=True, text=True,
                       timeout=120, cwd=str(REPO.parent), env=dict(_child_env(), PYTHONSAFEPATH="1"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"embresume {embresume.__version__}"
    text = (REPO / "embresume" / "__init__.py").read_text()
    assert '__version__ = "' not in text            # no second copy of the number


def test_editable_install_is_not_shadowed_by_a_folder_named_embresume(source, tmp_path):
    """``git clone`` leaves a folder ``embresume`` in the directory it was run
    in; from there, the editable install's names must still resolve to the
    checkout (setuptools' own hook comes after the path finder, which would
    take that folder as a namespace package)."""
    out = tmp_path / "editable"
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'tools'); import embresume_backend as b; "
                        f"print(b.build_editable({str(out)!r}))"],
                       cwd=str(source), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"editable build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    site = tmp_path / "site"
    with zipfile.ZipFile(out / r.stdout.strip().splitlines()[-1]) as z:
        z.extractall(site)
    parent = tmp_path / "parent"
    (parent / "embresume").mkdir(parents=True)     # the clone, seen from its parent
    (parent / "embresume" / "README.md").write_text("a clone\n")
    # the interpreter's own embresume (this checkout's editable hook, or the installed wheel) is set
    # aside: the child sees the editable install under test only, its .pth line run as site.py runs it
    code = ("import glob, os, sys\n"
            "sys.meta_path[:] = [m for m in sys.meta_path if 'embresume' not in getattr(m, '__module__', '')]\n"
            "[sys.modules.pop(k) for k in list(sys.modules) if k.startswith('__editable___embresume')]\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "exec(open(glob.glob(os.path.join(sys.argv[1], '__editable__.*.pth'))[0]).read())\n"
            "import runpy; from embresume import Config, LanguageEndpoint\n"
            "import embresume, embresume.ipc, embresume.kernels, embresume.bench\n"
            "print(embresume.__file__); print(embresume.ipc.__file__)\n"
            "sys.argv = ['embresume', '--version']; runpy.run_module('embresume', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code, str(site)], cwd=str(parent), capture_output=True, text=True,
                       timeout=120, env=_child_env())
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == str(source / "embresume" / "__init__.py")
    assert lines[1] == str(source / "ipc" / "__init__.py")
    assert lines[2].startswith("embresume ")
