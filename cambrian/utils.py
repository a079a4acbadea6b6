"""Small helpers shared across the package."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-key load reports and progress bars for the block.

    The loaders here check missing/unexpected tensors themselves and raise a clear error instead, so
    transformers' own warnings would only be noise (and its bars print once per tiny tower).
    """
    from transformers.utils import logging as hf_logging

    tf_logger = logging.getLogger("transformers")
    level = tf_logger.level
    bars = hf_logging.is_progress_bar_enabled()
    tf_logger.setLevel(logging.ERROR)
    if bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()
