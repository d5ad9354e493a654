import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The sglang tests' shared helpers assert too: rewrite them as pytest does a test module.
pytest.register_assert_rewrite("sglang_kit")


@pytest.fixture
def root() -> pathlib.Path:
    return ROOT


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded freshly per test from the OS, so inputs are never the same twice."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(torch.seed() % 2**31)))
    request.node.user_properties.append(("seed", seed))
    return torch.Generator().manual_seed(seed)
