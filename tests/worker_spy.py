"""A spy on the functions that processes started by a launcher call (torchrun's ranks, Ray's workers): a
sitecustomize.py on their PYTHONPATH, which Python runs at every start, wraps each named function to log a
line per call, "LABEL RANK PID SEED" (RANK: the launcher's, or "-"; SEED: the call's seed keyword, or "-").
The processes inherit the folder and the log's path from the environment they are started with."""
from __future__ import annotations

import os
from pathlib import Path

SPY = '''
import importlib
import os
{prelude}

def _wrap(label, module, name):
    owner = importlib.import_module(module)
    real = getattr(owner, name)

    def spy(*args, **kw):
        with open(os.environ["T2I_FAST_TEST_SPY"], "a") as f:
            f.write(f"{{label}} {{os.environ.get('RANK', '-')}} {{os.getpid()}} {{kw.get('seed', '-')}}\\n")
        return real(*args, **kw)

    setattr(owner, name, spy)


for _label, _target in {calls!r}.items():
    _wrap(_label, *_target.rsplit(".", 1))
'''


def write_spy(tmp_path: Path, calls: dict[str, str], prelude: str = "") -> tuple[Path, Path]:
    """calls: {label: "package.module.function"}; prelude: code the processes run first. Returns the folder
    to put on the processes' PYTHONPATH and the log, which T2I_FAST_TEST_SPY must name in their environment."""
    folder = tmp_path / "spy"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(SPY.format(prelude=prelude, calls=calls))
    return folder, tmp_path / "calls.txt"


def spy_on_workers(monkeypatch, tmp_path: Path, calls: dict[str, str], prelude: str = "") -> Path:
    """write_spy for processes that inherit this one's environment (torchrun's): sets PYTHONPATH and
    T2I_FAST_TEST_SPY here for the test's duration. Returns the log."""
    folder, log = write_spy(tmp_path, calls, prelude)
    monkeypatch.setenv("T2I_FAST_TEST_SPY", str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    return log


def read_calls(log: Path) -> list[tuple[str, str, str, str]]:
    """The logged calls, each (label, rank, pid, seed), in the order they were made; [] where none was."""
    if not log.is_file():
        return []
    return [tuple(line.split()) for line in log.read_text().splitlines()]
