"""cluster/local.sh locked down: two real local clusters side by side (the default head address and another
one: the session's shared clusters, tests/conftest.py), each node listening on its own loopback address
only, Ray's job API refusing requests without the cluster's token, and MLflow answering its own address
only.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

from cluster.local import auth_headers
from tests.cluster_fixtures import ROOT, listeners, node_address

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# One actor on each worker node, so their core workers' listeners exist while the sockets are listed.
ACTORS_UP = """
import ray, time
ray.init()
@ray.remote(num_cpus=1)
class A:
    def ping(self):
        return 1
actors = [A.options(resources={f"simnode{i}": 1}).remote() for i in (1, 2)]
ray.get([a.ping.remote() for a in actors])
print("actors up", flush=True)
time.sleep(600)
"""
NODES = "import ray; ray.init(); print('nodes', sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))"


@pytest.fixture(scope="module")
def clusters(default_cluster, shared_cluster):
    return default_cluster.state, shared_cluster.state


def client(state: dict) -> JobSubmissionClient:
    return JobSubmissionClient(state["dashboard"], headers=auth_headers(state))


def wait(c: JobSubmissionClient, sid: str, marker: str | None = None, timeout: float = 240) -> JobStatus:
    """Poll until the job ends or its log shows `marker`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = c.get_job_status(sid)
        if status.is_terminal() or (marker is not None and marker in c.get_job_logs(sid)):
            return status
        time.sleep(0.5)
    raise TimeoutError(f"job {sid} still {status}:\n{c.get_job_logs(sid)[-2000:]}")


def test_every_listener_of_every_node_is_on_that_nodes_address(clusters):
    jobs = [(st, client(st), client(st).submit_job(entrypoint=f"python -c '{ACTORS_UP}'")) for st in clusters]
    try:
        for _, c, sid in jobs:
            assert wait(c, sid, "actors up") == JobStatus.RUNNING
        for st, _, _ in jobs:
            # The actors' core workers may open their listeners a moment after answering.
            end = time.monotonic() + 60
            while True:
                found = listeners(st)
                wrong = [f for f in found if f[2] != node_address(st, f[0])]
                assert not wrong, wrong
                actors = {f[0] for f in found if f[1].startswith("ray::A")}
                if actors == {"worker1", "worker2"} or time.monotonic() > end:
                    break
                time.sleep(1)
            assert actors == {"worker1", "worker2"}, found
            # Every group was seen, and every port recorded in state.json is really listened on there.
            assert {f[0] for f in found} == set(st["pgids"])
            for group, ports in st["ports"].items():
                if group == "mlflow":
                    ports = {"mlflow": ports["mlflow"]}  # no PostgreSQL with the sqlite backend
                assert set(ports.values()) <= {f[3] for f in found if f[0] == group}, (group, ports)
    finally:
        for _, c, sid in jobs:
            c.stop_job(sid)


PLAIN_BIND = 'import socket; s = socket.socket(); s.bind(("0.0.0.0", 0)); print("bound", s.getsockname()[0])'


def test_a_jobs_own_processes_that_are_not_rays_bind_where_they_ask(clusters):
    """The job's entrypoint inherits the nodes' LD_PRELOAD, but the shim changes only Ray's processes: a
    plain process's bind to 0.0.0.0:0 (what a client does before connecting) stays there."""
    c = client(clusters[0])
    sid = c.submit_job(entrypoint=f"python -c '{PLAIN_BIND}'")
    assert wait(c, sid) == JobStatus.SUCCEEDED
    assert "bound 0.0.0.0" in c.get_job_logs(sid), c.get_job_logs(sid)


def test_job_api_refuses_requests_without_the_clusters_token(clusters):
    a, b = clusters
    with pytest.raises(AuthenticationError, match="Missing authentication token"):
        JobSubmissionClient(a["dashboard"]).submit_job(entrypoint="echo unauthenticated")
    codes = []
    for headers in ({}, {"Authorization": "Bearer " + "0" * 64}, auth_headers(b)):  # none, wrong, the other's
        req = urllib.request.Request(a["dashboard"] + "/api/jobs/", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        codes.append(e.value.code)
    assert codes == [401, 403, 403]
    assert all("unauthenticated" not in j.entrypoint for j in client(a).list_jobs())
    c = client(a)
    sid = c.submit_job(entrypoint="echo authenticated")
    assert wait(c, sid) == JobStatus.SUCCEEDED and "authenticated" in c.get_job_logs(sid)


def test_two_clusters_side_by_side_each_run_a_job_through_the_cli(clusters):
    for st in clusters:
        out = subprocess.run([str(ROOT / "cluster/local.sh"), "--dir", st["dir"], "env"], capture_output=True,
                             text=True, check=True).stdout
        env = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines())
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == st["auth_token_path"]
        assert env["MLFLOW_TRACKING_URI"] == st["mlflow"]
        res = subprocess.run([str(BIN / "ray"), "job", "submit", "--", "python", "-c", NODES], cwd=ROOT,
                             env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(Path.home()), **env},
                             capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert f"nodes {sorted(st['ips'])}" in res.stdout


def test_mlflow_answers_its_own_address_only(clusters):
    for st in clusters:
        client = mlflow.MlflowClient(st["mlflow"])
        exp = client.create_experiment(f"side-by-side-{time.monotonic_ns()}")
        assert client.get_experiment(exp).name.startswith("side-by-side-")
        # A name MLflow was not told about: the DNS-rebinding guard refuses it.
        req = urllib.request.Request(st["mlflow"] + "/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers={"Host": "evil.example:5000"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 403
