"""What the three launchers share: a small, frozen set of flags, validation before any resource is
requested, and the hand-off of `trainer.train.train` to Ray Train.

Resume rules: the same --run-name under the same --storage continues that run from the trainer's newest
complete step directory; a new name starts fresh; --no-resume first moves an existing run of that name
aside. The run directory is `<storage>/<run name>`, Ray's experiment directory too. There is one
checkpoint store, the trainer's `checkpoints/step_XXXXXXXX/`. Ray receives each save's metrics and a
reference to it, `ray_refs/step_XXXXXXXX/checkpoint.json`, registered where it lies without an upload.
The reference, not the step directory, is what Ray registers: Ray deletes what it evicts and refuses
to restore a run whose registered checkpoints are gone, while the trainer prunes its own (keeping the
best one too). With an s3:// storage the run directory lies elsewhere and Ray gets the metrics only.

Node loss: the worker group is elastic between --min-nodes and --nodes (Ray Train v2's
`ScalingConfig(num_workers=(min, max))`). A lost node fails the group; Ray restarts it on the nodes that
are left, from the trainer's newest complete step (the trainer resumes exactly across world sizes), and
grows it back, again from a checkpoint, once a node returns (checked every RESIZE_CHECK_S). Below
--min-nodes Ray would wait for nodes for ever, so the launcher fails the run after NODE_WAIT_S with one
message, and worker-group start-up failures count against a finite limit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import ray
import ray.train
from ray.train import CheckpointConfig, CheckpointUploadMode, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer, get_device

from dataloaders.manifest import is_remote, manifest_rel
from trainer.batch_setting import BatchSetting, batch_setting
from trainer.config import TrainConfig, apply_overrides, from_dict, to_dict
from trainer.deepspeed_config import deepspeed_config
from trainer.distributed import process_group_backend
from trainer.recipes import get_recipe
from trainer.run_record import git_commit, local_store_uri
from trainer.set_aside import set_aside

ROOT = Path(__file__).resolve().parents[1]
# Worker-group restarts Ray may do after crashes before the run fails, each from a checkpoint; also the
# limit on failed worker-group start-ups (each waits up to Ray's 60 s), which Ray would retry for ever.
MAX_FAILURES = 3
# Seconds a run may have fewer than --min-nodes usable nodes before it fails: long enough for a lost
# node to come back (`cluster/local.sh up` restarts one in ~10 s, a cloud replacement takes minutes),
# short enough that a job never sits stuck without a word. $DEEPSPIKE_NODE_WAIT_S overrides it.
NODE_WAIT_S = float(os.environ.get("DEEPSPIKE_NODE_WAIT_S", 180))
# How often a healthy elastic run checks whether more nodes fit (Ray's default, 60 s): growing restarts
# the group from the newest checkpoint, so more often would recompute more steps.
# $DEEPSPIKE_RESIZE_CHECK_S overrides it.
RESIZE_CHECK_S = float(os.environ.get("DEEPSPIKE_RESIZE_CHECK_S", 60))
REFS, REF_FILE = "ray_refs", "checkpoint.json"


class LaunchError(ValueError):
    """Bad flags or a cluster that cannot run them: printed as one line, exit code 2."""


def build_parser(default_recipe: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train an MS-ResNet with Ray Train (see launch/common.py).")
    p.add_argument("--nodes", type=int, default=1, help="nodes to train on (default 1)")
    p.add_argument("--min-nodes", type=int, default=1,
                   help="fewest nodes the run goes on with after a node loss (default 1: any that are left)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPU workers per node; 0 = one CPU worker per node (default: what the nodes have)")
    p.add_argument("--recipe", default=default_recipe, help=f"trainer recipe (default {default_recipe})")
    p.add_argument("--data", help="converted data set folder or URL (default: the recipe's data.path)")
    p.add_argument("--run-name", help="same name resumes, new name starts fresh (default: recipe-timestamp)")
    p.add_argument("--storage", default=os.environ.get("DEEPSPIKE_STORAGE", "~/ray_results"),
                   help="shared path or s3:// URI for runs (default $DEEPSPIKE_STORAGE or ~/ray_results)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. optim.lr=0.05 checkpoint.every_steps=500")
    p.add_argument("--no-resume", action="store_true", help="move an existing run of this name aside first")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved batch plan for --nodes x --gpus-per-node as `plan {json}` and exit; "
                        "starts and contacts no cluster")
    return p


def parse_args(argv: list[str] | None, default_recipe: str) -> argparse.Namespace:
    return build_parser(default_recipe).parse_args(argv)


def build_config(args: argparse.Namespace, datasets: tuple[str, ...]) -> TrainConfig:
    """Recipe + overrides + data + run name + storage, checked without touching the cluster."""
    if args.nodes < 1:
        raise LaunchError(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node is not None and args.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node must be >= 0, got {args.gpus_per_node}")
    try:
        cfg = get_recipe(args.recipe)
    except KeyError as e:
        raise LaunchError(e.args[0]) from None
    if cfg.data.dataset not in datasets:
        raise LaunchError(f"recipe {args.recipe!r} trains on {cfg.data.dataset!r}; this launcher runs "
                          f"{'/'.join(datasets)} recipes")
    try:
        apply_overrides(cfg, args.overrides)
        cfg.data.validate()
    except (KeyError, TypeError, ValueError) as e:
        raise LaunchError(str(e.args[0] if isinstance(e, KeyError) else e)) from None
    # Ray Train workers run in their own working directory: every local path must be absolute.
    data = args.data or cfg.data.path
    if not is_remote(data):
        data = str(Path(data).expanduser().resolve())
        if not (Path(data) / manifest_rel("train", cfg.data.format)).is_file():
            raise LaunchError(f"data path {data} holds no converted {cfg.data.format} train split "
                              f"({manifest_rel('train', cfg.data.format)}); make one with python -m "
                              f"dataloaders.convert {cfg.data.dataset} --out {data} --format {cfg.data.format}")
    cfg.data.path = data
    cfg.run_name = args.run_name or f"{args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    if "/" in cfg.run_name or cfg.run_name.startswith("."):
        raise LaunchError(f"--run-name {cfg.run_name!r} must be a plain name (no '/', no leading '.')")
    cfg.mlflow.tracking_uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if is_remote(args.storage):
        if args.no_resume:
            raise LaunchError(f"--no-resume cannot move a run aside in {args.storage}; pick a new --run-name")
        if not cfg.run_dir:
            raise LaunchError(f"with --storage {args.storage}, the trainer still needs a shared filesystem: "
                              "add --set run_dir=/shared/path/RUN")
    else:
        if cfg.run_dir:
            raise LaunchError(f"run_dir={cfg.run_dir} cannot be set here: a run lives in "
                              "<storage>/<run name>; use --storage and --run-name")
        args.storage = str(Path(args.storage).expanduser().resolve())
        cfg.run_dir = str(Path(args.storage) / cfg.run_name)
        # Without a tracking server the runs still land in one shared place, next to the checkpoints.
        cfg.mlflow.tracking_uri = cfg.mlflow.tracking_uri or local_store_uri(args.storage)
    return cfg


def check_batch(cfg: TrainConfig, world: int, on_gpu: bool | None = None) -> BatchSetting:
    """The trainer's own batch setting (trainer/batch_setting.py), made before any worker is requested; with
    `on_gpu` known, the DeepSpeed config the workers will build from it is checked too."""
    try:
        batch = batch_setting(cfg.optim, cfg.data.batch_size, world)
    except ValueError as e:
        raise LaunchError(f"{e}. --nodes and --gpus-per-node set the number of ranks.") from None
    if on_gpu is not None:
        try:
            deepspeed_config(cfg, batch, on_gpu)
        except (OSError, ValueError) as e:
            raise LaunchError(str(e)) from None
    return batch


def dry_run(args: argparse.Namespace, datasets: tuple[str, ...]) -> dict:
    """What a launch would train, from the flags alone: no cluster is started or asked."""
    if args.gpus_per_node is None:
        raise LaunchError("--dry-run needs --gpus-per-node (0 = one CPU worker per node): without a cluster "
                          "the number of ranks is not known")
    cfg = build_config(args, datasets)
    batch = check_batch(cfg, args.nodes * max(args.gpus_per_node, 1), on_gpu=args.gpus_per_node > 0)
    return {"recipe": cfg.recipe, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node, **batch.to_dict(),
            "data": cfg.data.path, "run_dir": cfg.run_dir, "precision": cfg.engine.precision}


def scaling_config(args: argparse.Namespace, cfg: TrainConfig, nodes: list[dict]) -> ScalingConfig:
    """Check the request against the alive nodes (`ray.nodes()`) and the batch arithmetic of every world
    size the elastic group may shrink to."""
    if not 1 <= args.min_nodes <= args.nodes:
        raise LaunchError(f"--min-nodes must be between 1 and --nodes {args.nodes}, got {args.min_nodes}")
    alive = [n["Resources"] for n in nodes if n["Alive"]]
    gpus = args.gpus_per_node
    if gpus is None:
        gpu_counts = [int(r["GPU"]) for r in alive if r.get("GPU", 0) >= 1]
        gpus = min(gpu_counts) if gpu_counts else 0
    fit = [r for r in alive if (r.get("GPU", 0) >= gpus if gpus else r.get("CPU", 0) >= 1)]
    if len(fit) < args.nodes:
        what = f"{gpus} GPUs" if gpus else "a CPU"
        raise LaunchError(f"--nodes {args.nodes} but the cluster has {len(fit)} node(s) with {what}")
    per_node = max(gpus, 1)
    world = args.nodes * per_node
    check_batch(cfg, world)
    for n in range(args.min_nodes, args.nodes):
        try:
            check_batch(cfg, n * per_node)
        except LaunchError as e:
            raise LaunchError(f"--min-nodes {args.min_nodes} lets a node loss shrink the run to {n} node(s): "
                              f"{e}") from None
    # A fixed size when there is nothing to shrink to; Ray's elastic policy otherwise.
    workers = world if args.min_nodes == args.nodes else (args.min_nodes * per_node, world)
    cpus = int(min(r.get("CPU", 0) for r in fit[: args.nodes]))
    if gpus:
        # Ranks of one node sit together; the node's CPUs feed their data loaders.
        return ScalingConfig(num_workers=workers, use_gpu=True, placement_strategy="PACK",
                             resources_per_worker={"GPU": 1, "CPU": max(cpus // gpus, 1)},
                             elastic_resize_monitor_interval_s=RESIZE_CHECK_S)
    return ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": cpus},
                         placement_strategy="STRICT_SPREAD" if world > 1 else "PACK",
                         elastic_resize_monitor_interval_s=RESIZE_CHECK_S)


def workers_that_fit(scaling: ScalingConfig, nodes: list[dict]) -> int:
    """How many workers the alive nodes (`ray.nodes()`) can hold, counted as Ray's elastic policy does."""
    need = {k: v for k, v in scaling.resources_per_worker.items() if v > 0}
    return sum(int(min(n["Resources"].get(k, 0) // v for k, v in need.items())) for n in nodes if n["Alive"])


class NodeWatch(threading.Thread):
    """Fails the job when the alive nodes hold fewer than the minimum workers for NODE_WAIT_S: Ray's
    elastic policy would wait for nodes for ever, without a word to the user."""

    def __init__(self, scaling: ScalingConfig, run_name: str, wait_s: float = NODE_WAIT_S, poll_s: float = 5.0):
        super().__init__(name="node-watch", daemon=True)
        self.scaling, self.run_name, self.wait_s, self.poll_s = scaling, run_name, wait_s, poll_s

    def run(self) -> None:
        short_since = None
        while True:
            fit = workers_that_fit(self.scaling, ray.nodes())
            now = time.monotonic()
            if fit >= self.scaling.min_workers:
                short_since = None
            elif short_since is None:
                short_since = now
                print(f"[launch] the alive nodes hold {fit} of the {self.scaling.min_workers} workers this run "
                      f"needs at least; waiting up to {self.wait_s:.0f} s for nodes to return", flush=True)
            elif now - short_since >= self.wait_s:
                print(f"error: the alive nodes held fewer than the {self.scaling.min_workers} workers this run "
                      f"needs (--min-nodes) for {self.wait_s:.0f} s; the run stops. Resubmit with --run-name "
                      f"{self.run_name} to resume from its newest checkpoint.", file=sys.stderr, flush=True)
                # The driver's exit ends the job and its Ray actors; no worker is running at this point.
                os._exit(3)
            time.sleep(self.poll_s)


def train_loop(loop_config: dict) -> None:
    """One Ray Train worker: run the trainer in the gloo/nccl group Ray created."""
    from trainer.train import train

    cfg = from_dict(TrainConfig, loop_config["cfg"])
    register = loop_config["register_checkpoints"] and ray.train.get_context().get_world_rank() == 0
    os.environ["DEEPSPIKE_ENTRY_POINT"] = loop_config["entry_point"]  # the run's mlflow.source.name
    os.environ["DEEPSPIKE_GIT_COMMIT"] = loop_config["git_commit"]  # and its mlflow.source.git.commit

    def report(metrics: dict, ckpt_dir: str) -> None:
        # Every rank reports (it is a barrier); rank 0 alone registers the step directory all ranks wrote.
        checkpoint = None
        if register:
            ref = Path(cfg.run_dir) / REFS / Path(ckpt_dir).name
            ref.mkdir(parents=True, exist_ok=True)
            (ref / REF_FILE).write_text(json.dumps({"step_dir": ckpt_dir}))
            checkpoint = ray.train.Checkpoint.from_directory(str(ref))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=Path(ckpt_dir).name,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    if cfg.engine.device == "cuda":  # a GPU worker (launch): the GPU Ray Train gave it, checked by the trainer
        assigned = get_device()
        if assigned.type == "cuda":
            cfg.engine.device = str(assigned)
    if ray.train.get_checkpoint() is not None:
        # A restart after a failure, or a resubmitted run name. Not from Ray's reference: a node that dies
        # right after a save takes that save's report with it, so the trainer's newest step is newer.
        cfg.checkpoint.resume, cfg.checkpoint.auto_resume = None, True
    train(cfg, report=report)


def _runtime_env() -> dict:
    """Ship this checkout to every worker, unless the job was submitted with its own working_dir."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    if job.get("working_dir"):
        return {}
    # Ray leaves out .git and everything .gitignore lists (the venv, data/, runs/).
    return {"working_dir": str(ROOT)}


def launch(args: argparse.Namespace, datasets: tuple[str, ...]) -> ray.train.Result:
    cfg = build_config(args, datasets)
    if args.gpus_per_node is not None:  # the world size is known without asking the cluster
        check_batch(cfg, args.nodes * max(args.gpus_per_node, 1))
    ray.init(runtime_env=_runtime_env())
    scaling = scaling_config(args, cfg, ray.nodes())
    batch = check_batch(cfg, scaling.max_workers, on_gpu=scaling.use_gpu)
    if scaling.use_gpu and cfg.engine.device == "auto":
        cfg.engine.device = "cuda"  # a worker whose GPU torch cannot use stops instead of training on its CPU
    print(f"[launch] plan {json.dumps(batch.to_dict())}", flush=True)
    if args.no_resume and (aside := set_aside(Path(cfg.run_dir))):
        print(f"[launch] --no-resume: moved the earlier run to {aside}", flush=True)
    kind = "GPU" if scaling.use_gpu else "CPU"
    shrink = f" (at least {args.min_nodes} after a node loss)" if args.min_nodes < args.nodes else ""
    print(f"[launch] {cfg.run_name}: {scaling.max_workers} {kind} workers on {args.nodes} node(s){shrink}; storage "
          f"{args.storage}; data {cfg.data.path}; MLflow {cfg.mlflow.tracking_uri}", flush=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": to_dict(cfg), "register_checkpoints": not is_remote(args.storage),
                           "entry_point": " ".join(["python", *sys.argv]), "git_commit": git_commit()},
        scaling_config=scaling,
        torch_config=TorchConfig(backend=process_group_backend(scaling.use_gpu, cfg.engine.backend)),
        run_config=RunConfig(name=cfg.run_name, storage_path=args.storage,
                             failure_config=FailureConfig(max_failures=MAX_FAILURES,
                                                          controller_failure_limit=MAX_FAILURES),
                             # Only the newest reference is needed: resume never reads one.
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    NodeWatch(scaling, cfg.run_name).start()
    if cfg.mlflow.enabled:
        import mlflow  # now: importing it takes seconds, and a stopped job has 3 in all

        client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
        signal.signal(signal.SIGTERM, lambda signum, _: stopped(client, cfg, signum))
    result = trainer.fit()
    m = result.metrics or {}
    step_dir = json.loads((Path(result.checkpoint.path) / REF_FILE).read_text())["step_dir"] \
        if result.checkpoint else None
    print(f"[launch] done: step {m.get('step')}, test top-1 {m.get('val/top1')}, checkpoint "
          f"{step_dir}; MLflow {cfg.mlflow.tracking_uri} "
          f"experiment {cfg.mlflow.experiment or cfg.recipe}, run {cfg.run_name}", flush=True)
    if cfg.mlflow.enabled and (links := run_links(cfg.mlflow.tracking_uri, cfg.mlflow.experiment or cfg.recipe,
                                                  cfg.run_name)):
        print(f"[launch] MLflow run: {links['run']}\n[launch] MLflow runs side by side: {links['charts']}",
              flush=True)
    return result


def stopped(client, cfg: TrainConfig, signum: int) -> None:
    """`ray job stop`: Ray sends the driver SIGTERM and SIGKILL 3 s later, and the workers die with it before
    the trainer can end its MLflow run, which would show RUNNING for ever. The driver marks it KILLED (what
    MLflow shows for a stopped run) and exits; resubmitting the run name resumes that same run."""
    print("[launch] stop requested", flush=True)
    # Within the 3 s: one attempt per request, no retries.
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"], os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "0", "2"
    try:
        _, run = newest_run(client, cfg.mlflow.experiment or cfg.recipe, cfg.run_name)
        if run is not None and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")
            print(f"[launch] stopped: MLflow run {run.info.run_id} marked KILLED", flush=True)
    except Exception as e:  # the job is being stopped either way; say why the status stays as it was
        print(f"[launch] stopped; MLflow status not updated ({type(e).__name__}: {str(e)[:200]})", flush=True)
    sys.exit(128 + signum)


def newest_run(client, experiment: str, run_name: str) -> tuple:
    """(experiment, its newest run of that name), each None where there is none."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1) if exp else []
    return exp, (runs[0] if runs else None)


def run_links(tracking_uri: str, experiment: str, run_name: str) -> dict[str, str] | None:
    """`ui_links` of the newest run of that name, or None when the store cannot say (no link beats a wrong one)."""
    import mlflow

    from trainer.mlflow_logger import ui_links

    try:
        exp, run = newest_run(mlflow.MlflowClient(tracking_uri), experiment, run_name)
    except Exception as e:  # the job itself succeeded; an unreachable tracking server must not fail it
        print(f"[launch] MLflow links unavailable ({type(e).__name__}: {str(e)[:200]})", flush=True)
        return None
    return ui_links(tracking_uri, exp.experiment_id, run.info.run_id) if run else None


def main(default_recipe: str, datasets: tuple[str, ...], argv: list[str] | None = None) -> None:
    args = parse_args(argv, default_recipe)
    try:
        if args.dry_run:
            print(f"plan {json.dumps(dry_run(args, datasets))}", flush=True)
            return
        launch(args, datasets)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
