"""Packaging glue (the metadata is in pyproject.toml).

The project's four folders (``model/``, ``training/``, ``service/``, ``proto/``) install as
sub-packages of one import root, ``ditepose``, whose own modules (the root CLI) live in
``ditepose/``. The installed distribution thus claims exactly one top-level name, and a
user's ``model.py`` or ``service.py`` can neither shadow nor be shadowed by ours. The package
list is derived from the folders (namespace packages included, so data folders such as
``service/http/static`` ship with their files), so a new sub-package cannot be left out of the wheel.
"""

from setuptools import find_namespace_packages, setup

ROOTS = ("model", "training", "service", "proto")

setup(
    packages=["ditepose"] + [
        f"ditepose.{name}"
        for name in find_namespace_packages(include=[f"{r}*" for r in ROOTS], exclude=["*__pycache__*"])
    ],
    package_dir={"ditepose": "ditepose", **{f"ditepose.{root}": root for root in ROOTS}},
)
