"""The launchers end to end on a real local Ray cluster (head + 2 worker nodes, cluster/local.sh), real
DeepSpeed on gloo, real WebDataset shards and a real MLflow tracking server.

Jobs go through the `ray job` CLI exactly as a user types it. The tiny run is 40 fp32 steps with a
checkpoint every 10, so the runs below can be compared weight for weight with the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from ray.job_submission import JobStatus

from cluster.local import kill_groups
from tests.cluster_fixtures import BIN, Cluster, chromium
from trainer.checkpoint import find_resume_checkpoint, read_meta

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Pinned here rather than taken from the recipe: the assertions below depend on every one of them.
TINY = ["--recipe", "digits_tiny", "--set", "optim.max_steps=40", "optim.global_batch=8", "data.batch_size=4",
        "checkpoint.every_steps=10", "checkpoint.keep_last=2", "log_every=5", "engine.precision=fp32"]


@pytest.fixture(scope="module")
def cluster(shared_cluster, default_cluster):
    """The session's job cluster; a "demo" cluster on the default settings is up beside it, as after `make
    demo`: nothing of either may clash (issue 12: the second cluster's dashboard agent could not bind its
    port)."""
    return shared_cluster


def weights_sha256(step_dir: Path) -> str:
    from trainer.safe_load import safe_load  # imports DeepSpeed: only in the test that needs it

    sd = safe_load(step_dir / "mp_rank_00_model_states.pt")["module"]
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def resumed_step(logs: str) -> int | None:
    m = re.search(r"resuming from \S*step_(\d{8})", logs)
    return int(m.group(1)) if m else None


def mlflow_runs(cluster: Cluster, name: str) -> list:
    client = mlflow.MlflowClient(cluster.state["mlflow"])
    exp = client.get_experiment_by_name("digits_tiny")
    return client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")


def test_local_cluster_is_three_loopback_nodes(cluster):
    alive = sorted(cluster.nodes(), key=lambda n: n.node_ip)
    assert [n.node_ip for n in alive] == ["127.0.1.2", "127.0.1.3", "127.0.1.4"]
    assert [n.is_head_node for n in alive] == [True, False, False]
    assert [n.resources_total.get(f"simnode{i}") for i, n in enumerate(alive)] == [1, 1, 1]
    assert "CPU" not in alive[0].resources_total  # training never lands on the head
    with urllib.request.urlopen(cluster.state["mlflow"] + "/health", timeout=10) as r:
        assert r.read() == b"OK"
    # `up` on a running cluster reuses it instead of starting a second one.
    t0 = time.monotonic()
    out = subprocess.run([str(ROOT / "cluster/local.sh"), "--dir", cluster.state["dir"], "up", "2"],
                         capture_output=True, text=True, check=True).stdout
    reuse_s = time.monotonic() - t0
    print(f"`local.sh up` on the running cluster: {reuse_s:.1f} s")
    assert out.startswith("reusing") and reuse_s < 60  # generous for a loaded 2-core machine; the figure is printed
    assert json.loads(Path(cluster.state["dir"], "state.json").read_text())["pgids"] == cluster.state["pgids"]


def test_more_nodes_than_the_cluster_has_is_one_clear_error(cluster):
    sid = cluster.submit("too-many", *TINY, nodes=3)
    assert cluster.wait(sid, timeout=180) == JobStatus.FAILED
    errors = [line for line in cluster.logs(sid).splitlines() if line.startswith("error:")]
    assert errors == ["error: --nodes 3 but the cluster has 2 node(s) with a CPU"]
    assert not (cluster.storage / "too-many").exists()  # nothing was started


@pytest.fixture(scope="module")
def baseline(cluster):
    """`ray job submit -- python launch/cifar10.py --nodes 2 ...`, uninterrupted: the reference weights."""
    sid = cluster.submit("baseline", *TINY)
    assert cluster.wait(sid) == JobStatus.SUCCEEDED, cluster.logs(sid)[-3000:]
    return sid, weights_sha256(cluster.storage / "baseline/checkpoints/step_00000040")


def test_job_trains_on_two_nodes_checkpoints_and_logs_to_mlflow(cluster, baseline):
    sid, _ = baseline
    workers = cluster.workers(sid)
    assert len(workers) == 2 and len({w.node_id for w in workers}) == 2
    assert {w.node_id for w in workers} == {n.node_id for n in cluster.nodes() if not n.is_head_node}
    run = cluster.storage / "baseline"
    # One checkpoint store: Ray registered a reference to the trainer's newest step directory, no copy.
    snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    assert [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]] == ["ray_refs/step_00000040"]
    assert [p.name for p in (run / "ray_refs/step_00000040").iterdir()] == ["checkpoint.json"]
    ref = json.loads((run / "ray_refs/step_00000040/checkpoint.json").read_text())
    assert ref == {"step_dir": str(run / "checkpoints/step_00000040")}
    assert [p.name for p in (run / "ray_refs").iterdir()] == ["step_00000040"]  # evicted ones deleted
    assert not list(run.glob("step_*"))
    assert f"checkpoint {run / 'checkpoints/step_00000040'};" in cluster.logs(sid)
    assert [d.name for d in sorted((run / "checkpoints").glob("step_*"))] == ["step_00000030", "step_00000040"]
    assert sorted(p.name for p in (run / "checkpoints/step_00000040").glob("trainer_rank*.pt")) == [
        "trainer_rank00000.pt", "trainer_rank00001.pt"]
    [r] = mlflow_runs(cluster, "baseline")
    assert r.info.status == "FINISHED"
    history = mlflow.MlflowClient(cluster.state["mlflow"]).get_metric_history(r.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(5, 41, 5))
    assert "val/top1" in r.data.metrics and r.data.tags["world_size"] == "2"


def test_killed_worker_restores_from_checkpoint_with_identical_weights(cluster, baseline):
    sid = cluster.submit("killed", *TINY)
    first = cluster.storage / "killed/checkpoints/step_00000010"
    assert cluster.wait(sid, until=first.exists) == JobStatus.RUNNING
    victim = max(w.pid for w in cluster.workers(sid) if w.state == "ALIVE")
    os.kill(victim, signal.SIGKILL)  # mid-epoch: an epoch is 168 steps, the run 40
    assert cluster.wait(sid) == JobStatus.SUCCEEDED, cluster.logs(sid)[-3000:]
    logs = cluster.logs(sid)
    assert 10 <= resumed_step(logs) < 40, logs[-3000:]
    assert len(cluster.workers(sid)) == 4  # the first group and its replacement
    assert weights_sha256(cluster.storage / "killed/checkpoints/step_00000040") == baseline[1]


def test_stopped_run_resubmitted_with_its_name_resumes_on_fewer_nodes(cluster):
    # 400 steps: without uploads 40 would be over before `ray job stop` lands.
    sid = cluster.submit("stopped", *TINY, "optim.max_steps=400")
    saved = cluster.storage / "stopped/checkpoints/step_00000010"
    assert cluster.wait(sid, until=saved.exists) == JobStatus.RUNNING
    subprocess.run([str(BIN / "ray"), "job", "stop", sid], env=cluster.env, check=True, capture_output=True)
    assert cluster.wait(sid, timeout=120) == JobStatus.STOPPED
    [first] = mlflow_runs(cluster, "stopped")
    assert first.info.status == "KILLED", cluster.logs(sid)[-3000:]

    # Same --run-name, half the nodes, and this time the code shipped with --working-dir; a short
    # continuation past the newest checkpoint is enough to see where it resumes and that it finishes.
    newest_meta = read_meta(find_resume_checkpoint(saved.parent))
    assert newest_meta["mlflow_run_id"] == first.info.run_id
    newest = newest_meta["step"]
    end = newest + 30
    sid = cluster.submit("stopped", *TINY, f"optim.max_steps={end}", nodes=1, working_dir=True)
    assert cluster.wait(sid) == JobStatus.SUCCEEDED, cluster.logs(sid)[-3000:]
    logs = cluster.logs(sid)
    assert resumed_step(logs) == newest, logs[-3000:]
    assert "world 1 x micro 4 x accum 2 = 8" in logs
    assert len(cluster.workers(sid)) == 1
    meta = json.loads((cluster.storage / f"stopped/checkpoints/step_{end:08d}/meta.json").read_text())
    assert meta["world_size"] == 1 and meta["mlflow_run_id"] == first.info.run_id
    [run] = mlflow_runs(cluster, "stopped")
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    steps = [m.step for m in mlflow.MlflowClient(cluster.state["mlflow"]).get_metric_history(
        run.info.run_id, "train/loss")]
    assert steps[0] == 5 and steps[-1] == end and set(range(5, end + 1, 5)) <= set(steps)
    # The runs table the user opens lists it once.
    exp = mlflow.MlflowClient(cluster.state["mlflow"]).get_experiment_by_name("digits_tiny")
    dom = chromium(f"{cluster.state['mlflow']}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
    assert dom.count(">stopped<") == 1, dom[-3000:]


def test_node_lost_right_after_a_save_resumes_from_the_newest_step(cluster):
    """Kept last in this module: it takes a worker node away (the next module's `shared_cluster` restarts
    it). The node dies the moment the trainer's step 40 is complete, before Ray could register that save;
    the resubmitted run must still continue from step 40, the newest complete checkpoint, and Ray must hold
    no copy of its own."""
    sid = cluster.submit("node-loss", *TINY, "optim.max_steps=60")
    newest = cluster.storage / "node-loss/checkpoints/step_00000040"
    assert cluster.wait(sid, until=newest.exists) == JobStatus.RUNNING
    kill_groups([cluster.state["pgids"]["worker2"]], grace_s=0)  # the node's raylet and its workers
    subprocess.run([str(BIN / "ray"), "job", "stop", sid], env=cluster.env, check=True, capture_output=True)
    assert cluster.wait(sid, timeout=120).is_terminal()

    sid = cluster.submit("node-loss", *TINY, "optim.max_steps=60", nodes=1)
    assert cluster.wait(sid) == JobStatus.SUCCEEDED, cluster.logs(sid)[-3000:]
    assert resumed_step(cluster.logs(sid)) == 40, cluster.logs(sid)[-3000:]
    run = cluster.storage / "node-loss"
    assert json.loads((run / "checkpoints/step_00000060/meta.json").read_text())["step"] == 60
    assert not list(run.glob("step_*"))  # the trainer's step directories are the only store
    assert (run / "ray_refs/step_00000060/checkpoint.json").is_file()
