"""Helpers of the kernel tests. Tests under the Triton interpreter run in a child pytest: TRITON_INTERPRET must
be set before Triton is first imported, which a test process shared with other test files cannot guarantee."""
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


def check_vs_fp64(ours, twin, gold, names, floor: float) -> None:
    """Each output or gradient of a kernel (`ours`) is at most twice as far from the fp64 result (`gold`) as
    its plain PyTorch twin at the same dtype (`twin`), plus `floor` times gold's largest magnitude."""
    for name, o, t, g in zip(names, ours, twin, gold, strict=True):
        assert o.shape == g.shape and o.dtype == t.dtype, name
        err = (o.double() - g).abs().max().item()
        twin_err = (t.double() - g).abs().max().item()
        bound = 2 * twin_err + floor * g.abs().max().item()
        assert err <= bound, f"{name}: |ours - fp64| = {err:.3e} > {bound:.3e} (|twin - fp64| = {twin_err:.3e})"
