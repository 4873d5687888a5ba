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


def quiet_torchvision_fallback() -> None:
    """For the command line: drop transformers' 'requires torchvision (not installed)' notices for good.
    transformers names image processors after their torchvision backend and says so when it falls back to
    PIL; torchvision cannot sit next to the CPU build of torch, and no image processor is used here."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropByStart) for f in logger.filters):  # once, however often main() runs
        logger.addFilter(_DropByStart("`", "requires torchvision (not installed)"))
