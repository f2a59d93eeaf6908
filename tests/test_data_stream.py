"""data.access=stream: each rank reads its run of shards in order (local or over HTTP), covers every sample
once per epoch on any world size, resumes mid-epoch bit for bit, retries a failing shard, then names it, and
checks every shard's bytes against the manifest on the way."""

from __future__ import annotations

import functools
import http.server
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import indices_of, resumed_rest

from dataloaders import DataConfig, build_loader
from dataloaders.manifest import ShardMismatch
from dataloaders.stream import StreamOrder, buffered_shuffle
from dataloaders.wds_reader import ShardError

pytest_plugins = ["data_fixtures"]


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(**{"dataset": "cifar10", "format": "wds", "path": str(root), "batch_size": 5,
                         "num_workers": 0, "seed": 3, "access": "stream", "shuffle_buffer": 8,
                         "retry_backoff": 0.01, **kw})


def _epoch(loader, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    loader.set_epoch(epoch)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_buffered_shuffle_is_a_permutation_with_bounded_read_ahead():
    order = buffered_shuffle(500, 16, [1, 2, 3])
    assert sorted(order) == list(range(500)) and not np.array_equal(order, np.arange(500))
    assert (order - np.arange(500) < 16).all()  # an emitted sample was read at most 15 reads earlier
    assert np.array_equal(order, buffered_shuffle(500, 16, [1, 2, 3]))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sample_once_per_epoch_on_every_world_size(world, index_cifar):
    """60 train samples in 9 shards of 7 (the last 4), batch 5: train epochs read each sample once across
    the ranks, in a new shard order each epoch; eval (25 samples) too, without shuffling."""
    for split, total in (("train", 60), ("test", 25)):
        loaders = [build_loader(_cfg(index_cifar["wds"]), split, r, world) for r in range(world)]
        assert len({len(loader) for loader in loaders}) == 1
        orders = []
        for epoch in (0, 1):
            seen = []
            for loader in loaders:
                x, y = _epoch(loader, epoch)
                assert len(y) == len(loader) * 5
                idx = indices_of(x[y >= 0])
                assert [i % 10 for i in idx] == y[y >= 0].tolist()  # the image and its label travel together
                assert (x[y < 0] == 0).all()
                seen += idx
            assert sorted(seen) == list(range(total))
            orders.append(seen)
        assert (orders[0] != orders[1]) if split == "train" else (orders[0] == orders[1])  # eval: no shuffle


def test_mid_epoch_resume_is_bit_identical(index_cifar):
    """Augmented train batches (crop + flip seeded per sample), 2 decoding workers, rank 1 of 2: a loader
    restored from the state saved after 2 batches yields exactly the rest of the epoch."""
    state = resumed_rest(_cfg(index_cifar["wds"], num_workers=2))
    assert state["access"] == "stream" and state["batches_yielded"] == 2
    assert set(state["stream"]) == {"shard", "offset"} and state["stream"]["shard"] in range(9)
    with pytest.raises(ValueError, match="access=stream, this loader random"):
        build_loader(_cfg(index_cifar["wds"], access="random"), "train", 1, 2).load_state_dict(state)


class _Server(http.server.ThreadingHTTPServer):
    """Serves a folder on 127.0.0.1; `fail[name]` GETs of a file answer 503 first, `cut` files are sent
    truncated; `hits` counts GETs per file."""

    def __init__(self, root: Path):
        self.fail, self.cut, self.hits = {}, set(), {}
        handler = functools.partial(_Handler, directory=str(root))
        super().__init__(("127.0.0.1", 0), handler)


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        self.server.hits[name] = self.server.hits.get(name, 0) + 1
        if self.server.fail.get(name, 0) > 0:
            self.server.fail[name] -= 1
            self.send_error(503, "injected failure")
            return
        if name in self.server.cut:
            data = Path(self.translate_path(self.path)).read_bytes()[:3000]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(index_cifar):
    srv = _Server(index_cifar["wds"])
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_http_stream_retries_a_failing_shard_then_names_it(server, index_cifar, tmp_path, caplog):
    srv, url = server
    cfg = _cfg(url, cache_dir=str(tmp_path / "cache"), retries=2)
    local = _epoch(build_loader(_cfg(index_cifar["wds"]), "train", 0, 1), 0)
    srv.fail["train-000003.tar"] = 2  # two 503s, then it answers
    streamed = _epoch(build_loader(cfg, "train", 0, 1), 0)
    assert torch.equal(streamed[0], local[0]) and torch.equal(streamed[1], local[1])
    assert srv.hits["train-000003.tar"] == 3 and "retry 2 of 2" in caplog.text
    assert not (tmp_path / "cache").exists()  # streamed, nothing cached

    srv.fail["train-000005.tar"] = 10**6
    with pytest.raises(ShardError, match=r"shard http://127\.0\.0\.1:\d+/train/train-000005\.tar: 3 failed"):
        _epoch(build_loader(cfg, "train", 0, 1), 0)
    srv.fail.clear()
    srv.cut.add("test-000001.tar")
    with pytest.raises(ShardError, match=r"test-000001\.tar: 3 failed .*(truncated|ReadError)"):
        _epoch(build_loader(cfg, "test", 0, 1), 0)


def test_stream_plan_position_points_at_the_earliest_owed_sample():
    plan = StreamOrder(20, 4, 0, 1, 0, False, (8, 8, 4), 1)
    assert plan.position(0, 0) == {"shard": 0, "offset": 0}
    assert plan.position(0, 3) == {"shard": 1, "offset": 4}  # eval reads in stored order
    with pytest.raises(ValueError, match="access='stream' with data.format='ffcv'"):
        DataConfig(format="ffcv", access="stream")


def _tamper(shard: Path) -> None:
    """Same size, other bytes: the last 100 bytes of the first member's payload (a PNG's IEND region)."""
    with tarfile.open(shard) as tf:
        m = next(m for m in tf if m.name.endswith(".png"))
    data = bytearray(shard.read_bytes())
    data[m.offset_data + m.size - 100 : m.offset_data + m.size] = bytes(100)
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("remote", [False, True])
def test_stream_verifies_each_shards_sha256_on_the_fly(index_cifar, tmp_path, remote):
    """A shard with the manifest's size but other bytes (local, and behind `pipe:cat`) stops the read that
    reaches its end, naming it, and is not retried; the untouched split streams as before."""
    root = shutil.copytree(index_cifar["wds"], tmp_path / "wds")
    _tamper(root / "test" / "test-000002.tar")
    path = f"pipe:cat {root}/{{}}" if remote else root
    with pytest.raises(ShardMismatch, match=r"test-000002\.tar: read 30720 bytes with sha256 [0-9a-f]{64}, "
                       r"the manifest says 30720 bytes"):
        _epoch(build_loader(_cfg(path), "test", 0, 1), 0)
    x, y = _epoch(build_loader(_cfg(path), "train", 0, 1), 0)
    assert sorted(indices_of(x[y >= 0])) == list(range(60))


def _endless_remote(tmp_path: Path, root: Path) -> tuple[str, Path]:
    """A `pipe:` root whose command sends the real shard, then 64 MiB more, then marks that it sent it all."""
    script, done = tmp_path / "serve.sh", tmp_path / "SENT_ALL"
    script.write_text(f'cat "{root}/$1" || exit 1\n'
                      f'case "$1" in *.tar) head -c 67108864 /dev/zero && touch {done};; esac\n')
    return f"pipe:sh {script} {{}}", done


def test_a_remote_sending_more_than_the_manifests_size_is_cut_off(index_cifar, tmp_path):
    """Stream mode and random access's fetch alike stop one byte past the manifest's size (ShardMismatch)
    instead of reading, or copying to the cache disk, whatever the remote sends."""
    url, done = _endless_remote(tmp_path, index_cifar["wds"])
    with pytest.raises(ShardMismatch, match=r"test-000000\.tar: more than the manifest's 30720 bytes"):
        _epoch(build_loader(_cfg(url), "test", 0, 1), 0)
    cfg = _cfg(url, access="random", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ShardMismatch, match=r"test-000000\.tar: more than the manifest's 30720 bytes"):
        _epoch(build_loader(cfg, "test", 0, 1), 0)
    assert not done.exists() and not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_a_bug_while_streaming_is_raised_not_retried(index_cifar, monkeypatch):
    """Only I/O errors are retried: a TypeError inside the read (a bug) propagates at the first attempt."""
    import dataloaders.stream as stream

    calls = []

    def buggy(*args):
        calls.append(args)
        raise TypeError("a bug in the reader")
        yield

    monkeypatch.setattr(stream, "_tar_samples", buggy)
    with pytest.raises(TypeError, match="a bug in the reader"):
        _epoch(build_loader(_cfg(index_cifar["wds"], retries=3), "test", 0, 1), 0)
    assert len(calls) == 1
