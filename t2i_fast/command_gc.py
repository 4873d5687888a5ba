"""Python's cyclic garbage collector in a `t2i-fast` process. The command line only: the library never changes
the collector of a process that imports it.

A command imports torch, diffusers and transformers: some 450,000 objects that live as long as the process.
CPython's collector walks every one of them on each full collection. A full collection comes whenever the
long-lived objects have grown by a quarter, so the imports alone bring several, and the interpreter runs one
more at exit. In the main job (`t2i-fast train`) on one core, the collector ran 0.86 s while the command ran
and the exit took 1.14 s more; with the changes below, 0.19 s and 0.18 s, and the whole command 0.85x the time
(`python bench/bench_command.py --rounds 6`, medians of 6 alternated rounds).

Both changes concern objects that are not garbage:
- a full collection waits for 100 collections of the middle generation instead of 10 (the third value of
  gc.set_threshold). The young generations are collected as before, so a short-lived cycle is freed as
  before; a long-lived one is freed later, not never.
- at exit, whatever is still alive is frozen (gc.freeze), so the interpreter's last collection skips it.
  Atexit handlers still run and every stream is still flushed; every file a command writes is closed by then.

T2I_FAST_GC=plain leaves the collector as Python sets it: the plain twin, which the benchmark compares against.
"""
from __future__ import annotations

import gc
import os

FULL_COLLECTION_EVERY = 100  # middle-generation collections per full one (CPython's default: 10)


def tuned() -> bool:
    """Whether this process tunes the collector (T2I_FAST_GC=plain switches it off)."""
    return os.environ.get("T2I_FAST_GC", "").strip().lower() != "plain"


def for_a_command() -> None:
    """Called once when a `t2i-fast` process starts: rarer full collections."""
    if tuned():
        young, middle, full = gc.get_threshold()
        gc.set_threshold(young, middle, max(full, FULL_COLLECTION_EVERY))


def before_exit() -> None:
    """Called once the command has finished: the exit's collection skips everything alive now."""
    if tuned():
        gc.freeze()
