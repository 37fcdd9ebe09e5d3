"""Every dense-task test starts from the same seed (helpers live in dense_data.py)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
