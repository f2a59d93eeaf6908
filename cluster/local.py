"""A real multi-node Ray cluster plus an MLflow tracking server on one machine (development, tests, demo).

    cluster/local.sh up 2                        # head + 2 workers + MLflow (sqlite); reuses a running one
    cluster/local.sh up 2 --mlflow-backend postgres
    eval "$(cluster/local.sh env)"               # RAY_ADDRESS, MLFLOW_TRACKING_URI for `ray job submit`
    ray job submit -- python launch/cifar10.py --nodes 2 --recipe digits_demo --data data/digits16
    cluster/local.sh status
    cluster/local.sh up 2                        # again after a node died: restarts that node only
    cluster/local.sh down                        # stops everything; logs, mlflow.db and artifacts stay in DIR

Every node is its own raylet with its own loopback address (head 127.0.0.2, workers .3, .4, ...) and a
custom resource {"simnodeK": 1}. Ray >= 2.60 replaces 127.0.0.1 by the machine's routable address (stack
notes §3) but leaves the rest of 127/8 alone, so all cluster traffic stays on loopback. The head has no
CPUs, like a real head node, so training workers land on the worker nodes only. Jobs see
MLFLOW_TRACKING_URI (this server) and DEEPSPIKE_STORAGE (DIR/storage, the launchers' default --storage),
as a real cluster's node image would set them. Each node and the MLflow server run in their own process
group, recorded in DIR/state.json and stopped by those ids only: `ray stop` would kill every Ray instance
on the machine. `up` on a cluster whose head lives restarts only the dead worker nodes (or MLflow
server), with the arguments they first had; the head, the other nodes and the running jobs stay.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _wait(what: str, ok, proc: subprocess.Popen | None, log: Path, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; last log lines:\n"
                               + "\n".join(log.read_text().splitlines()[-15:]))
        try:
            if ok():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s; see {log}")


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_groups(pgids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM these process groups and all their descendants (job entrypoints start their own
    sessions), then SIGKILL whatever is left after `grace_s`."""
    procs = {}
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in pgids:
                procs[p.pid] = p
                procs.update({c.pid: c for c in p.children(recursive=True)})
        except (ProcessLookupError, psutil.Error):
            pass
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.terminate()
    # Ray's agents ignore SIGTERM once their raylet is gone (stack notes §3), hence the SIGKILL pass.
    _, left = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=5)


class LocalCluster:
    def __init__(self, root: str | Path):
        self.dir = Path(root).resolve()
        self.state_file = self.dir / "state.json"

    def state(self) -> dict | None:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else None

    @staticmethod
    def dead(st: dict) -> list[str]:
        """The recorded processes (head, workerK, mlflow) whose process group is gone."""
        return [name for name, g in st["pgids"].items() if not _alive(g)]

    def head_alive(self) -> bool:
        st = self.state()
        return bool(st) and _alive(st["pgids"]["head"])

    def up(self, workers: int, host: str = "127.0.0.2", ray_port: int = 6390, dashboard_port: int = 8265,
           mlflow_port: int = 5000, mlflow_backend: str = "sqlite", pg_port: int = 5433,
           cpus_per_node: int = 1) -> dict:
        if workers < 1:
            raise ValueError("a local cluster needs at least one worker node")
        st = self.state()
        if self.head_alive():
            if st["workers"] != workers:
                raise RuntimeError(f"a cluster with {st['workers']} worker nodes is up in {self.dir}; "
                                   "run `cluster/local.sh down` first")
            return self._restart_dead(st)
        if st:
            self.down()  # the head is gone, and with it the cluster and its jobs: clear the remains first
        ips = [str(ipaddress.ip_address(host) + i) for i in range(workers + 1)]
        if not all(ipaddress.ip_address(ip).is_loopback for ip in ips):
            raise ValueError(f"node addresses must stay in 127.0.0.0/8, got {ips[0]}..{ips[-1]}")
        for h, p in [(ips[0], ray_port), (ips[0], dashboard_port), ("127.0.0.1", mlflow_port)]:
            if not _free(h, p):
                raise RuntimeError(f"port {h}:{p} is in use; pick another with the --*-port options")
        self.dir.mkdir(parents=True, exist_ok=True)
        # Unix socket paths must stay under 107 bytes, so Ray's session files get a short path.
        ray_tmp = f"/tmp/deepspike-ray-{ray_port}"
        # What a real cluster's node image would set: jobs find the tracking server and shared storage.
        # Auth mode is explicit because `ray start --head` turns token auth on by itself once any local
        # `ray.init()` has left a ~/.ray/auth_token, while `ray start --address` does not: the workers
        # could not join. A loopback development cluster runs without tokens.
        env = dict(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                   RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", DS_ACCELERATOR="cpu",
                   MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_port}",
                   DEEPSPIKE_STORAGE=str(self.dir / "storage"))
        # argv and env are kept so that `up` can restart a dead node exactly as it first started.
        st = {"dir": str(self.dir), "workers": workers, "ips": ips, "ray_tmp": ray_tmp,
              "ray_address": f"{ips[0]}:{ray_port}", "dashboard": f"http://{ips[0]}:{dashboard_port}",
              "mlflow": f"http://127.0.0.1:{mlflow_port}", "mlflow_backend": mlflow_backend, "pgids": {},
              "argv": {}, "env": {}}
        common = ["--object-store-memory=200000000", "--disable-usage-stats"]
        try:
            # MLflow starts beside the Ray nodes (its start-up is mostly imports). The nodes start one by
            # one: concurrent `ray start`s on one host race for the same socket names in the session dir.
            mlflow_log = self.dir / "mlflow.log"
            mlflow = self._spawn(st, "mlflow", ["bash", str(ROOT / "cluster/mlflow/server.sh"), "run",
                                                str(self.dir / "mlflow")],
                                 dict(env, MLFLOW_PORT=str(mlflow_port), MLFLOW_BACKEND=mlflow_backend,
                                      PG_PORT=str(pg_port)))
            for i, ip in enumerate(ips):
                argv = [str(BIN / "ray"), "start", f"--node-ip-address={ip}", *common,
                        f"--resources={json.dumps({f'simnode{i}': 1})}"]
                if i == 0:
                    argv += ["--head", f"--port={ray_port}", f"--temp-dir={ray_tmp}", "--num-cpus=0",
                             f"--dashboard-host={ip}", f"--dashboard-port={dashboard_port}"]
                else:
                    # One log monitor per host: the nodes share the session's log folder.
                    argv += [f"--address={st['ray_address']}", f"--num-cpus={cpus_per_node}",
                             "--include-log-monitor=false"]
                self._start_node(st, "head" if i == 0 else f"worker{i}", argv, env)
            _wait("MLflow server", lambda: _get(st["mlflow"] + "/health") == b"OK", mlflow, mlflow_log)
            _wait(f"{workers + 1} Ray nodes", lambda: self._alive_nodes(st) == workers + 1, None,
                  self.dir / "head.log")
        except BaseException:
            self.down()
            raise
        return st

    def _start_node(self, st: dict, name: str, argv: list[str], env: dict[str, str]) -> None:
        if self._spawn(st, name, argv, env).wait(timeout=120) != 0:
            raise RuntimeError(f"`ray start` for {name} failed; see {self.dir / name}.log")

    def _restart_dead(self, st: dict) -> dict:
        """Restart the dead worker nodes and MLflow server of a cluster whose head lives; nothing else is
        touched, so running jobs go on (and an elastic run grows back onto the restarted nodes)."""
        dead = self.dead(st)
        if dead and "argv" not in st:
            raise RuntimeError(f"{', '.join(dead)} died, and {self.state_file} predates restarts; "
                               "run `cluster/local.sh down` and `up` again")
        for name in dead:
            # Ray's agents can outlive their raylet (stack notes §3): clear the node's remains first.
            _kill_groups([st["pgids"][name]], grace_s=2)
            argv, env = st["argv"][name], st["env"][name]
            if name == "mlflow":
                proc = self._spawn(st, name, argv, env)
                _wait("MLflow server", lambda: _get(st["mlflow"] + "/health") == b"OK", proc,
                      self.dir / "mlflow.log")
            else:
                self._start_node(st, name, argv, env)
            print(f"restarted {name}", flush=True)
        if dead:
            _wait(f"{st['workers'] + 1} Ray nodes", lambda: self._alive_nodes(st) == st["workers"] + 1, None,
                  self.dir / "head.log")
        return st

    def _save(self, st: dict) -> None:
        self.state_file.write_text(json.dumps(st, indent=2))

    def _spawn(self, st: dict, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Start `argv` in its own session (so its process group id is its pid) and record that id, with
        the command and the environment it added to this one's."""
        with open(self.dir / f"{name}.log", "ab") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, **env),
                                    cwd=ROOT, start_new_session=True)
        st["pgids"][name] = proc.pid
        st["argv"][name], st["env"][name] = argv, env
        self._save(st)
        return proc

    @staticmethod
    def _alive_nodes(st: dict) -> int:
        nodes = json.loads(_get(st["dashboard"] + "/api/v0/nodes?limit=1000"))["data"]["result"]["result"]
        return sum(n["state"] == "ALIVE" for n in nodes)

    def down(self) -> None:
        st = self.state()
        if not st:
            return
        _kill_groups(list(st["pgids"].values()))
        if st.get("mlflow_backend") == "postgres":
            subprocess.run(["bash", str(ROOT / "cluster/mlflow/server.sh"), "stop", str(self.dir / "mlflow")],
                           check=True)
        self.state_file.unlink()


def env_lines(st: dict) -> str:
    # `ray job submit` reads RAY_API_SERVER_ADDRESS first; ray.init() and `ray status` use RAY_ADDRESS.
    return (f"export RAY_API_SERVER_ADDRESS={st['dashboard']}\n"
            f"export RAY_ADDRESS={st['ray_address']}\n"
            f"export MLFLOW_TRACKING_URI={st['mlflow']}\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="cluster/local.sh", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["up", "down", "status", "env"])
    ap.add_argument("workers", nargs="?", type=int, default=2, help="worker nodes besides the head (up)")
    ap.add_argument("--dir", default=str(ROOT / "runs/cluster"), help="state, logs and MLflow data")
    ap.add_argument("--host", default="127.0.0.2", help="head address; workers take the next ones")
    ap.add_argument("--ray-port", type=int, default=6390)
    ap.add_argument("--dashboard-port", type=int, default=8265)
    ap.add_argument("--mlflow-port", type=int, default=5000)
    ap.add_argument("--mlflow-backend", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--pg-port", type=int, default=5433)
    ap.add_argument("--cpus-per-node", type=int, default=1)
    a = ap.parse_args(argv)
    cluster = LocalCluster(a.dir)
    if a.command == "up":
        reused = cluster.head_alive()
        st = cluster.up(a.workers, a.host, a.ray_port, a.dashboard_port, a.mlflow_port, a.mlflow_backend,
                        a.pg_port, a.cpus_per_node)
        print(f"{'reusing' if reused else 'started'} Ray head {st['ray_address']} + {st['workers']} worker "
              f"nodes {', '.join(st['ips'][1:])}; dashboard {st['dashboard']}; MLflow {st['mlflow']}")
        print(env_lines(st), end="")
    elif a.command == "down":
        cluster.down()
    else:
        if not cluster.head_alive():
            sys.exit(f"no local cluster running in {cluster.dir}")
        st = cluster.state()
        if a.command == "env":
            print(env_lines(st), end="")
        else:
            dead = cluster.dead(st)
            print(f"{LocalCluster._alive_nodes(st)} Ray nodes alive; dashboard {st['dashboard']}; "
                  f"MLflow {st['mlflow']} ({st['mlflow_backend']})"
                  + (f"; dead: {', '.join(dead)} (`up` restarts them)" if dead else ""))


if __name__ == "__main__":
    # A SIGTERM during `up` must still run its clean-up (`except BaseException` there).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
