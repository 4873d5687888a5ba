"""Python's cyclic garbage collector in a `t2i-fast` process. The command line only: the library never changes
the collector of a process that imports it.

A command imports torch, diffusers and transformers: some 450,000 objects that live as long as the process.
CPython's collector walks every one of them on each full collection. A full collection comes whenever the
long-lived objects have grown by a quarter, so the imports alone bring several, and the interpreter runs one
more at exit. In the main job (`t2i-fast train`) on one core, the collector ran 0.92 s while the command ran
and the exit took 1.13 s more; with the changes below, 0.19 s and 0.04 s, and the whole command 0.84x the time
(`python bench/bench_command.py --rounds 6`, medians of 6 alternated rounds).

Both changes concern objects that are not garbage:
- a full collection waits for 100 collections of the middle generation instead of 10 (the third value of
  gc.set_threshold). The young generations are collected as before, so a short-lived cycle is freed as
  before; a long-lived one is freed later, not never.
- once the command has succeeded, the process ends there (os._exit) instead of tearing the interpreter down,
  after doing what a normal exit does for the outside world: other non-daemon threads are joined, atexit
  handlers run, and stdout and stderr are flushed. Every file a command writes is closed by then. (Freezing
  the objects, gc.freeze, so that the last collection skips them, saves nearly as much but leaves Triton's
  objects alive at its teardown, and Triton's bindings (nanobind) then print ~30 lines of "leaked" warnings.)

T2I_FAST_GC=plain leaves the collector and the exit as Python does them: the plain twin, which the benchmark
compares against.
"""
from __future__ import annotations

import atexit
import gc
import os
import sys
import threading

FULL_COLLECTION_EVERY = 100  # middle-generation collections per full one (CPython's default: 10)


def tuned() -> bool:
    """Whether this process tunes the collector (T2I_FAST_GC=plain switches it off)."""
    return os.environ.get("T2I_FAST_GC", "").strip().lower() != "plain"


def for_a_command() -> None:
    """Called once when a `t2i-fast` process starts: rarer full collections."""
    if tuned():
        young, middle, full = gc.get_threshold()
        gc.set_threshold(young, middle, max(full, FULL_COLLECTION_EVERY))


def exit_now(code: int) -> None:
    """Called once the command has finished with `code`: end the process where it succeeded (nothing where
    T2I_FAST_GC=plain). A failed command exits the ordinary way: under torchrun, a rank that ends at once makes
    the launcher stop the others, which could cut off rank 0 before it prints the error that every rank met
    (only rank 0 prints it); the interpreter's teardown gave it that time before, and still does."""
    if not tuned() or code != 0:
        return
    try:
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()  # what sys.exit would run (logging's flush, temporary folders' cleanup, ...)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed, or a broken pipe: nothing more can reach it
                pass
        os._exit(code)
