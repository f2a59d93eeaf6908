"""Real local clusters (cluster/local.sh) for the tests, the jobs' client on them, what their processes listen
on, and headless Chromium for the pages they serve. The session's shared clusters are tests/conftest.py's
fixtures."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import StateApiClient
from ray.util.state.common import ListApiOptions, StateResource

from cluster.local import auth_headers, client_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The session's shared job cluster's head; its workers take the next addresses.
SHARED_HOST = "127.0.1.2"


def digits_wds(out: Path) -> Path:
    """The digits data set at 16 px as WebDataset shards, made with the real converter CLI."""
    subprocess.run([sys.executable, "-m", "dataloaders.convert", "digits", "--out", str(out), "--format", "wds",
                    "--size", "16", "--workers", "1"], cwd=ROOT, check=True, capture_output=True)
    return out


def local_sh(cluster_dir: Path) -> list[str]:
    return [str(ROOT / "cluster/local.sh"), "--dir", str(cluster_dir)]


@contextlib.contextmanager
def local_cluster(cluster_dir: Path, *args: str, workers: int = 2):
    """`cluster/local.sh --dir DIR up WORKERS ARGS...`; yields its state.json; `down` afterwards."""
    local = local_sh(cluster_dir)
    subprocess.run([*local, "up", str(workers), *args], check=True, timeout=300)
    state = json.loads((cluster_dir / "state.json").read_text())
    try:
        yield state
    finally:
        subprocess.run([*local, "down"], check=True, timeout=120)
        shutil.rmtree(state["ray_tmp"], ignore_errors=True)  # Ray's session files and logs


class Cluster:
    """The jobs' client of a local cluster: `ray job submit` as a user types it, and what Ray's APIs say."""

    def __init__(self, state: dict, data: Path, storage: Path):
        self.state, self.data, self.storage = state, data, storage
        self.env = dict(os.environ, **client_env(state))  # what `ray job submit` needs, the token too
        self.client = JobSubmissionClient(state["dashboard"], headers=auth_headers(state))
        self.state_api = StateApiClient(state["dashboard"], headers=auth_headers(state))

    def submit(self, name: str, *args: str, nodes: int = 2, working_dir: bool = False,
               launcher: str = "launch/cifar10.py", env: dict[str, str] | None = None) -> str:
        """`ray job submit --no-wait [--working-dir .] [--runtime-env-json '{"env_vars": ENV}'] -- python
        LAUNCHER --nodes N ...`; returns the id."""
        sid = f"{name}-{time.monotonic_ns()}"
        cmd = [str(BIN / "ray"), "job", "submit", "--no-wait", "--submission-id", sid,
               *(["--working-dir", "."] if working_dir else []),
               *(["--runtime-env-json", json.dumps({"env_vars": env})] if env else []), "--",
               "python", launcher, "--nodes", str(nodes), "--data", str(self.data),
               "--storage", str(self.storage), "--run-name", name, *args]
        subprocess.run(cmd, cwd=ROOT, env=self.env, check=True, capture_output=True, timeout=120)
        return sid

    def wait(self, sid: str, timeout: float = 400, until=None) -> JobStatus:
        """Poll until the job ends or `until()` holds (then the job may still be running)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status = self.client.get_job_status(sid)
            if status.is_terminal() or (until is not None and until()):
                return status
            time.sleep(0.3)
        raise TimeoutError(f"job {sid} still {status} after {timeout} s:\n{self.logs(sid)[-3000:]}")

    def logs(self, sid: str) -> str:
        return self.client.get_job_logs(sid)

    def nodes(self) -> list:
        """The alive nodes. Filtered here, not by the state API: its GCS query counts the nodes a filter
        leaves out as truncated, so on a cluster that lost a node, raise_on_missing_output would raise."""
        nodes = self.state_api.list(StateResource.NODES, ListApiOptions(detail=True), raise_on_missing_output=True)
        return [n for n in nodes if n.state == "ALIVE"]

    def workers(self, sid: str) -> list:
        """The RayTrainWorker actors this job created, dead or alive."""
        job_id = self.client.get_job_info(sid).job_id
        return self.state_api.list(StateResource.ACTORS, ListApiOptions(
            detail=True, limit=1000, filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", job_id)]),
            raise_on_missing_output=True)


def keep_job_logs(state: dict, folder: Path) -> None:
    """Every job's log into `folder`, for a failure's post-mortem."""
    client = JobSubmissionClient(state["dashboard"], headers=auth_headers(state))
    for job in client.list_jobs():
        (folder / f"{job.submission_id}.log").write_text(client.get_job_logs(job.submission_id))


def restored(cluster_dir: Path) -> dict:
    """`cluster/local.sh up` on a running cluster: the nodes an earlier test killed are restarted (the head,
    the live nodes and MLflow stay); returns its state.json, with the restarted nodes' process groups."""
    workers = json.loads((cluster_dir / "state.json").read_text())["workers"]
    subprocess.run([*local_sh(cluster_dir), "up", str(workers)], check=True, capture_output=True, timeout=300)
    return json.loads((cluster_dir / "state.json").read_text())


def node_address(state: dict, group: str) -> str:
    """The address a recorded process group belongs to: MLflow runs on the head's."""
    return state["ips"][int(group.removeprefix("worker"))] if group.startswith("worker") else state["ips"][0]


def listeners(state: dict) -> list[tuple[str, str, str, int]]:
    """(group, process name, address, port) of every listening TCP and bound UDP socket of every process
    in the cluster's recorded process groups, and of their descendants (job drivers start sessions of
    their own). IPv4-mapped IPv6 addresses are given as IPv4."""
    found = []
    for group, pgid in state["pgids"].items():
        procs = {}
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(p.pid) == pgid:
                    procs[p.pid] = p
                    procs.update({c.pid: c for c in p.children(recursive=True)})
        for p in procs.values():
            with contextlib.suppress(psutil.Error):
                name = p.name()
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN or (c.status == psutil.CONN_NONE and c.laddr):
                        found.append((group, name, c.laddr.ip.removeprefix("::ffff:"), c.laddr.port))
    return found


def chromium(url: str, *, screenshot: Path | None = None, height: int = 1000) -> str:
    """The DOM of `url` after its scripts ran, as headless Chromium renders it in a window 1600 pixels wide
    and `height` high (a fresh profile, nothing fetched besides the page); with `screenshot`, a PNG of the
    window is written there too. Pages render only what is in view: a tall window shows all of a long page."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is installed by the Makefile (apt package 'chromium')"
    # Chromium's helper processes may still write to the profile as it is removed; a leftover file is harmless.
    with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as profile:
        flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=30000",
                 f"--window-size=1600,{height}"]
        proc = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-2000:]
        if screenshot is not None:
            shot = subprocess.run([*flags, f"--screenshot={screenshot}", "--hide-scrollbars", url],
                                  capture_output=True, text=True, timeout=180)
            assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    return proc.stdout


def chromium_typed(url: str, field: str, text: str, until: str, screenshot: Path, timeout: float = 120) -> str:
    """Headless Chromium driven as a person would: open `url`, type `text` into the input whose placeholder
    is `field`, wait until the page shows `until`, save a 1600x1300 PNG to `screenshot`; returns the page's
    visible text. (Chromium's DevTools protocol on a loopback port, through aiohttp.)"""
    import aiohttp

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is installed by the Makefile (apt package 'chromium')"

    async def drive(ws_url: str) -> str:
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:
            ids = iter(range(1, 10**6))

            async def call(method: str, **params) -> dict:
                i = next(ids)
                await ws.send_json({"id": i, "method": method, "params": params})
                while True:
                    msg = await ws.receive_json()
                    if msg.get("id") == i:
                        assert "error" not in msg, msg
                        return msg["result"]

            async def page_text() -> str:
                r = await call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''")
                return r["result"]["value"]

            async def wait_for(js: str) -> None:
                end = time.monotonic() + timeout
                while not (await call("Runtime.evaluate", expression=js))["result"].get("value"):
                    assert time.monotonic() < end, f"{js} still false; page shows:\n{(await page_text())[-2000:]}"
                    await asyncio.sleep(0.5)

            await call("Page.navigate", url=url)
            box = f"document.querySelector('input[placeholder={json.dumps(field)}]')"
            await wait_for(f"!!{box}")
            await call("Runtime.evaluate", expression=f"{box}.focus()")
            await call("Input.insertText", text=text)
            await wait_for(f"document.body.innerText.includes({json.dumps(until)})")
            await asyncio.sleep(2)  # the charts draw their lines after their titles
            png = await call("Page.captureScreenshot", format="png")
            screenshot.write_bytes(base64.b64decode(png["data"]))
            return await page_text()

    with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                 "--no-first-run", f"--user-data-dir={profile}", "--window-size=1600,1300",
                                 "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            for line in proc.stderr:
                if line.startswith("DevTools listening on "):
                    port = line.split("ws://127.0.0.1:", 1)[1].split("/", 1)[0]
                    break
            else:
                raise AssertionError("chromium exited before its DevTools port opened")
            pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
            ws_url = next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")
            return asyncio.run(drive(ws_url))
        finally:
            proc.kill()
            proc.wait(timeout=30)
