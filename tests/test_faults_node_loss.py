"""Node loss: a worker node's whole process group dies mid-run on a real local Ray cluster (head + 2 worker
nodes, cluster/local.sh) with a real `ray job submit` run on digits shards and a real MLflow server.

The run must go on with the node that is left (an elastic worker group, launch/common.py), from the
newest complete step, in the same MLflow run; `cluster/local.sh up` must then restart the dead node only,
leaving the head, the other node and the running job alone. The seconds from the kill to the resumed
training and the steps recomputed are printed (`-s`) for docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from ray.job_submission import JobStatus

from cluster.local import LocalCluster, _alive, kill_groups
from launch.common import LaunchError, scaling_config, workers_that_fit
from tests.cluster_fixtures import local_sh
from trainer.checkpoint import find_resume_checkpoint, read_meta
from trainer.recipes import get_recipe

# Checkpoints every 10 steps, so a kill after step 20 lands between two saves; every step is logged so the
# step reached at the kill is known to the step. The shrunk group looks for nodes again every RESIZE_CHECK_S
# (15 s here instead of 60 s); 300 steps (~0.2 s each here) outlast the node's restart and that check, so
# the run also grows back.
STEPS = 300
RESIZE_CHECK = {"DEEPSPIKE_RESIZE_CHECK_S": "15"}
RUN = ["--recipe", "digits_tiny", "--set", f"optim.max_steps={STEPS}", "optim.global_batch=8", "data.batch_size=4",
       "checkpoint.every_steps=10", "checkpoint.keep_last=2", "log_every=1", "engine.precision=fp32"]


def node(cpus: float = 1, gpus: float = 0, alive: bool = True) -> dict:
    """One entry of `ray.nodes()`, as the launcher reads it."""
    return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


def args(nodes: int, min_nodes: int = 1, gpus: int | None = None) -> argparse.Namespace:
    return argparse.Namespace(nodes=nodes, min_nodes=min_nodes, gpus_per_node=gpus)


def test_worker_group_is_elastic_down_to_min_nodes():
    cfg = get_recipe("digits_tiny")  # global batch 32, micro-batch 16: 1 or 2 ranks
    elastic = scaling_config(args(2), cfg, [node(0), node(), node()])
    assert elastic.num_workers == (1, 2) and elastic.resources_per_worker == {"CPU": 1}
    assert elastic.placement_strategy == "STRICT_SPREAD"
    assert scaling_config(args(2, min_nodes=2), cfg, [node(), node()]).num_workers == 2
    cfg.optim.global_batch = 64  # 16 x 4 ranks on 2 nodes, 16 x 2 x accum 2 on 1
    gpu = scaling_config(args(2), cfg, [node(0), node(8, 2), node(8, 2)])
    assert gpu.num_workers == (2, 4) and gpu.resources_per_worker == {"GPU": 1, "CPU": 4}


def test_min_nodes_out_of_range_or_a_shrunk_world_the_batch_cannot_split_is_refused():
    cfg = get_recipe("digits_tiny")
    with pytest.raises(LaunchError, match="--min-nodes must be between 1 and --nodes 2, got 3"):
        scaling_config(args(2, min_nodes=3), cfg, [node(), node()])
    cfg.optim.global_batch, cfg.data.batch_size = 32, 8  # 4 ranks x 8 = 32, but 3 ranks cannot split 32
    assert scaling_config(args(4), cfg, [node()] * 4).num_workers == (1, 4)  # "scale" re-plans on 3
    cfg.optim.batch_policy = "fixed"
    with pytest.raises(LaunchError, match="--min-nodes 1 lets a node loss shrink the run to 3 node"):
        scaling_config(args(4), cfg, [node()] * 4)
    assert scaling_config(args(4, min_nodes=4), cfg, [node()] * 4).num_workers == 4


def test_workers_that_fit_counts_alive_nodes_like_rays_elastic_policy():
    cfg = get_recipe("digits_tiny")
    scaling = scaling_config(args(2), cfg, [node(2), node(2)])  # 2 CPUs per worker
    assert workers_that_fit(scaling, [node(0), node(2), node(2)]) == 2
    assert workers_that_fit(scaling, [node(2), node(2, alive=False)]) == 1
    assert workers_that_fit(scaling, [node(1), node(5)]) == 2  # 5 // 2 on one node; 1 CPU holds none


def newest_step(run: Path) -> int:
    """The step the trainer would resume from (its own rule, completeness included); -1 before the first."""
    found = find_resume_checkpoint(run / "checkpoints")
    return read_meta(found)["step"] if found else -1


def logged_step(run: Path) -> int:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return max((json.loads(line)["step"] for line in lines if line.strip()), default=-1)


@pytest.fixture(scope="module")
def cluster(shared_cluster):
    """The session's job cluster, and its `cluster/local.sh --dir DIR` command. The test leaves worker2
    dead: the next module's `shared_cluster` restarts it."""
    return shared_cluster, local_sh(Path(shared_cluster.state["dir"]))


@pytest.mark.slow
def test_node_loss_run_goes_on_with_the_node_left_and_up_restarts_only_the_dead_node(cluster):
    cluster, local = cluster
    run = cluster.storage / "lost"
    try:
        sid = cluster.submit("lost", *RUN, env=RESIZE_CHECK)
    except subprocess.CalledProcessError as e:  # e.g. another cluster holds the dashboard agent's port
        pytest.fail(f"ray job submit failed: {e.stderr.decode()[-2000:]}")
    # Mid-interval: steps 21-25 are done but not saved.
    assert cluster.wait(sid, until=lambda: logged_step(run) >= 25) == JobStatus.RUNNING, cluster.logs(sid)[-3000:]
    first_id = json.loads((run / "checkpoints/step_00000020/meta.json").read_text())["mlflow_run_id"]

    killed_at, step_at_kill = time.monotonic(), logged_step(run)
    kill_groups([cluster.state["pgids"]["worker2"]], grace_s=0)  # the node's raylet, agents and workers
    newest_at_kill = newest_step(run)

    def resumed() -> list[tuple[int, int]]:
        """(world size, step) of each restart (Ray's print patch shows every trainer line twice)."""
        found = re.findall(r"\(RayTrainWorker pid=(\d+)\).*: world (\d+) x .*resuming from \S*step_(\d{8})",
                           cluster.logs(sid))
        return [(int(world), int(step)) for _, world, step in dict.fromkeys(found)]

    assert cluster.wait(sid, timeout=400, until=lambda: bool(resumed())) == JobStatus.RUNNING, \
        cluster.logs(sid)[-3000:]
    detect_s = time.monotonic() - killed_at
    [(world, resumed_from)] = resumed()
    assert (world, resumed_from) == (1, newest_at_kill)  # the newest complete step, not an older one Ray had
    assert "world 1 x micro 4 x accum 2 = 8" in cluster.logs(sid)

    # `up` on the cluster with a dead node: that node alone comes back; the head, the other node and the job stay.
    before = dict(cluster.state["pgids"])
    out = subprocess.run([*local, "up", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    after = json.loads(Path(cluster.state["dir"], "state.json").read_text())["pgids"]
    assert {k: after[k] for k in ("head", "worker1", "mlflow")} == {k: before[k] for k in ("head", "worker1", "mlflow")}
    assert after["worker2"] != before["worker2"] and _alive(after["worker2"])
    assert "restarted worker2" in out.stdout and out.stdout.count("restarted") == 1
    assert LocalCluster._alive_nodes(cluster.state) == 3
    assert cluster.client.get_job_status(sid) in (JobStatus.RUNNING, JobStatus.SUCCEEDED)

    assert cluster.wait(sid, timeout=600) == JobStatus.SUCCEEDED, cluster.logs(sid)[-3000:]
    # Grown back onto the restarted node, from a checkpoint after the first resume, to the last step.
    [_, (world, grown_from)] = resumed()
    assert world == 2 and grown_from > resumed_from, cluster.logs(sid)[-3000:]
    meta = json.loads((run / f"checkpoints/step_{STEPS:08d}/meta.json").read_text())
    assert meta["step"] == STEPS and meta["world_size"] == 2 and meta["mlflow_run_id"] == first_id
    client = mlflow.MlflowClient(cluster.state["mlflow"])
    [r] = client.search_runs([client.get_experiment_by_name("digits_tiny").experiment_id],
                             "attributes.run_name = 'lost'")
    assert r.info.run_id == first_id and r.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(first_id, "train/loss")]
    assert set(range(1, STEPS + 1)) <= set(steps)

    # Below --min-nodes the run fails within a bound, with one message, instead of waiting for ever.
    sid = cluster.submit("short", "--min-nodes", "2", *RUN, env={"DEEPSPIKE_NODE_WAIT_S": "15"})
    short = cluster.storage / "short"
    assert cluster.wait(sid, until=lambda: newest_step(short) >= 10) == JobStatus.RUNNING, cluster.logs(sid)[-3000:]
    killed_at = time.monotonic()
    kill_groups([after["worker2"]], grace_s=0)
    assert cluster.wait(sid, timeout=300) == JobStatus.FAILED, cluster.logs(sid)[-3000:]
    fail_s = time.monotonic() - killed_at
    errors = [line for line in cluster.logs(sid).splitlines() if line.startswith("error:")]
    assert errors == ["error: the alive nodes held fewer than the 2 workers this run needs (--min-nodes) for 15 s; "
                      "the run stops. Resubmit with --run-name short to resume from its newest checkpoint."]
    assert fail_s < 120
    print(f"\n[node-loss] below --min-nodes: failed {fail_s:.1f} s after the kill (wait 15 s)")
    print(f"\n[node-loss] kill to resumed training {detect_s:.1f} s; killed at step {step_at_kill}, resumed "
          f"from {resumed_from}: {step_at_kill - resumed_from} steps recomputed; grew back from step "
          f"{grown_from}")
