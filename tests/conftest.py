import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import DistributedPool  # noqa: E402


def _pool(world: int):
    pool = DistributedPool(world)
    yield pool
    pool.close()


# Module scope: each test module that asks gets one process group, started on first use.
@pytest.fixture(scope="module")
def pool2():
    yield from _pool(2)


@pytest.fixture(scope="module")
def pool4():
    yield from _pool(4)
