"""Shards in object storage, as clusters keep them: `data.path=s3://bucket/prefix` with `data.access=stream`
against a real S3-compatible server (moto's standalone server, on loopback), credentials and endpoint from
the standard AWS environment variables, read through s3fs. A whole epoch reads every sample once, the server
killed and restarted mid-epoch costs retries and not the run, and a resumed loader continues at the exact
sample."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from data_fixtures import indices_of, resumed_rest
from trainer_fixtures import free_port

from dataloaders import DataConfig, build_loader
from dataloaders.manifest import ShardMismatch
from dataloaders.wds_reader import ShardError

pytest_plugins = ["data_fixtures"]

BUCKET, PREFIX = "shards", "cifar-wds"


class MotoServer:
    """moto's S3 server on 127.0.0.1:port, in its own process; `restart` comes back empty, as a fresh
    server does, so the shards are put again."""

    def __init__(self, port: int, shards: Path):
        self.port, self.shards, self.proc = port, shards, None

    def start(self) -> None:
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                                      str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/moto-api/", timeout=2).close()
                break
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < end, "moto_server did not start"
                time.sleep(0.2)
        self._put()

    def _put(self) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)  # endpoint and keys from the AWS_* variables
        fs.mkdir(BUCKET)
        fs.put(f"{self.shards}/", f"{BUCKET}/{PREFIX}/", recursive=True)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def s3(index_cifar, monkeypatch):
    port = free_port()
    for k, v in {"AWS_ACCESS_KEY_ID": "deepspike-test", "AWS_SECRET_ACCESS_KEY": "deepspike-test-secret",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a filesystem cached by an earlier test knows another endpoint
    server = MotoServer(port, index_cifar["wds"])
    server.start()
    yield server
    server.kill()
    s3fs.S3FileSystem.clear_instance_cache()


def _cfg(root: str, **kw) -> DataConfig:
    return DataConfig(**{"dataset": "cifar10", "format": "wds", "path": root, "batch_size": 5, "num_workers": 0,
                         "seed": 3, "access": "stream", "shuffle_buffer": 8, "retry_backoff": 0.2, **kw})


URL = f"s3://{BUCKET}/{PREFIX}"


def test_whole_epoch_from_s3_reads_every_sample_once(s3, index_cifar):
    """Two ranks, train and test: the same batches as the local shards give, each sample once."""
    for split, total in (("train", 60), ("test", 25)):
        seen = []
        for rank in (0, 1):
            remote = list(build_loader(_cfg(URL), split, rank, 2))
            local = list(build_loader(_cfg(str(index_cifar["wds"])), split, rank, 2))
            assert len(remote) == len(local)
            for (x, y), (x2, y2) in zip(remote, local):
                assert torch.equal(x, x2) and torch.equal(y, y2)
            x, y = torch.cat([b[0] for b in remote]), torch.cat([b[1] for b in remote])
            seen += indices_of(x[y >= 0])
        assert sorted(seen) == list(range(total))


@pytest.mark.slow
def test_server_killed_and_restarted_mid_epoch_costs_retries_not_the_run(s3, index_cifar):
    cfg = _cfg(URL, retries=3, retry_backoff=0.5)
    local = list(build_loader(_cfg(str(index_cifar["wds"])), "train", 0, 1))
    batches = iter(build_loader(cfg, "train", 0, 1))
    got = [next(batches) for _ in range(4)]  # 20 of 60 samples: inside the third of 9 shards
    s3.kill()
    back = threading.Timer(3.0, s3.start)  # the storage comes back 3 s later
    t0 = time.monotonic()
    back.start()
    got += list(batches)
    waited = time.monotonic() - t0
    back.join()
    assert waited >= 3.0  # the reader did meet the outage, and waited it out
    assert len(got) == len(local)
    for (x, y), (x2, y2) in zip(got, local):
        assert torch.equal(x, x2) and torch.equal(y, y2)

    # Storage that stays away fails the run within a bound, naming the shard, instead of hanging.
    batches = iter(build_loader(cfg, "train", 0, 1))
    next(batches)
    s3.kill()
    t0 = time.monotonic()
    with pytest.raises(ShardError, match=r"shard s3://shards/cifar-wds/train/\S+\.tar: 4 failed attempts"):
        list(batches)
    print(f"\n[s3] storage gone: the loader gave up after {time.monotonic() - t0:.1f} s")
    assert time.monotonic() - t0 < 300
    s3.start()  # for the fixture's clean-up


def test_resumed_s3_stream_continues_at_the_exact_sample(s3):
    """Rank 1 of 2, 2 decoding workers: restored from the state saved after 2 batches, the loader yields
    exactly the rest of the epoch, reading from the shard and offset the state names."""
    state = resumed_rest(_cfg(URL, num_workers=2))
    assert state["batches_yielded"] == 2 and state["stream"]["shard"] is not None


def test_s3_stream_verifies_sha256_while_reading(s3, index_cifar):
    """A shard changed in the bucket after conversion (same size, one byte of an image flipped) is refused
    by its manifest's sha256, not trained on."""
    import s3fs

    name = "train/train-000002.tar"
    data = bytearray((index_cifar["wds"] / name).read_bytes())
    with tarfile.open(index_cifar["wds"] / name) as tf:
        member = max((m for m in tf if m.isfile()), key=lambda m: m.size)
    data[member.offset_data + member.size // 2] ^= 0xFF  # inside an image: the tar still parses
    s3fs.S3FileSystem(skip_instance_cache=True).pipe(f"{BUCKET}/{PREFIX}/{name}", bytes(data))
    with pytest.raises(ShardMismatch, match="sha256"):
        list(build_loader(_cfg(URL, retries=1, retry_backoff=0.01), "train", 0, 1))
