"""data.access=stream: each rank reads its run of shards in order (local or over HTTP), covers every sample
once per epoch on any world size, resumes mid-epoch bit for bit, and retries a failing shard, then names it."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import indices_of, resumed_rest

from dataloaders import DataConfig, build_loader
from dataloaders.stream import StreamPlan, buffered_shuffle
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
    plan = StreamPlan(20, 4, 0, 1, 0, False, (8, 8, 4), 1)
    assert plan.position(0, 0) == {"shard": 0, "offset": 0}
    assert plan.position(0, 3) == {"shard": 1, "offset": 4}  # eval reads in stored order
    with pytest.raises(ValueError, match="access='stream' with data.format='ffcv'"):
        DataConfig(format="ffcv", access="stream")
