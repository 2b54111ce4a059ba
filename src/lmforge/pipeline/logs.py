"""Quiet datatrove: its tasks log every step at INFO to the terminal (dozens of lines per data run). Here
the terminal gets warnings and errors only, and each task's full DEBUG log still goes to
``<work>/logs/logs/task_NNNNN.log``. ``lmforge -v data ...`` (LMFORGE_VERBOSE=1) keeps datatrove's output."""

from __future__ import annotations

import os
import sys


def quiet_datatrove() -> None:
    if os.environ.get("LMFORGE_VERBOSE", "").lower() in ("1", "true", "yes"):
        return
    import datatrove.executor.base as base
    import datatrove.utils.logging as dt_logging
    from loguru import logger

    if getattr(base.add_task_logger, "_lmforge_quiet", False):
        return
    original = dt_logging.add_task_logger

    def add_task_logger(logging_dir, rank: int, local_rank: int = 0, node_rank: int = -1):
        logfile = original(logging_dir, rank, local_rank, node_rank=node_rank)
        logger.remove()  # datatrove's sinks: stderr at INFO and the task's file
        logger.add(sys.stderr, level="WARNING", format="{level}: {message}")
        logger.add(logfile, level="DEBUG")
        return logfile

    def setup_default_logger():
        logger.remove()
        logger.add(sys.stderr, level="WARNING", format="{level}: {message}")

    add_task_logger._lmforge_quiet = True
    base.add_task_logger = add_task_logger
    dt_logging.setup_default_logger = setup_default_logger
    setup_default_logger()
