"""The install a new user gets: from the repository root, the PyPI package `kernels` (pulled in by recent
transformers, and in our dev extra so these tests never skip) keeps its import name, diffusers imports,
and our ops import as t2i_fast.kernels; a built wheel serves them from its own files."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHECK_IMPORTS = """
import importlib.metadata, pathlib, sys
import kernels
repo = pathlib.Path(sys.argv[1]).resolve()
where = pathlib.Path(kernels.__file__).resolve()
assert repo / "kernels" not in where.parents, f"'kernels' was imported from our folder: {where}"
assert importlib.metadata.version("kernels")
from diffusers import StableDiffusionPipeline
import t2i_fast.kernels as ops
assert callable(ops.attention) and callable(ops.lora_linear) and callable(ops.kv_delta), ops
print(pathlib.Path(sys.modules["t2i_fast.kernels.attention"].__file__).resolve())
"""


def _python(args: list[str], cwd: Path, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_pypi_kernels_is_installed_for_this_test():
    import importlib.metadata

    assert importlib.metadata.version("kernels")  # the dev extra's; without it the next test proves nothing


def test_repo_root_imports_diffusers_and_our_kernels():
    # `python -c` puts the current directory first on sys.path: the case pytest and bench/ share
    result = _python(["-c", CHECK_IMPORTS, str(REPO)], cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.strip().splitlines()[-1]) == REPO / "kernels" / "attention.py"


def test_no_top_level_regular_package_named_kernels():
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert not (REPO / "kernels.py").exists()


def test_wheel_serves_the_ops_from_its_own_files(tmp_path):
    # pip builds in the source tree (build/): build from a copy, so the checkout stays as it was
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    wheels = tmp_path / "wheels"
    env_native_off = {**os.environ, "T2I_FAST_BUILD_NATIVE": "0"}  # the extension is not what this checks
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                            "-w", str(wheels), str(src)], cwd=tmp_path, env=env_native_off,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("t2i_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"t2i_fast/kernels.py", "t2i_fast/kernels/attention.py", "t2i_fast/kernels/_dispatch.py"} <= names
    assert "kernels/__init__.py" not in names and not any(n.startswith("kernels/") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # from an unrelated folder, with the wheel's files first on the path (ahead of the editable install)
    result = _python(["-c", CHECK_IMPORTS, str(REPO)], cwd=tmp_path, extra_path=str(site))
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.strip().splitlines()[-1]) == (site / "t2i_fast" / "kernels" / "attention.py").resolve()
