"""Notices of the libraries we call that do not apply to us, dropped where we know they do not apply.

Each is dropped by its exact opening words on its own logger, so every other message still shows.
"""
from __future__ import annotations

import contextlib
import logging


class _DropByStart(logging.Filter):
    def __init__(self, start: str, contains: str = ""):
        super().__init__()
        self.start, self.contains = start, contains

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith(self.start) and self.contains in msg)


@contextlib.contextmanager
def dropped(logger_name: str, start: str, contains: str = ""):
    """Within the block, drop the messages of `logger_name` that start with `start` (and hold `contains`)."""
    logger = logging.getLogger(logger_name)
    notice = _DropByStart(start, contains)
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def drop_for_good(logger_name: str, start: str, contains: str = "") -> None:
    """Drop the messages of `logger_name` that start with `start` (and hold `contains`) from now on; once,
    however often it is called."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropByStart) and (f.start, f.contains) == (start, contains) for f in logger.filters):
        logger.addFilter(_DropByStart(start, contains))


def quiet_torchvision_fallback() -> None:
    """For the command line: drop transformers' 'requires torchvision (not installed)' notices for good.
    transformers names image processors after their torchvision backend and says so when it falls back to
    PIL; torchvision cannot sit next to the CPU build of torch, and no image processor is used here."""
    drop_for_good("transformers.utils.import_utils", "`", "requires torchvision (not installed)")


def quiet_kernels_community() -> None:
    """For the command line: drop the two lines that importing bitsandbytes (diffusers imports it) logs on a CPU
    with AVX512-BF16 when the PyPI `kernels` package is installed: it tries to fetch its 4-bit CPU matmul from
    the Hugging Face Hub (kernels-community), which offline fails. We use no 4-bit layer, and nothing is
    downloaded at run time."""
    drop_for_good("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/")
    drop_for_good("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community")
