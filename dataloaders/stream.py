"""`data.access = "stream"`: each rank reads its own run of the shards front to back, as WebDataset's
pipelines do, instead of indexing samples of a global permutation.

Use it for shards behind a URL or `pipe:` command that do not fit on a node (ImageNet from object
storage): nothing is cached, only a bounded read-ahead is held in memory (the shuffle buffer, the
DataLoader's prefetched batches and a 256 KiB read buffer). Keep `random` (the default) for local shards:
its exact global permutation mixes the whole split each epoch, while a stream only mixes within shards and
the buffer.

The order, like `SampleOrder`'s, derives from (seed, epoch) alone:
- the epoch's shard order (shuffled for train, as stored for eval) concatenated is one stream of all
  samples; rank r reads the contiguous r-th of world_size equal parts of it (a part may start and end
  inside a shard), so every sample is read exactly once per epoch, train and eval alike;
- train passes the part through a buffered shuffle (`data.shuffle_buffer` samples, WebDataset's
  `shuffle(n)`); its draws are precomputed from (seed, epoch, rank), so the emitted order is known
  before reading and a resume continues bit for bit: the reader restarts at the earliest sample still
  owed (shard and offset in `Loader.state_dict()["stream"]`) and skips the ones already used;
- ranks whose part is shorter pad their last batch with label -1 rows, train included, so all ranks
  yield the same number of batches.
A shard that fails to open or breaks off (an I/O error) is re-read from the sample where it stopped,
`data.retries` times with doubling back-off, then stops the run with one error naming it; other exceptions
are bugs and propagate at once. Every read that reaches a shard's end (one per shard and epoch: the rank
whose part holds its last sample) has hashed the whole shard on the way and checks it against the
manifest's size and sha256 before that sample is used; no read goes past the manifest's size.
"""

from __future__ import annotations

import functools
import logging
import tarfile
import time
from dataclasses import dataclass

import numpy as np

from dataloaders.manifest import ShardMismatch, VerifiedReader, is_remote, open_remote, resolve
from dataloaders.order import PAD, SampleOrder
from dataloaders.wds_reader import ShardError, ShardSet

log = logging.getLogger(__name__)
_READ_SIZE = 1 << 18


@dataclass(frozen=True)
class StreamOrder(SampleOrder):
    shard_sizes: tuple[int, ...] = ()
    buffer: int = 1000

    @property
    def num_batches(self) -> int:
        longest = -(-self.num_samples // self.world_size)
        return -(-longest // self.batch_size)

    def reads(self, epoch: int) -> np.ndarray:
        """int64: the sample positions this rank reads in `epoch`, in file order."""
        return self._epoch(epoch)[0]

    def rows(self, epoch: int) -> np.ndarray:
        order = self._epoch(epoch)[1]
        padded = np.concatenate([order, np.full(self.num_batches * self.batch_size - len(order), PAD)])
        return padded.astype(np.int64).reshape(self.num_batches, self.batch_size)

    @functools.lru_cache(maxsize=2)  # noqa: B019 - plans are few, small and immutable
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        starts = np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]])
        shards = np.arange(len(self.shard_sizes))
        if self.train:
            shards = np.random.default_rng([self.seed, epoch]).permutation(shards)
        stream = np.concatenate([np.arange(starts[k], starts[k] + self.shard_sizes[k]) for k in shards])
        n = len(stream)
        mine = stream[self.rank * n // self.world_size : (self.rank + 1) * n // self.world_size]
        if not self.train:
            return mine, mine
        return mine, mine[buffered_shuffle(len(mine), self.buffer, [self.seed, epoch, self.rank])]

    def position(self, epoch: int, batches: int) -> dict:
        """Where this rank's reading restarts after `batches` batches: (shard index in the manifest, sample
        offset in it) of the earliest sample still owed."""
        owed = self.rows(epoch)[batches:].ravel()
        owed = set(owed[owed >= 0].tolist())
        reads = self.reads(epoch)
        first = next((int(i) for i in reads if int(i) in owed), None)
        if first is None:
            return {"shard": None, "offset": 0}
        ends = np.cumsum(self.shard_sizes)
        k = int(np.searchsorted(ends, first, side="right"))
        return {"shard": k, "offset": first - (int(ends[k - 1]) if k else 0)}


def buffered_shuffle(n: int, size: int, seed) -> np.ndarray:
    """Emission order of positions 0..n-1 read in order through a shuffle buffer of `size` (WebDataset's
    algorithm: once the buffer is full, each new sample swaps out a random one). At any point fewer than
    `size` read samples wait, which bounds the read-ahead."""
    rng = np.random.default_rng(seed)
    draws = rng.random(n)
    buf: list[int] = []
    out = np.empty(n, np.int64)
    emitted = 0
    for p in range(n):
        buf.append(p)
        if len(buf) >= size:
            i = int(draws[p] * len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            out[emitted] = buf.pop()
            emitted += 1
    tail = rng.permutation(len(buf))
    out[emitted:] = np.asarray(buf, np.int64)[tail]
    return out


class ShardStream:
    """Sequential reads of a split's shards (local, URL or `pipe:`) with bounded retries."""

    def __init__(self, shards: ShardSet, retries: int, backoff: float):
        self.shards, self.retries, self.backoff = shards, retries, backoff
        self.starts = np.concatenate([[0], shards.ends[:-1]]).astype(np.int64)

    def items(self, batches: list[list[tuple[int, int | None]]], reads: np.ndarray):
        """The batches' items (position, seed) with (shard name, {ext: bytes}) attached, reading `reads` in
        order from the earliest position the batches need; positions they do not need are skipped."""
        needed = {p for batch in batches for p, _ in batch if p >= 0}
        start = next((k for k, p in enumerate(reads.tolist()) if p in needed), len(reads))
        source = self._samples(reads[start:])
        pending: dict[int, tuple[str, dict[str, bytes]]] = {}
        for batch in batches:
            out = []
            for p, seed in batch:
                while p >= 0 and p not in pending:
                    i, shard, sample = next(source)
                    if i in needed:
                        pending[i] = shard, sample
                out.append((p, seed, *pending.pop(p)) if p >= 0 else (p, seed))
            yield out

    def _samples(self, reads: np.ndarray):
        """(position, shard name, sample) for each position of `reads`, which runs through consecutive
        samples of one shard after another."""
        k_of = np.searchsorted(self.shards.ends, reads, side="right")
        cuts = np.flatnonzero((np.diff(reads) != 1) | (np.diff(k_of) != 0)) + 1
        for run in np.split(np.arange(len(reads)), cuts):
            if len(run):
                k = int(k_of[run[0]])
                first = int(reads[run[0]] - self.starts[k])
                yield from self._shard(k, first, first + len(run))

    def _shard(self, k: int, first: int, stop: int):
        record = self.shards.shards[k]
        name, expected = record["name"], record["num_samples"]
        url = resolve(self.shards.root, f"{self.shards.split}/{name}")
        j, failures = first, 0
        while True:
            try:
                for j_read, sample in _tar_samples(url, j, record["bytes"], record.get("sha256")):
                    yield int(self.starts[k]) + j_read, name, sample
                    j = j_read + 1
                    if j == stop:
                        return
                raise ShardError(f"{url}: ends after {j} samples, the manifest records {expected}; the "
                                 "shard is truncated")
            except ShardMismatch:
                raise  # other bytes than the manifest's: reading them again gives the same
            except _transport_errors() as e:
                failures += 1
                if failures > self.retries:
                    raise ShardError(f"shard {url}: {failures} failed attempts to read it from sample {j} "
                                     f"(data.retries={self.retries}); last error: {type(e).__name__}: {e}") from e
                wait = self.backoff * 2 ** (failures - 1)
                log.warning("reading %s failed at sample %d (%s: %s); retry %d of %d in %.1f s", url, j,
                            type(e).__name__, e, failures, self.retries, wait)
                time.sleep(wait)


@functools.cache
def _transport_errors() -> tuple[type[BaseException], ...]:
    """What reading a shard raises when the storage or the network fails: OSError (files, sockets, fsspec,
    a `pipe:` command's exit status, ShardError), a cut-off tar, aiohttp's own errors (fsspec's HTTP
    transport: a body cut short is a ClientPayloadError, not an OSError) and botocore's connection errors
    (s3fs passes an unreachable endpoint on as EndpointConnectionError, not an OSError). Anything else is a
    bug."""
    errors: list[type[BaseException]] = [OSError, EOFError, tarfile.TarError]
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        errors += [BotoConnectionError, HTTPClientError]
    except ImportError:
        pass
    return tuple(errors)


def _tar_samples(url: str, first: int, size: int, sha256: str | None):
    """(offset, {ext: bytes}) of the samples of one WebDataset tar from `first` on, read front to back
    (the members of a sample are adjacent; those before `first` are read past, not kept). The bytes are
    hashed as they pass and never read past the manifest's `size`; a read that reaches the end of the tar
    checks the size and sha256 before its last sample is handed over (ShardMismatch)."""
    opener = open_remote if is_remote(url) else functools.partial(open, mode="rb")
    # Reads of 256 KiB: tarfile's default 10 KiB each cost a round trip through fsspec's event-loop thread,
    # which made the main process spend more on reading a stream than a worker on decoding it.
    with opener(url) as raw, tarfile.open(fileobj=(f := VerifiedReader(raw, url, size, sha256)), mode="r|",
                                          bufsize=_READ_SIZE) as tf:
        key, sample, offset = None, {}, -1
        for m in tf:
            if not m.isfile():
                continue
            # WebDataset convention: the key runs up to the first dot of the file name
            dot = m.name.find(".", m.name.rfind("/") + 1)
            if m.name[:dot] != key:
                if offset >= first:
                    yield offset, sample
                key, sample, offset = m.name[:dot], {}, offset + 1
            if offset >= first:
                sample[m.name[dot + 1 :]] = tf.extractfile(m).read()
        f.finish()
        if offset >= first:
            yield offset, sample
