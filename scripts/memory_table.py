"""The memory guide's figures, printed by the memory planner: what `--fit` chooses for each model family, resolution
and card, and each hardware preset's predicted peak.

    python -m difftune.scripts.memory_table                 # rewrites the table in docs/memory.md and the presets'
    python -m difftune.scripts.memory_table --only presets  # the presets' expected-peak lines only
    python -m difftune.scripts.memory_table --check         # prints them, changes nothing

Every figure comes from `finetune.planner` on the released models' config shapes (`scripts/shaped_models.py`:
SD 1.5, SDXL, SD 3.5 medium, Flux.1-dev, built on the meta device): a LoRA of the default rank, bf16 mixed
precision, latents and text cached, batch 4 before `--fit` lowers it. The run takes about half an hour on 2 cores.
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
NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL", "sd35": "SD 3.5 medium", "flux": "Flux.1-dev"}
RESOLUTIONS = (512, 1024)
CARDS = (8, 12, 16, 24, 40, 80)  # GB, as sold
BASE = dict(train_batch_size=4, mixed_precision="bf16")
PRESET_LINE = "# Expected peak: "


def preset_target(name: str) -> tuple[str, int, float]:
    """(family shape, resolution, card GB) a hardware preset is for, from its name (`gpu-12gb-sdxl`)."""
    card = float(re.search(r"(\d+)gb", name).group(1))
    kind = {"sdxl": "sdxl", "sd3": "sd35", "flux": "flux"}.get(name.rsplit("-", 1)[-1], "sd15")
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


def table(folder: Path) -> str:
    head = "| family | px | " + " | ".join(f"{c} GB" for c in CARDS) + " |"
    rows = [head, "|" + "---|" * (len(CARDS) + 2)]
    for kind in SHAPED_FAMILIES:
        for resolution in RESOLUTIONS:
            cells = [fit_cell(kind, resolution, card, folder) for card in CARDS]
            rows.append(f"| {NAMES[kind]} | {resolution} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="print only")
    parser.add_argument("--only", choices=("presets", "table"), help="only the presets' lines, or only the table")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.only != "table":
            write_presets(folder, args.check)
        if args.only != "presets":
            text = table(folder)
            if not args.check:
                guide = GUIDE.read_text()
                start, end = guide.index(BEGIN) + len(BEGIN), guide.index(END)
                GUIDE.write_text(guide[:start] + "\n" + text + "\n" + guide[end:])


def write_presets(folder: Path, check: bool) -> None:
    """Each card preset's expected-peak line, rewritten in place with the planner's prediction."""
    for path in sorted(PRESETS.glob("*.yaml")):
        if path.stem == "cpu":
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
