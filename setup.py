"""Packaging glue that pyproject.toml cannot express.

- kernels/ (the op modules, deliberately without __init__.py) is copied to t2i_fast/kernels/, the folder
  whose modules the package module t2i_fast/kernels.py serves. The import name "kernels" belongs to a PyPI
  package that recent transformers installs; a regular package of that name at the repository root would
  shadow it (see t2i_fast/kernels.py).
- csrc/ holds the optional native extension t2i_fast._C (the CPU 8-bit AdamW). It is built with
  torch.utils.cpp_extension only where torch is importable at build time and a C++ compiler works;
  otherwise, or if the build fails, the install goes on without it and the package uses the PyTorch
  twins. Build against the torch you run with: `pip install --no-build-isolation -e .` (build isolation
  would download a separate multi-GB torch just to compile against).

Environment:
  T2I_FAST_BUILD_NATIVE=0    skip the extension
  T2I_FAST_CPU_ARCH=native   -march value (default "native" when the compiler accepts it; set it to a
                             portable value such as x86-64-v2, or to "" for none, when building a wheel
                             for other machines)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

NATIVE_SOURCES = ["csrc/adamw8bit.cpp"]


def _say(msg: str) -> None:
    print(f"t2i_fast setup: {msg}", file=sys.stderr)


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx.split()[0]) if cxx else None
    return cxx if path else None


def _accepts(cxx: str, flags: list[str]) -> bool:
    """True when `cxx` compiles and links an empty OpenMP program with these flags."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            r = subprocess.run([*cxx.split(), *flags, src, "-o", os.path.join(d, "t")],
                               capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


def _native_extension():
    """(ext_modules, cmdclass) for t2i_fast._C, or ([], {}) when it cannot be built here."""
    if os.environ.get("T2I_FAST_BUILD_NATIVE", "1") == "0":
        _say("T2I_FAST_BUILD_NATIVE=0: skipping the native extension")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # noqa: BLE001 - torch missing or broken at build time
        _say(f"torch is not importable at build time ({e}); skipping the native extension "
             "(install with `pip install --no-build-isolation -e .` to build it)")
        return [], {}
    cxx = _compiler()
    if cxx is None or not _accepts(cxx, ["-fopenmp"]):
        _say("no working C++ compiler with OpenMP found; skipping the native extension")
        return [], {}
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
    arch = os.environ.get("T2I_FAST_CPU_ARCH", "native")
    if arch and _accepts(cxx, ["-fopenmp", f"-march={arch}"]):
        flags.append(f"-march={arch}")
    ext = CppExtension("t2i_fast._C", NATIVE_SOURCES, extra_compile_args={"cxx": flags},
                       extra_link_args=["-fopenmp"])

    class OptionalBuildExtension(BuildExtension):
        """A failed native build is reported and skipped; it never fails the install."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001
                _say(f"building the native extension failed ({e}); the PyTorch twins will be used")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                _say(f"building {ext.name} failed ({e}); the PyTorch twins will be used")

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = _native_extension()

setup(
    packages=sorted(set(find_packages(include=["t2i_fast", "t2i_fast.*"]))
                    | {"t2i_fast.methods", "t2i_fast.nn", "t2i_fast.toy"}) + ["t2i_fast.kernels"],
    package_dir={"t2i_fast": "t2i_fast", "t2i_fast.kernels": "kernels"},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
