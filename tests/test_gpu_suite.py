"""bench/gpu_suite.sh in its dry run (every check on the CPU, tiny shapes): it runs every check and writes
its summary; the peer check is skipped without the scripts' folder."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_runs_every_check_and_writes_one_summary(tmp_path):
    out = tmp_path / "suite"
    bin_dir = str(Path(sys.executable).parent)  # `python` in the suite is this interpreter
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(Path.home()), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert {name: c["status"] for name, c in summary.items()} == {
        "model": "ok", "kernels": "ok", "probe": "ok", "optimizer": "ok", "peer": "skipped", "planner": "ok",
        "multiadapter": "ok"}
    kernels = json.loads((out / "kernels.json").read_text())
    assert {r["kernel"] for r in kernels["rows"]} == {"attention", "lora_linear", "kv_delta"}
    assert all(r["rel_error"] < 1e-3 for r in kernels["rows"])
    planner = json.loads((out / "planner.json").read_text())
    assert planner["ok"] and all(abs(r["ratio"] - 1) <= 0.10 for r in planner["rows"])
    # the final table, one row per adapter count: both sides' latents agree (its last column, max |diff|)
    tail = summary["multiadapter"]["tail"]
    header = next(i for i, line in enumerate(tail) if line.split()[:2] == ["N", "output"])
    rows = [line.split() for line in tail[header + 1:] if line.split() and line.split()[0].isdigit()]
    assert [r[:2] for r in rows] == [["1", "latent"], ["2", "latent"]], tail
    assert all(float(r[-1]) < 1e-3 for r in rows), tail


def test_an_unknown_argument_is_one_line_with_exit_status_2(tmp_path):
    run = subprocess.run(["bash", "bench/gpu_suite.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().startswith("error: unknown argument --bogus")
