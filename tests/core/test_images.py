"""core.images: grids on top of diffusers' make_image_grid keep their layout (white border between tiles)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difftune.core.images import make_grid, tensor_grid


def test_make_grid_places_tiles_with_a_white_border_and_fills_a_short_row():
    tiles = [np.full((4, 6, 3), value, dtype=np.uint8) for value in (0, 50, 100)]
    grid = np.asarray(make_grid(tiles, cols=2, pad=2))
    assert grid.shape == (2 * 4 + 3 * 2, 2 * 6 + 3 * 2, 3)  # (H, W, C): rows, cols and three borders each way
    assert (grid[2:6, 2:8] == 0).all() and (grid[2:6, 10:16] == 50).all() and (grid[8:12, 2:8] == 100).all()
    assert (grid[8:12, 10:16] == 255).all() and (grid[:2] == 255).all() and (grid[:, -2:] == 255).all()


def test_make_grid_defaults_to_a_square_and_refuses_nothing_to_tile():
    assert make_grid([np.zeros((3, 3, 3))] * 5).size == (3 * 3 + 4 * 2, 2 * 3 + 3 * 2)  # 3 columns, 2 rows
    with pytest.raises(ValueError, match="at least one image"):
        make_grid([])


def test_tensor_grid_takes_batches_in_unit_range_grey_or_colour():
    x = torch.zeros(16, 1, 8, 8)
    x[1] = 1.0
    grid = np.asarray(tensor_grid(x))
    assert grid.shape == (2 * 9 + 1, 8 * 9 + 1, 3)  # 8 columns, 1-pixel borders
    assert (grid[1:9, 1:9] == 0).all() and (grid[1:9, 10:18] == 255).all()
    assert tensor_grid(torch.rand(3, 3, 4, 4)).size == (3 * 5 + 1, 5 + 1)  # fewer images than columns: 3 wide
    with pytest.raises(ValueError, match=r"\(N, 1 or 3, H, W\)"):
        tensor_grid(torch.zeros(2, 2, 4, 4))
