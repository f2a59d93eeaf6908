"""cluster/bind_node_addr.c, the LD_PRELOAD shim that keeps a local cluster node's listeners on the node's
own loopback address, run in real processes: in Ray's processes it moves wildcard and 127.0.0.1 binds
there, and a node address that does not parse fails closed instead of leaving a listener on every
interface; in the other processes that inherit it (a job's shell, tools, servers) it changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cluster.local import LocalCluster

BINDS = """
import errno, json, socket, sys
if sys.argv[1] == "ray":
    import ray  # loads Ray's core library, which makes this a Ray process for the shim
out = {}
for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::"),
                     (socket.AF_INET, "127.0.0.5")):
    with socket.socket(family) as s:
        try:
            s.bind((host, 0))
            out[host] = s.getsockname()[0]
        except OSError as e:
            out[host] = errno.errorcode[e.errno]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    return LocalCluster(tmp_path_factory.mktemp("shim"))._build_shim()


def _binds(shim, node_addr: str | None, ray: bool = True) -> tuple[dict[str, str], str]:
    env = {k: v for k, v in os.environ.items() if k != "DEEPSPIKE_NODE_ADDR"}
    env["LD_PRELOAD"] = str(shim)
    if node_addr is not None:
        env["DEEPSPIKE_NODE_ADDR"] = node_addr
    proc = subprocess.run([sys.executable, "-c", BINDS, "ray" if ray else "plain"], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout), proc.stderr


def test_wildcard_and_loopback_binds_move_to_the_node_address(shim):
    binds, _ = _binds(shim, "127.0.3.7")
    assert binds == {"0.0.0.0": "127.0.3.7", "127.0.0.1": "127.0.3.7", "::": "::ffff:127.0.3.7",
                     "127.0.0.5": "127.0.0.5"}
    assert _binds(shim, None)[0]["0.0.0.0"] == "0.0.0.0"  # not configured for this process: unchanged


def test_processes_that_are_not_rays_keep_their_binds(shim):
    """A process that inherited LD_PRELOAD but is not Ray's (a job's shell, a tool it runs, a server) binds
    where it asks: a client's 0.0.0.0:0 keeps a normal source address, and an invalid node address does
    not stop it."""
    for node_addr in ("127.0.3.7", "not-an-address"):
        binds, stderr = _binds(shim, node_addr, ray=False)
        assert binds == {"0.0.0.0": "0.0.0.0", "127.0.0.1": "127.0.0.1", "::": "::", "127.0.0.5": "127.0.0.5"}
        assert not stderr


@pytest.mark.parametrize("node_addr", ["", "127.0.3", "localhost", "::1"])
def test_an_invalid_node_address_fails_closed(shim, node_addr):
    """The binds the shim exists to move are refused (EADDRNOTAVAIL, said once on stderr); the others,
    which never listen on every interface, go through."""
    binds, stderr = _binds(shim, node_addr)
    assert binds == {"0.0.0.0": "EADDRNOTAVAIL", "127.0.0.1": "EADDRNOTAVAIL", "::": "EADDRNOTAVAIL",
                     "127.0.0.5": "127.0.0.5"}
    assert stderr.count("is not an IPv4 address") == 1
