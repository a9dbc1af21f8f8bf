"""difftune: fine-tune diffusion models (LoRA and full) with diffusers, generate from the result, and compare the
other generative families on the same data.

The installed package holds the repository's folders as subpackages: `difftune.finetune`, `difftune.pipelines`,
`difftune.baselines`, `difftune.toyworld`, `difftune.core`, `difftune.scripts` and the YAML `difftune.configs`.
The names below are the Python API for scripted runs; importing `difftune` itself imports nothing heavy.
"""

from __future__ import annotations

__version__ = "0.2.0"
