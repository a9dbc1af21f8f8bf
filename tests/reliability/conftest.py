"""The reliability tests run their tiny trainings on one thread each (pytest-xdist runs two workers on two cores)."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
