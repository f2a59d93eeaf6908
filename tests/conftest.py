"""Shared test fixtures."""

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test single-threaded: its tensors are tiny, and thread start-up costs more than the work,
    badly so on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it on one)"))])
def device(request):
    """Each device a comparison must hold on: the CPU always, CUDA where there is one (bench/gpu_check.sh).
    On CUDA, TF32 is off: it would round fp32 convs and matmuls to 10 mantissa bits."""
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# The cluster/local.sh clusters that test modules share for the whole run: starting one (3 Ray nodes and
# MLflow) takes longer than most of the tests run on it. A module that kills a node leaves it dead; the next
# module's fixture restarts it with `cluster/local.sh up`, as a user would.
CLUSTERS = {"default_cluster", "shared_cluster"}
# The modules whose tests use them: pytest-xdist's controller, which schedules the tests, sees test ids only.
CLUSTER_MODULES = {"test_journey", "test_faults_node_loss", "test_cluster_local", "test_launch_ray"}


def pytest_collection_modifyitems(items):
    """The tests on the shared clusters run together, first those on the default cluster alone (test_journey,
    which wants it fresh), then those on the job cluster.

    Run by one process, they come last: each cluster starts for the first test that uses it and stops at the
    end of the run, instead of idling through the tests that do not use it. On pytest-xdist workers (`make
    test`) they come first: they are the longest unit of work (pytest_xdist_make_scheduler below), so one
    worker starts on them while the other takes the modules."""
    on_worker = "PYTEST_XDIST_WORKER" in os.environ

    def on_cluster(item) -> bool:
        return bool(CLUSTERS & set(item.fixturenames))

    strays = {item.path.stem for item in items if on_cluster(item)} - CLUSTER_MODULES
    if strays:
        raise pytest.UsageError(f"tests/conftest.py: add {sorted(strays)} to CLUSTER_MODULES")
    items.sort(key=lambda item: (on_cluster(item) != on_worker, "shared_cluster" in item.fixturenames))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, which the GPU check's venv does not have
def pytest_xdist_make_scheduler(config, log):
    """With --dist loadscope: each module is one unit of work, so that its module fixtures run once, and the
    cluster modules are one unit together, so that one worker starts the shared clusters once. (xdist's own
    --dist loadgroup does this with marks, but it renames items through an attribute pytest 9 no longer
    reads, so its groups are silently ignored.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndClusters(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "clusters" if Path(module).stem in CLUSTER_MODULES else module

    return ModulesAndClusters(config, log)


@pytest.fixture(scope="session")
def digits16(tmp_path_factory):
    """The digits data set at 16 px as WebDataset shards, for the jobs on the shared clusters."""
    from tests.cluster_fixtures import digits_wds

    return digits_wds(tmp_path_factory.mktemp("data") / "digits16")


def _session_cluster(base, *args):
    """`local_cluster(BASE/cluster, ARGS...)`, yielding its folder; every job's log is kept in BASE."""
    from tests.cluster_fixtures import keep_job_logs, local_cluster

    with local_cluster(base / "cluster", *args) as state:
        try:
            yield base / "cluster"
        finally:
            keep_job_logs(state, base)


@pytest.fixture(scope="session")
def _default_cluster_dir(tmp_path_factory):
    yield from _session_cluster(tmp_path_factory.mktemp("default_cluster"))


@pytest.fixture(scope="session")
def _shared_cluster_dir(tmp_path_factory):
    from tests.cluster_fixtures import SHARED_HOST

    yield from _session_cluster(tmp_path_factory.mktemp("shared_cluster"), "--host", SHARED_HOST)


@pytest.fixture(scope="module")
def default_cluster(_default_cluster_dir, digits16, tmp_path_factory):
    """A cluster on cluster/local.sh's default settings (head 127.0.0.2, free ports), as `make demo` starts
    one, as a tests.cluster_fixtures.Cluster whose run storage is the module's own. Its jobs leave every node
    alive."""
    from tests.cluster_fixtures import Cluster, restored

    return Cluster(restored(_default_cluster_dir), digits16, tmp_path_factory.mktemp("storage"))


@pytest.fixture(scope="module")
def shared_cluster(_shared_cluster_dir, digits16, tmp_path_factory):
    """The session's job cluster (head SHARED_HOST + 2 worker nodes) with every node up (`cluster/local.sh
    up` restarts those an earlier module killed), as a tests.cluster_fixtures.Cluster whose run storage is
    the module's own."""
    from tests.cluster_fixtures import Cluster, restored

    return Cluster(restored(_shared_cluster_dir), digits16, tmp_path_factory.mktemp("storage"))
