"""Loading without the libraries' progress bars: a local component loads in a second, and the bars of diffusers and
transformers ("Loading weights", "Loading pipeline components") would be the loudest lines of a user's run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def no_loading_bars() -> Iterator[None]:
    """diffusers' and transformers' progress bars off for the duration, then as they were."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    bars = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars[0]:
            diffusers_logging.enable_progress_bar()
        if bars[1]:
            transformers_logging.enable_progress_bar()
