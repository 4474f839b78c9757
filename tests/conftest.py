import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import TEST_TIMEOUT, DistributedPool, ForkServer, Launcher, launch_env  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torchtitan_minor() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return ".".join(version("torchtitan").split(".")[:2])
    except PackageNotFoundError:
        return ""


# tests/torchtitan030 imports torchtitan 0.3.0, which cannot share an interpreter with the main
# environment's 0.2.2: tests/test_torchtitan030.py runs that folder in the 0.3.0 environment.
collect_ignore = [] if _torchtitan_minor() == "0.3" else ["torchtitan030"]


def pytest_collection_modifyitems(config, items):
    # pytest-timeout is the backstop behind the harness's own limit (which fails with a clearer message):
    # raising DIST_MUON_TEST_TIMEOUT raises both.
    if "DIST_MUON_TEST_TIMEOUT" in os.environ:
        for item in items:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT + 60))


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


@pytest.fixture(scope="session")
def forkserver(tmp_path_factory):
    """The main environment's (torchtitan 0.2.2) rank fork server, started by the first job that needs it."""
    server = ForkServer(launch_env(tmp_path_factory.mktemp("hf")), REPO)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def launcher(forkserver):
    """Starts jobs (torchrun ..., or ``start_ranks``) from the repo root; whatever is still running when
    the test ends is killed."""
    launcher = Launcher(REPO, forkserver)
    try:
        yield launcher
    finally:
        launcher.close()
