"""The package list, the one thing pyproject.toml cannot say: every ``ketanode*`` package
found in ``ketanode/`` plus ``ketanode.migrations``, the Alembic scripts that live in
``migrations/`` at the top of the repository ([tool.setuptools.package-dir] maps them).
Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["ketanode", "ketanode.*"]), "ketanode.migrations"])
