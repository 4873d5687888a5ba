"""What torchrun or accelerate launch told this process, read from the environment alone: no torch import, so
the command line can decide before it loads anything whether it runs under a launcher (distributed.py does
the rest)."""
from __future__ import annotations

import os


def launched_world() -> int:
    """The number of processes the launcher started (1 for a plain `python` or `t2i-fast` run)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launched_main() -> bool:
    """True unless the launcher made this process a rank other than 0 (readable before the group exists)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def local_main() -> bool:
    """True unless the launcher made this process other than the first one of its machine (LOCAL_RANK)."""
    return os.environ.get("LOCAL_RANK", "0").strip() in ("", "0")
