"""A program's quiet start: what it prints concerns the user's run.

transformers, without torchvision (not a dependency here), warns once per image-processor class that diffusers'
pipeline modules import (the safety checker's feature extractor) that it falls back to the PIL processor; nothing
here uses those processors, so that one message is filtered out. Called by the programs (console commands and
`python -m` entry points), never on import.

bitsandbytes is an optional extra (`pip install "difftune[bnb]"`): peft imports it at its own import whenever it is
installed (a second, and a warning about a `kernels` package on CPUs with AVX512-BF16), so it is not installed unless
a run asks for an 8-bit optimizer or a quantised base, and those options import it where they use it.
"""

from __future__ import annotations

import logging


def quiet_start() -> None:
    """Before the program imports diffusers: filters transformers' torchvision fallback notice."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_not_torchvision_fallback)


def _not_torchvision_fallback(record: logging.LogRecord) -> bool:
    return "requires torchvision (not installed); falling back to" not in record.getMessage()
