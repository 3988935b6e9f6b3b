# SPDX-License-Identifier: Apache-2.0
"""Build script: the package metadata lives in pyproject.toml.

The compiled kernels of ``csrc/`` are not built yet; until they are, this file only
hands over to setuptools so that ``pip install -e .`` works from a fresh checkout.
"""
from setuptools import setup

setup()
