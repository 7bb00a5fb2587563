"""The package list, derived: every package under ``embresume/`` plus the three
top-level folders installed inside it (``ipc/`` -> ``embresume.ipc``,
``kernels/`` -> ``embresume.kernels``, ``bench/`` -> ``embresume.bench``) and
their subpackages.  A new subpackage (a folder with an ``__init__.py``) is in
the wheel without editing a list; tests/test_packaging.py builds the wheel and
checks that it holds every module of the source tree.  Everything else is in
pyproject.toml."""

from setuptools import find_packages, setup

#: installed name -> folder in the repository
MAPPED = {"embresume": "embresume", "embresume.ipc": "ipc", "embresume.kernels": "kernels",
          "embresume.bench": "bench"}

packages, package_dir = [], {}
for name, folder in MAPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
    package_dir[name] = folder

setup(packages=packages, package_dir=package_dir)
