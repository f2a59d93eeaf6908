"""A real multi-node Ray cluster plus an MLflow tracking server on one machine (development, tests, demo).

    cluster/local.sh up 2                        # head + 2 workers + MLflow (sqlite); reuses a running one
    cluster/local.sh up 2 --mlflow-backend postgres
    eval "$(cluster/local.sh env)"               # addresses and the auth token file, for `ray job submit`
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

Locked down (docs/cluster_security.md): every process of a node listens on that node's address only
(cluster/bind_node_addr.c, preloaded into each node, moves Ray's wildcard and 127.0.0.1 listeners there),
Ray's token authentication is on with a fresh token in DIR/auth_token (mode 0600), and every port is picked
free on its node's address at `up` and recorded in DIR/state.json, so clusters with different --host run
side by side. MLflow listens on the head's address and lets browsers in from there (its allowed origins);
it has no authentication: any local user can use it.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
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


SHIM_SRC = ROOT / "cluster/bind_node_addr.c"
# Every port a node listens on that `ray start` lets us choose (the head's client server cannot be
# switched off), and on the head MLflow's and PostgreSQL's. Ray picks the rest (worker ports, the
# dashboard's internal ones) on the node's address.
NODE_PORTS = ("node-manager-port", "object-manager-port", "runtime-env-agent-port", "dashboard-agent-grpc-port",
              "dashboard-agent-listen-port", "metrics-export-port")
HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port", "mlflow", "postgres")


def _pick_ports(host: str, names: tuple[str, ...], fixed: dict[str, int | None]) -> dict[str, int]:
    """A distinct free port on `host` for each name; a port given in `fixed` must be free there."""
    socks, ports = [], {}
    try:
        for name in names:
            s = socket.socket()
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, fixed.get(name) or 0))
            except OSError as e:
                raise RuntimeError(f"port {host}:{fixed[name]} ({name}) is in use; pick another with the "
                                   "--*-port options or leave them out for free ones") from e
            ports[name] = s.getsockname()[1]
    finally:
        for s in socks:
            s.close()
    return ports


def _get(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
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


def kill_groups(pgids: list[int], grace_s: float = 5.0) -> None:
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
    # Ray's agents ignore SIGTERM once their raylet is gone (docs/stack.md §3), hence the SIGKILL pass.
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

    def up(self, workers: int, host: str = "127.0.0.2", ray_port: int | None = None,
           dashboard_port: int | None = None, mlflow_port: int | None = None, mlflow_backend: str = "sqlite",
           pg_port: int | None = None, cpus_per_node: int = 1) -> dict:
        """Start the cluster, or return the running one. Ports left None are picked free."""
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
        if not all(ipaddress.ip_address(ip).is_loopback for ip in ips) or ips[0] == "127.0.0.1":
            raise ValueError(f"node addresses must stay in 127.0.0.2-127.255.255.254, got {ips[0]}..{ips[-1]}")
        head = ips[0]
        # MLflow's ports are picked with the head's: on one address, they must differ.
        fixed = {"port": ray_port, "dashboard-port": dashboard_port, "mlflow": mlflow_port, "postgres": pg_port}
        ports = {f"worker{i}" if i else "head": _pick_ports(ip, NODE_PORTS + (HEAD_PORTS if i == 0 else ()), fixed)
                 for i, ip in enumerate(ips)}
        ports["mlflow"] = {k: ports["head"].pop(k) for k in ("mlflow", "postgres")}
        self.dir.mkdir(parents=True, exist_ok=True)
        shim = self._build_shim()
        token = self.dir / "auth_token"
        token.unlink(missing_ok=True)
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` makes
        # Unix socket paths must stay under 107 bytes, so Ray's session files get a short path.
        ray_tmp = f"/tmp/deepspike-ray-{head}-{ports['head']['port']}"
        mlflow_uri = f"http://{head}:{ports['mlflow']['mlflow']}"
        # What a real cluster's node image would set: jobs find the tracking server and shared storage.
        # Token auth for every node and job (`_spawn` drops a token in the caller's environment, which would
        # take precedence). Only these additions are recorded (to restart a dead node exactly), never the
        # caller's whole environment.
        env = dict(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
                   RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
                   MLFLOW_TRACKING_URI=mlflow_uri, DEEPSPIKE_STORAGE=str(self.dir / "storage"),
                   LD_PRELOAD=str(shim),
                   # Ray Train's preemption watcher follows node drains (spot reclaims), which never happen
                   # here; on every run it logs a level-E line (Ray issue 53727: its constructor arguments
                   # are in the object store) that users read as a failure.
                   RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")
        st = {"dir": str(self.dir), "workers": workers, "ips": ips, "ray_tmp": ray_tmp,
              "ray_address": f"{head}:{ports['head']['port']}",
              "dashboard": f"http://{head}:{ports['head']['dashboard-port']}", "mlflow": mlflow_uri,
              "mlflow_backend": mlflow_backend, "auth_token_path": str(token), "ports": ports, "pgids": {},
              "argv": {}, "env": {}}
        # Ray processes that look their cluster up with address "auto" (Ray Train's placement-group cleaner
        # does) refuse to choose when another cluster runs on this machine (the demo's beside a test's, or two
        # users' clusters): every process a node starts is told its own.
        env["RAY_ADDRESS"] = st["ray_address"]
        common = ["--object-store-memory=200000000", "--disable-usage-stats"]
        try:
            # MLflow starts beside the Ray nodes (its start-up is mostly imports). The nodes start one by
            # one: concurrent `ray start`s on one host race for the same socket names in the session dir.
            mlflow_log = self.dir / "mlflow.log"
            mlflow = self._spawn(st, "mlflow", ["bash", str(ROOT / "cluster/mlflow/server.sh"), "run",
                                                str(self.dir / "mlflow")],
                                 dict(env, DEEPSPIKE_NODE_ADDR=head, MLFLOW_HOST=head,
                                      MLFLOW_PORT=str(ports["mlflow"]["mlflow"]),
                                      MLFLOW_ALLOWED_HOSTS=f"{head}:{ports['mlflow']['mlflow']}",
                                      # The UI's page is served from this address: its own POST requests
                                      # are cross-origin to MLflow 3 unless the origin is localhost.
                                      MLFLOW_CORS_ALLOWED_ORIGINS=mlflow_uri,
                                      MLFLOW_BACKEND=mlflow_backend, PG_HOST=head,
                                      PG_PORT=str(ports["mlflow"]["postgres"])))
            for i, ip in enumerate(ips):
                name = "head" if i == 0 else f"worker{i}"
                argv = [str(BIN / "ray"), "start", f"--node-ip-address={ip}", *common,
                        f"--resources={json.dumps({f'simnode{i}': 1})}",
                        *(f"--{k}={v}" for k, v in ports[name].items())]
                if i == 0:
                    argv += ["--head", f"--temp-dir={ray_tmp}", "--num-cpus=0", f"--dashboard-host={ip}"]
                else:
                    # One log monitor per host: the nodes share the session's log folder.
                    argv += [f"--address={st['ray_address']}", f"--num-cpus={cpus_per_node}",
                             "--include-log-monitor=false"]
                # The shim sends the GCS's and raylet's connections to their metrics agent at 127.0.0.1 to
                # the node's address, where the agent listens.
                self._start_node(st, name, argv, dict(env, DEEPSPIKE_NODE_ADDR=ip, DEEPSPIKE_METRICS_AGENT_PORT=str(
                    ports[name]["dashboard-agent-grpc-port"])))
            _wait("MLflow server", lambda: _get(st["mlflow"] + "/health") == b"OK", mlflow, mlflow_log)
            _wait(f"{workers + 1} Ray nodes", lambda: self._alive_nodes(st) == workers + 1, None,
                  self.dir / "head.log")
        except BaseException:
            self.down()
            raise
        return st

    def _build_shim(self) -> Path:
        """Compile cluster/bind_node_addr.c into DIR (again when the source is newer)."""
        out = self.dir / "bind_node_addr.so"
        if out.exists() and out.stat().st_mtime >= SHIM_SRC.stat().st_mtime:
            return out
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("the local cluster needs a C compiler (cc) to build cluster/bind_node_addr.c, "
                               "which keeps every node's listeners on its own loopback address")
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(out), str(SHIM_SRC), "-ldl"],
                       check=True, capture_output=True)
        return out

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
            # Ray's agents can outlive their raylet (docs/stack.md §3): clear the node's remains first.
            kill_groups([st["pgids"][name]], grace_s=2)
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
            base = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "LD_PRELOAD")}
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env={**base, **env}, cwd=ROOT,
                                    start_new_session=True)
        st["pgids"][name] = proc.pid
        st["argv"][name], st["env"][name] = argv, env
        self._save(st)
        return proc

    @staticmethod
    def _alive_nodes(st: dict) -> int:
        nodes = json.loads(_get(st["dashboard"] + "/api/v0/nodes?limit=1000", headers=auth_headers(st)))
        nodes = nodes["data"]["result"]["result"]
        return sum(n["state"] == "ALIVE" for n in nodes)

    def down(self) -> None:
        st = self.state()
        if not st:
            return
        kill_groups(list(st["pgids"].values()))
        if st.get("mlflow_backend") == "postgres":
            subprocess.run(["bash", str(ROOT / "cluster/mlflow/server.sh"), "stop", str(self.dir / "mlflow")],
                           check=True)
        self.state_file.unlink()


def auth_headers(st: dict) -> dict[str, str]:
    """The HTTP header Ray's dashboard and job API want from a client of this cluster."""
    return {"Authorization": "Bearer " + Path(st["auth_token_path"]).read_text().strip()}


def client_env(st: dict) -> dict[str, str]:
    """What `ray job submit`, `ray status` and MLflow clients need to reach this cluster."""
    # `ray job submit` reads RAY_API_SERVER_ADDRESS first; ray.init() and `ray status` use RAY_ADDRESS.
    return {"RAY_API_SERVER_ADDRESS": st["dashboard"], "RAY_ADDRESS": st["ray_address"],
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": st["auth_token_path"],
            "MLFLOW_TRACKING_URI": st["mlflow"]}


def env_lines(st: dict) -> str:
    return "".join(f"export {k}={v}\n" for k, v in client_env(st).items())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="cluster/local.sh", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["up", "down", "status", "env"])
    ap.add_argument("workers", nargs="?", type=int, default=2, help="worker nodes besides the head (up)")
    ap.add_argument("--dir", default=str(ROOT / "runs/cluster"), help="state, logs and MLflow data")
    ap.add_argument("--host", default="127.0.0.2", help="head address; workers take the next ones")
    free = "default: a free port, recorded in DIR/state.json"
    ap.add_argument("--ray-port", type=int, help=f"the head's GCS port ({free})")
    ap.add_argument("--dashboard-port", type=int, help=f"the job API and dashboard ({free})")
    ap.add_argument("--mlflow-port", type=int, help=f"MLflow on the head's address ({free})")
    ap.add_argument("--mlflow-backend", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--pg-port", type=int, help=f"PostgreSQL, with --mlflow-backend postgres ({free})")
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
