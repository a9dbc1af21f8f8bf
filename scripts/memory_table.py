"""The memory guide's figures, printed by the memory planner: what `--fit` chooses for each model family, resolution
and card, and each hardware preset's predicted peak.

    python -m difftune.scripts.memory_table                 # rewrites the table in docs/memory.md and the presets'
    python -m difftune.scripts.memory_table --only presets  # the presets' expected-peak lines only
    python -m difftune.scripts.memory_table --check         # prints them, changes nothing
    python -m difftune.scripts.memory_table --families qwen_image,flux2   # only these families' rows and presets

Every figure comes from `finetune.planner` on the released models' config shapes (`scripts/shaped_models.py`:
SD 1.5, SDXL, SD 3.5 medium, Flux.1-dev, Qwen-Image, Flux.2 dev and klein 4B, Z-Image, Chroma, built on the meta
device): a LoRA of the default rank, bf16 mixed precision, latents and text cached, batch 4 before `--fit` lowers it.
The 2026 families have 1024 px rows only (what they are trained at). One plan of a 20-32B model takes 3-10 s on an
idle 2-core machine (30-100 s when others share it) and a `--fit` cell makes a dozen plans or more: their rows take
well over an hour there.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from difftune.scripts.shaped_models import SHAPED_FAMILIES, write_shaped_configs

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "memory.md"
PRESETS = REPO / "configs" / "hardware"
BEGIN, END = "<!-- memory_table: begin -->", "<!-- memory_table: end -->"
NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL", "sd35": "SD 3.5 medium", "flux": "Flux.1-dev", "qwen_image": "Qwen-Image",
         "flux2": "Flux.2-dev", "flux2_klein": "Flux.2-klein 4B", "z_image": "Z-Image", "chroma": "Chroma"}  # fmt: skip
RESOLUTIONS = {"sd15": (512, 1024), "sdxl": (512, 1024), "sd35": (512, 1024), "flux": (512, 1024)}  # others: 1024
# A preset's name ends in its family's suffix (none: SD 1.x/2.x).
SUFFIXES = {"sdxl": "sdxl", "sd3": "sd35", "flux": "flux", "qwen": "qwen_image", "flux2": "flux2", "klein": "flux2_klein",
            "zimage": "z_image", "chroma": "chroma"}  # fmt: skip
CARDS = (8, 12, 16, 24, 40, 80)  # GB, as sold
BASE = dict(train_batch_size=4, mixed_precision="bf16")
PRESET_LINE = "# Expected peak: "


def preset_target(name: str) -> tuple[str, int, float]:
    """(family shape, resolution, card GB) a hardware preset is for, from its name (`gpu-12gb-sdxl`)."""
    card = float(re.search(r"(\d+)gb", name).group(1))
    kind = SUFFIXES.get(name.rsplit("-", 1)[-1], "sd15")
    return kind, 512 if kind == "sd15" else 1024, card


def preset_plan(path: Path, folder: Path):
    """The planner's plan of the preset at `path` on its family's shape (configs in `folder`)."""
    from difftune.core.config import compose, load_yaml
    from difftune.finetune.config import LoraTrainConfig
    from difftune.finetune.planner import planned_config, predict
    from difftune.finetune.tasks import LORA

    kind, resolution, card = preset_target(path.stem)
    values = {**load_yaml(path, LoraTrainConfig), "resolution": resolution}
    model = write_shaped_configs(kind, folder / kind)
    cfg = planned_config(compose(LoraTrainConfig, dict(pretrained_model_name_or_path=str(model))), values)
    return predict(cfg, LORA, detail=False, card_gib=card)


def preset_line(path: Path, plan) -> str:
    """The line a preset states its prediction in."""
    from difftune.finetune.planner import DURING

    kind, resolution, card = preset_target(path.stem)
    peak = plan.predicted / 2**30
    line = (
        f"{PRESET_LINE}{peak:.2f} GiB, the memory planner's prediction ({NAMES[kind]}-shaped LoRA at {resolution} px)"
    )
    if peak > card:
        line += f", above {card:g} GB during {DURING[plan.trace.peak.phase]}"
    return line


def stated_peak(path: Path) -> float | None:
    """The prediction a preset states, in GiB (None: it states none)."""
    for line in path.read_text().splitlines():
        found = re.match(rf"{PRESET_LINE}([\d.]+) GiB", line)
        if found:
            return float(found.group(1))
    return None


def fit_cell(kind: str, resolution: int, card: float, folder: Path) -> str:
    """What `--fit card` chooses for the family at the resolution, as a table cell."""
    from difftune.core.config import compose
    from difftune.core.errors import UserError
    from difftune.finetune.config import LoraTrainConfig
    from difftune.finetune.planner import GIB, fit, flags, planned_config
    from difftune.finetune.tasks import LORA

    model = write_shaped_configs(kind, folder / kind)
    cfg = planned_config(compose(LoraTrainConfig, dict(pretrained_model_name_or_path=str(model))),
                        {**BASE, "resolution": resolution})  # fmt: skip
    try:
        settings, plan = fit(cfg, LORA, card)
    except UserError as err:
        smallest, phase = re.search(r"smallest reachable peak is ([\d.]+ GiB), during (.+?) \(with", str(err)).groups()
        return f"does not fit (smallest: {smallest}, during {phase})"
    return f"{plan.predicted / GIB:.2f} GiB: " + (f"`{flags(settings)}`" if settings else "as it is")


def table(folder: Path, families: tuple[str, ...], current: str = "") -> str:
    """The guide's table: `families`' rows computed, every other family's kept from the `current` table."""
    head = "| family | px | " + " | ".join(f"{c} GB" for c in CARDS) + " |"
    kept = [(line.split(" | ")[0][2:], line) for line in current.splitlines()[2:] if line.startswith("| ")]
    rows = [head, "|" + "---|" * (len(CARDS) + 2)]
    for kind in SHAPED_FAMILIES:
        if kind not in families:
            rows += [line for name, line in kept if name == NAMES[kind]]
            continue
        for resolution in RESOLUTIONS.get(kind, (1024,)):
            cells = [fit_cell(kind, resolution, card, folder) for card in CARDS]
            rows.append(f"| {NAMES[kind]} | {resolution} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="print only")
    parser.add_argument("--only", choices=("presets", "table"), help="only the presets' lines, or only the table")
    parser.add_argument("--families", default=",".join(SHAPED_FAMILIES), help="comma-separated: " +
                        ", ".join(SHAPED_FAMILIES) + " (default: all); the other rows stay as they are")  # fmt: skip
    args = parser.parse_args(argv)
    families = tuple(args.families.split(","))
    unknown = sorted(set(families) - set(SHAPED_FAMILIES))
    if unknown:
        parser.error(f"--families: unknown {', '.join(unknown)}; choose from {', '.join(SHAPED_FAMILIES)}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.only != "table":
            write_presets(folder, args.check, families)
        if args.only != "presets":
            guide = GUIDE.read_text()
            start, end = guide.index(BEGIN) + len(BEGIN), guide.index(END)
            text = table(folder, families, guide[start:end].strip())
            if not args.check:
                guide = GUIDE.read_text()  # as it is now: the run is long
                start, end = guide.index(BEGIN) + len(BEGIN), guide.index(END)
                GUIDE.write_text(guide[:start] + "\n" + text + "\n" + guide[end:])


def write_presets(folder: Path, check: bool, families: tuple[str, ...] = SHAPED_FAMILIES) -> None:
    """Each card preset's expected-peak line (of `families`' presets), rewritten in place with the planner's
    prediction."""
    for path in sorted(PRESETS.glob("*.yaml")):
        if path.stem == "cpu" or preset_target(path.stem)[0] not in families:
            continue
        line = preset_line(path, preset_plan(path, folder))
        print(f"{path.name}: {line}", flush=True)
        if not check:
            lines = path.read_text().splitlines()
            old = [i for i, x in enumerate(lines) if x.startswith((PRESET_LINE, "# Memory planner: "))]
            if old:
                lines[old[0]] = line
                lines = [x for i, x in enumerate(lines) if i not in old[1:]]
            else:  # after the leading comments
                lines.insert(next(i for i, x in enumerate(lines) if not x.startswith("#")), line)
            path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
