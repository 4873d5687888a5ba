"""The `t2i-fast` process tunes Python's garbage collector and skips the interpreter's teardown
(command_gc.py); the library and cli.main, which run inside a caller's process, leave both alone."""
import gc
import os
import subprocess
import sys

from t2i_fast import cli, command_gc

# an atexit handler registered before the command: it must still run, after the command's own output
PROBE = """
import atexit, gc, sys
before = gc.get_threshold()[2]
atexit.register(lambda: print("AFTER", before, gc.get_threshold()[2]))
import triton  # its bindings check for leaked objects at teardown, and say so on stderr
from t2i_fast import cli
sys.exit(cli.console([]))
"""


def _console_in_a_process(setting: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "T2I_FAST_GC": setting}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def _thresholds(out: subprocess.CompletedProcess) -> list[int]:
    lines = out.stdout.splitlines()
    assert lines[-1].startswith("AFTER ") and "train" in out.stdout  # the help (buffered: a pipe), then the handler
    return [int(x) for x in lines[-1].split()[1:]]


def test_the_command_collects_fully_less_often_and_exits_with_handlers_run_and_output_flushed():
    out = _console_in_a_process("")
    before, after = _thresholds(out)
    assert after == max(before, command_gc.FULL_COLLECTION_EVERY) > before  # CPython's default is 10
    assert "leaked" not in out.stderr  # no teardown: Triton's leak check has nothing to say


def test_plain_leaves_the_collector_and_the_exit_as_python_has_them():
    before, after = _thresholds(_console_in_a_process("plain"))
    assert after == before


def test_main_inside_a_callers_process_changes_nothing(capsys):
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    assert cli.main([]) == 0
    assert "train" in capsys.readouterr().out
    assert gc.get_threshold() == threshold and gc.get_freeze_count() == frozen
