"""A program's quiet start: keep out the imports it does not use, before anything imports diffusers.

diffusers, peft, transformers and accelerate each import bitsandbytes at their own import whenever it is installed
(their availability checks are `importlib.util.find_spec("bitsandbytes")`), and bitsandbytes' import costs most of
a second and, on CPUs with AVX512-BF16, prints a warning about a `kernels` package. Only a run with an 8-bit
optimizer or a quantised base calls it (finetune/startup.py decides that from the run's config); every other program
keeps it out: a `None` entry in `sys.modules` is Python's documented way to make a package unimportable
(`find_spec` then answers None and `import` raises ImportError), which every one of those libraries reads as "not
installed".

transformers, without torchvision (not a dependency here), warns once per image-processor class that diffusers'
pipeline modules import (the safety checker's feature extractor) that it falls back to the PIL processor; nothing
here uses them, so that one message is filtered out.

Called by programs (under `if __name__ == "__main__":` where the module is also a library), never on import: a
library that hid an installed package from its importer would be a surprise.
"""

from __future__ import annotations

import logging
import sys


def quiet_start(bitsandbytes: bool = False) -> None:
    """Before the program imports diffusers: keeps bitsandbytes out unless `bitsandbytes`, and filters
    transformers' torchvision fallback notice."""
    if not bitsandbytes and "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None
    logging.getLogger("transformers.utils.import_utils").addFilter(_not_torchvision_fallback)


def _not_torchvision_fallback(record: logging.LogRecord) -> bool:
    return "requires torchvision (not installed); falling back to" not in record.getMessage()
