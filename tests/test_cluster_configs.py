"""The cluster configs that cannot be started here (AWS, KubeRay), checked at the schema level: they
parse, carry the keys their tools require, and agree with each other, the image, the pins and the README.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from launch.common import build_parser

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def pin(package: str) -> str:
    [version] = re.findall(rf"^{package}==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    return version


def dockerfile() -> dict[str, str]:
    text = (CLUSTER / "Dockerfile").read_text()
    return {"from": re.search(r"^FROM (\S+)$", text, re.M).group(1),
            "workdir": re.search(r"^WORKDIR (\S+)$", text, re.M).group(1),
            "storage": re.search(r"^ENV DEEPSPIKE_STORAGE=(\S+)$", text, re.M).group(1), "text": text}


@pytest.fixture(scope="module")
def kuberay() -> dict[str, dict]:
    docs = {}
    for name in ("raycluster.yaml", "rayjob.yaml"):
        for doc in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()):
            docs[doc["kind"]] = doc
    return docs


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def launcher_args(command: str) -> tuple[str, list[str]]:
    """`python launch/X.py ARGS` -> (script, ARGS), failing unless the script exists."""
    python, script, *args = shlex.split(command)
    assert python == "python" and (ROOT / script).is_file(), command
    return script, args


def test_image_is_ray_of_the_pinned_version_with_the_checkout_installed_by_make():
    d = dockerfile()
    assert d["from"] == f"rayproject/ray:{pin('ray')}-py311-gpu"
    assert "make TRAINING_ONLY=1 VENV=/home/ray/anaconda3 /home/ray/anaconda3/.deepspike-installed" in d["text"]
    assert "$(VENV)/.deepspike-installed" in (ROOT / "Makefile").read_text()  # the target make builds


def test_readme_command_runs_on_the_kuberay_cluster(kuberay):
    readme = (ROOT / "README.md").read_text()
    assert "ray job submit -- python launch/imagenet.py --nodes 4" in readme
    job, cluster = kuberay["RayJob"], kuberay["RayCluster"]
    assert job["apiVersion"] == cluster["apiVersion"] == "ray.io/v1"
    script, args = launcher_args(job["spec"]["entrypoint"])
    assert job["spec"]["entrypoint"].startswith("python launch/imagenet.py --nodes 4")
    flags = build_parser("ms_resnet104_imagenet").parse_args(args)  # the launcher's own parser
    [workers] = cluster["spec"]["workerGroupSpecs"]
    assert flags.nodes == workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"]
    assert flags.run_name  # a fixed name: re-applying the job resumes the run
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert job["spec"]["submissionMode"] in {"K8sJobMode", "HTTPMode", "SidecarMode"}
    assert "runtimeEnvYAML" not in job["spec"]  # the code is in the image


def test_raycluster_pods(kuberay):
    cluster = kuberay["RayCluster"]["spec"]
    assert cluster["rayVersion"] == pin("ray")
    head, [workers] = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    d = dockerfile()
    images = set()
    for template in (head["template"], workers["template"]):
        [c] = containers(template)
        images.add(c["image"])
        assert c["workingDir"] == d["workdir"]  # where `python launch/imagenet.py` resolves
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert d["storage"].startswith(mounts["cluster-storage"] + "/")
        assert env(c) == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "DEEPSPIKE_STORAGE": d["storage"]}
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims == {"cluster-storage": "cluster-storage"}
    [worker] = containers(workers["template"])
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    [mlflow] = containers(kuberay["Deployment"]["spec"]["template"])
    assert mlflow["command"][:2] == ["cluster/mlflow/server.sh", "run"]
    assert os.access(CLUSTER / "mlflow/server.sh", os.X_OK)
    assert images == {mlflow["image"]}
    assert kuberay["Service"]["metadata"]["name"] == "mlflow"
    assert kuberay["Service"]["spec"]["ports"][0]["port"] == 5000


def test_aws_cluster_launcher_config(kuberay):
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "docker", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    head, [worker] = types[cfg["head_node_type"]], [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert worker["min_workers"] == worker["max_workers"] == cfg["max_workers"] == 4  # README: --nodes 4
    assert re.fullmatch(r"p4d\.24xlarge|p5\.48xlarge|g\d\w*\.\w+", worker["node_config"]["InstanceType"])
    # The same image as the KubeRay pods, the shared volume passed into the containers.
    [k8s_image] = {c["image"] for c in containers(kuberay["RayCluster"]["spec"]["headGroupSpec"]["template"])}
    assert cfg["docker"]["image"] == k8s_image
    d = dockerfile()
    assert "-v /mnt/cluster_storage:/mnt/cluster_storage" in cfg["docker"]["run_options"]
    assert d["storage"].startswith("/mnt/cluster_storage/")
    # Ray starts in the checkout (so the launchers resolve) with the tracking server exported.
    home = d["workdir"].replace("/home/ray", "~")
    head_cmds, worker_cmds = cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]
    starts = [c for c in head_cmds + worker_cmds if "ray start" in c]
    assert len(starts) == 2
    for cmd in starts:
        assert cmd.startswith(f"cd {home} && export MLFLOW_TRACKING_URI=http://") and ":5000" in cmd
    assert "--num-cpus=0" in starts[0] and "--head" in starts[0]
    assert any("cluster/mlflow/server.sh run /mnt/cluster_storage/mlflow" in c for c in head_cmds)


# A URI with a password in it ("scheme://user:password@host"), which would show in `ps` and in logs.
PASSWORD_IN_URI = re.compile(r"://[^/@\s:]+:[^/@\s]+@")


def allowed_by_mlflow(allowed_hosts: str | None, tracking_uri: str) -> bool:
    """Whether MLflow's server, given MLFLOW_ALLOWED_HOSTS (None: its default), answers this client."""
    from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header

    hosts = [h.strip() for h in allowed_hosts.split(",")] if allowed_hosts else get_default_allowed_hosts()
    return is_allowed_host_header(hosts, urlsplit(tracking_uri).netloc)


def ui_allowed_by_mlflow(allowed_origins: str | None, page: str) -> bool:
    """Whether MLflow's server, given MLFLOW_CORS_ALLOWED_ORIGINS (None: its default), answers the UI's POST
    requests (runs search, logged models) from a page served at this address."""
    from mlflow.server.security_utils import should_block_cors_request

    origins = [o.strip() for o in allowed_origins.split(",")] if allowed_origins else None
    return not should_block_cors_request(page, "POST", origins)


def test_mlflow_server_takes_its_allowed_hosts_and_origins_from_the_environment():
    script = (CLUSTER / "mlflow/server.sh").read_text()
    assert '${MLFLOW_ALLOWED_HOSTS:+--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"}' in script
    assert '${MLFLOW_CORS_ALLOWED_ORIGINS:+--cors-allowed-origins "$MLFLOW_CORS_ALLOWED_ORIGINS"}' in script
    usage = subprocess.run([sys.executable, "-m", "mlflow", "server", "--help"], capture_output=True, text=True,
                           check=True).stdout
    assert "--allowed-hosts" in usage and "--cors-allowed-origins" in usage


def test_kuberay_mlflow_answers_the_pods_and_keeps_its_password_off_the_command_line(kuberay):
    # MLflow 3's default allowed hosts (localhost, private IPs) refuse the Service name with 403.
    uri = env(containers(kuberay["RayCluster"]["spec"]["headGroupSpec"]["template"])[0])["MLFLOW_TRACKING_URI"]
    assert not allowed_by_mlflow(None, uri)
    [mlflow] = containers(kuberay["Deployment"]["spec"]["template"])
    mlflow_env = {e["name"]: e for e in mlflow["env"]}
    allowed = mlflow_env["MLFLOW_ALLOWED_HOSTS"]["value"]
    for client in (uri, "http://mlflow.default.svc.cluster.local:5000", "http://localhost:5000"):
        assert allowed_by_mlflow(allowed, client), client
    assert not allowed_by_mlflow(allowed, "http://evil.example:5000")
    # The UI through `kubectl port-forward svc/mlflow 5000:5000` (the documented path) and from a browser
    # inside the cluster; MLflow's default lets only the first in.
    origins = mlflow_env["MLFLOW_CORS_ALLOWED_ORIGINS"]["value"]
    for page in ("http://localhost:5000", uri, "http://mlflow.default.svc.cluster.local:5000"):
        assert ui_allowed_by_mlflow(origins, page), page
    assert not ui_allowed_by_mlflow(None, uri)
    assert not ui_allowed_by_mlflow(origins, "http://evil.example:5000")
    assert "kubectl port-forward svc/mlflow 5000:5000" in (CLUSTER / "kuberay/raycluster.yaml").read_text()
    for name in ("MLFLOW_BACKEND_STORE_URI", "PGPASSWORD"):
        assert mlflow_env[name]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    assert not PASSWORD_IN_URI.search(yaml.safe_dump_all(kuberay.values()))


def test_kuberay_cluster_has_ray_token_auth(kuberay):
    auth = kuberay["RayCluster"]["spec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    # The set-up steps create that Secret with the key Ray reads.
    assert f"create secret generic {auth['secretName']} --from-literal=auth_token=" in (
        CLUSTER / "kuberay/raycluster.yaml").read_text()


def test_aws_cluster_has_token_auth_allowed_hosts_and_no_password_on_a_command_line():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    for cmd in starts:
        assert "RAY_AUTH_MODE=token" in cmd.split("ray start")[0], cmd
    [server] = [c for c in cfg["head_start_ray_commands"] if "server.sh run" in c]
    assert "MLFLOW_ALLOWED_HOSTS=$(hostname -I | awk '{print $1}'):5000" in server  # the jobs' URI
    assert "MLFLOW_TRACKING_URI=http://$(hostname -I | awk '{print $1}'):5000" in starts[0]
    # The UI through `ray attach -p 5000` (the documented path) and at the head's address inside the VPC.
    # The head's shell expands `hostname -I` to its private address, say 10.0.3.7.
    head = "http://10.0.3.7:5000"
    [origins] = re.findall(r"MLFLOW_CORS_ALLOWED_ORIGINS=(\S+)",
                           server.replace("$(hostname -I | awk '{print $1}')", "10.0.3.7"))
    for page in ("http://localhost:5000", head):
        assert ui_allowed_by_mlflow(origins, page), page
    assert not ui_allowed_by_mlflow(None, head) and not ui_allowed_by_mlflow(origins, "http://10.0.3.8:5000")
    assert "ray attach cluster/aws.yaml -p 5000" in (CLUSTER / "aws.yaml").read_text()
    assert "PGPASSFILE=" in server
    assert not PASSWORD_IN_URI.search(yaml.safe_dump(cfg))
