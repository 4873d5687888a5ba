"""The `t2i-fast` process tunes Python's garbage collector (command_gc.py); the library and cli.main, which run
inside a caller's process, leave it alone."""
import gc
import os
import subprocess
import sys

from t2i_fast import cli, command_gc

PROBE = ("import gc, sys; from t2i_fast import cli; before = gc.get_threshold()[2]; code = cli.console([]); "
         "print('GC', before, gc.get_threshold()[2], gc.get_freeze_count(), code)")


def _console_in_a_process(setting: str) -> list[int]:
    env = {**os.environ, "T2I_FAST_GC": setting}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("GC ")][-1]
    return [int(x) for x in line.split()[1:]]


def test_the_command_collects_fully_less_often_and_freezes_before_exit():
    before, after, frozen, code = _console_in_a_process("")
    assert code == 0  # no command: the help, as main() gives it
    assert after == max(before, command_gc.FULL_COLLECTION_EVERY) > before  # CPython's default is 10
    assert frozen > 10_000  # the imported modules' objects, skipped by the exit's collection


def test_plain_leaves_the_collector_as_python_sets_it():
    before, after, frozen, code = _console_in_a_process("plain")
    assert code == 0 and after == before and frozen == 0


def test_main_inside_a_callers_process_changes_nothing(capsys):
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    assert cli.main([]) == 0
    assert "train" in capsys.readouterr().out
    assert gc.get_threshold() == threshold and gc.get_freeze_count() == frozen
