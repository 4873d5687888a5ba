"""Kernel tests under the Triton interpreter run in a child pytest: TRITON_INTERPRET must be set before
Triton is first imported, which a test process shared with other test files cannot guarantee."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def run_interpreter_cases(test_file: str) -> None:
    """Run the `interp_case` tests of `test_file` with TRITON_INTERPRET=1; fail with the child's output."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "T2I_FAST_KERNELS": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider", "-k", "interp_case"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-6000:] + r.stderr[-2000:]
