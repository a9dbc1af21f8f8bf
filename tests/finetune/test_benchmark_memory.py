"""scripts/benchmark_memory.py on CPU at narrowed widths: the rows a GPU run takes (each family's denoiser, each
preset's memory options applied by `finetune.memory`, the product's loss), the quick set, and the markdown table.
The memory figures themselves need CUDA."""

from __future__ import annotations

import json

import pytest

from difftune.scripts import benchmark_memory as bench


def test_rows_cover_every_card_of_every_family_and_the_quick_set():
    every = bench.rows_to_run(bench.MemoryBenchmarkConfig())
    assert len(every) == 24 and ("flux", "gpu-8gb-flux") in every and ("sd15", "a100-80gb") in every
    quick = bench.rows_to_run(bench.MemoryBenchmarkConfig(quick=True))
    assert [name for _, name in quick] == list(bench.QUICK)


def test_narrowed_rows_train_under_the_presets_memory_options(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = bench.main(["--narrow", "--steps", "1", "--families", "sdxl", "flux", "--presets", "gpu-16gb-sdxl",
                       "gpu-12gb-flux", "--output", str(out)])  # fmt: skip
    by_preset = {row["preset"]: row for row in rows}
    assert set(by_preset) == {"gpu-16gb-sdxl", "gpu-12gb-flux"}
    swapped = by_preset["gpu-12gb-flux"]
    assert swapped["fp8_base"] and 0 < swapped["blocks_to_swap"] < 6  # 36 of 57, scaled to the narrowed 6 blocks
    assert swapped["swapped_gib"] > 0 and swapped["transfer_seconds_per_step"] == 0.0  # CPU: moves cost nothing
    assert all(row["seconds_per_step"] > 0 and "peak_gib" not in row for row in rows)  # no memory figure on CPU
    assert "fp16 -> fp32 (CPU)" in by_preset["gpu-16gb-sdxl"]["notes"]
    printed = capsys.readouterr().out
    assert "| flux | `gpu-12gb-flux` | 64 | 1 x 4 | bf16 | fp8 | 4 |" in printed
    assert json.loads(out.read_text())["rows"] == rows


def test_a_quantised_preset_without_bitsandbytes_is_named_not_run():
    (row,) = bench.main(["--narrow", "--families", "sdxl", "--presets", "gpu-8gb-sdxl"])
    assert row["skipped"] == "--quantize_base nf4 needs CUDA and bitsandbytes"


@pytest.mark.slow
def test_every_narrowed_row_runs():
    rows = bench.main(["--narrow", "--steps", "1"])
    assert len(rows) == 24 and all("seconds_per_step" in row or "skipped" in row for row in rows)


def test_the_2026_families_run_when_named_on_the_cards_they_ship_for():
    rows = bench.rows_to_run(bench.MemoryBenchmarkConfig(families=list(bench.FAMILIES_2026)))
    assert ("qwen_image", "gpu-24gb-qwen") in rows and ("chroma", "gpu-8gb-chroma") in rows
    flux2 = [name for kind, name in rows if kind == "flux2"]
    assert flux2 == ["gpu-12gb-flux2", "gpu-16gb-flux2", "gpu-24gb-flux2", "a100-40gb-flux2", "a100-80gb-flux2"]


def test_narrowed_2026_rows_train_under_their_presets_memory_options():
    """Qwen-Image's packed latents and text mask, Flux.2's patchified latents and stacked text layers, each with its
    preset's fp8 base and swapped blocks (scaled to the narrowed depth)."""
    rows = bench.main(["--narrow", "--steps", "1", "--families", "qwen_image", "flux2", "--presets", "gpu-12gb-qwen",
                       "gpu-16gb-flux2"])  # fmt: skip
    assert [row["preset"] for row in rows] == ["gpu-12gb-qwen", "gpu-16gb-flux2"]
    for row in rows:
        assert row["fp8_base"] and row["blocks_to_swap"] > 0 and row["seconds_per_step"] > 0 and row["swapped_gib"] > 0
