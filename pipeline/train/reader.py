"""The prepared-sample store read back for training: the index, row-group reads, prefetch.

    reader = StoreReader.open("s3://bucket/train/prepared/0123456789abcdef", "train")
    len(reader), reader.digest          # the split's samples; the digest is SampleSet's
    samples = reader.fetch([17, 3, 9])  # samples.Sample each, read by row group (LRU-cached)
    feed = Prefetcher(build, depth=2)   # build(k+1) .. build(k+depth) in background threads
    batch, build_s = feed.get(k)        # waits only for what the threads have not finished

The store (`pipeline.train.store` writes it; docs/training.md has the layout): `index.parquet`
lists the good rows sorted by (split, pair_id) with their part, row group and row; sample i of
a split is its i-th index row, the order `SampleSet.from_rows` sorts in, so the data order and
every per-sample draw are those of the in-memory path.

Memory does not grow with the store: the split's index is held as Arrow/numpy arrays (its
pair_id strings plus 12 bytes a sample), the row groups and the parts' Parquet footers in LRUs
of at most `cache_row_groups` each, and the batches in flight. A sample costs one row-group read unless
its row group is cached: small row groups keep that read small.

A read that fails is retried (the S3 client's own retries, then `storage.retry_transient` for
the errors it cannot retry); what still fails raises `storage.StorageError` naming the part and
row group, which fails the step and so the run: a sample is never skipped, that would change the
data order of every later step.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.payload import Sizes
from pipeline.train.dataset import TRAIN_PAYLOADS
from pipeline.train.samples import Sample, pair_ids_digest

__all__ = ["StoreReader", "Prefetcher", "STORE_FORMAT"]

STORE_FORMAT = 1  # store.json's "format" this reader reads
INDEX_COLUMNS = ["split", "pair_id", "part", "row_group", "row"]
READ_COLUMNS = ["pair_id", *TRAIN_PAYLOADS]


class StoreReader:
    """One split of a prepared-sample store (a sample source: `len`, `pair_ids`, `digest`, `fetch`)."""

    def __init__(
        self,
        uri: str,
        split: str,
        pair_ids: pa.Array,
        parts: list[str],
        part_of: np.ndarray,
        row_group: np.ndarray,
        row: np.ndarray,
        sizes: Sizes,
        cache_row_groups: int = 64,
    ):
        self.uri, self.split, self.sizes = uri, split, sizes
        self.pair_ids, self.parts, self.part_of, self.row_group, self.row = pair_ids, parts, part_of, row_group, row
        self.cache_row_groups = max(1, cache_row_groups)
        self._cache: collections.OrderedDict[tuple[int, int], Future] = collections.OrderedDict()
        self._footers: collections.OrderedDict[int, pq.FileMetaData] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.reads, self.read_bytes = 0, 0  # row groups read and their decoded size, for benches

    @classmethod
    def open(cls, uri: str, split: str, cache_row_groups: int = 64) -> StoreReader:
        """The split's index from a complete store (its `store.json` written); StorageError if
        the store is absent, incomplete, of another format, or its index is not sorted."""
        try:
            info = json.loads(storage.read_bytes(storage.join(uri, "store.json")))
        except FileNotFoundError:
            raise storage.StorageError(
                f"no prepared-sample store at {uri}: its store.json is missing (never prepared, or not finished)"
            ) from None
        if info.get("format") != STORE_FORMAT:
            raise storage.StorageError(
                f"the store at {uri} has format {info.get('format')!r}; this reader reads format {STORE_FORMAT}"
            )
        try:
            index = storage.read_parquet(storage.join(uri, "index.parquet"), columns=INDEX_COLUMNS)
        except FileNotFoundError:
            raise storage.StorageError(f"the store at {uri} has a store.json but no index.parquet") from None
        index = index.filter(pc.equal(index["split"], split))
        pair_ids = index["pair_id"].combine_chunks().cast(pa.string())
        if len(pair_ids) > 1 and not pc.all(pc.less(pair_ids[:-1], pair_ids[1:])).as_py():
            raise storage.StorageError(
                f"the index of the store at {uri} is not sorted by pair_id (or repeats one) in split {split}"
            )
        part = index["part"].combine_chunks().dictionary_encode()
        return cls(
            uri,
            split,
            pair_ids,
            parts=part.dictionary.to_pylist(),
            part_of=part.indices.to_numpy(zero_copy_only=False).astype(np.int32),
            row_group=index["row_group"].to_numpy().astype(np.int32),
            row=index["row"].to_numpy().astype(np.int32),
            sizes=Sizes(int(info["resolution"]), int(info["product_size"])),
            cache_row_groups=cache_row_groups,
        )

    def __len__(self) -> int:
        return len(self.pair_ids)

    @property
    def digest(self) -> str:
        """`SampleSet.digest` of the same pair_ids, hashed in chunks of the Arrow array."""
        return pair_ids_digest(self.pair_ids[i : i + 65536] for i in range(0, len(self.pair_ids), 65536))

    def fetch(self, indices) -> list[Sample]:
        """The samples at `indices`, in that order: views of their row groups' buffers."""
        out = []
        for i in indices:
            part, group, row = int(self.part_of[i]), int(self.row_group[i]), int(self.row[i])
            columns = self._row_group(part, group)
            pair_id = self.pair_ids[i].as_py()
            if row >= len(columns["pair_id"]) or columns["pair_id"][row].as_py() != pair_id:
                raise storage.StorageError(
                    f"the store at {self.uri} does not hold {pair_id} at row {row} of row group {group} of part "
                    f"{self.parts[part]}, where its index puts it: the index does not match its parts"
                )
            payloads = {c: columns[c][row].as_buffer() for c in TRAIN_PAYLOADS}
            out.append(Sample.from_payloads(pair_id, payloads, self.sizes))
        return out

    def _row_group(self, part: int, group: int) -> dict[str, pa.Array]:
        """A row group's columns from the LRU, or read once (threads asking for the same one
        while it is read wait for that read)."""
        key = (part, group)
        with self._lock:
            future = self._cache.get(key)
            owner = future is None
            if owner:
                future = self._cache[key] = Future()
                while len(self._cache) > self.cache_row_groups:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        if owner:
            try:
                future.set_result(self._read(part, group))
            except BaseException as e:
                with self._lock:
                    if self._cache.get(key) is future:
                        del self._cache[key]
                future.set_exception(e)
        return future.result()

    def _footer(self, part: int) -> pq.FileMetaData | None:
        with self._lock:
            return self._footers.get(part)

    def _remember_footer(self, part: int, footer: pq.FileMetaData) -> None:
        """Parts' footers in an LRU as large as the row groups': a store has a part per
        `--store-part-rows` manifest rows, so a footer per part would grow with the store."""
        with self._lock:
            self._footers[part] = footer
            self._footers.move_to_end(part)
            while len(self._footers) > self.cache_row_groups:
                self._footers.popitem(last=False)

    def _read(self, part: int, group: int) -> dict[str, pa.Array]:
        uri = storage.join(self.uri, "parts", f"{self.parts[part]}.parquet")
        fs, path = storage.filesystem(uri)

        def read() -> pa.Table:
            with fs.open_input_file(path) as f:
                # pre_buffer coalesces the column chunks into few range reads
                parquet = pq.ParquetFile(f, metadata=self._footer(part), pre_buffer=True)
                self._remember_footer(part, parquet.metadata)
                return parquet.read_row_group(group, columns=READ_COLUMNS, use_threads=False)

        try:
            table = storage.retry_transient(read)
        except (OSError, pa.ArrowException) as e:
            raise storage.StorageError(f"cannot read row group {group} of {uri}: {e}") from e
        with self._lock:
            self.reads, self.read_bytes = self.reads + 1, self.read_bytes + table.nbytes
        return {c: table.column(c).combine_chunks() for c in READ_COLUMNS}


class Prefetcher:
    """Step k's batch, with those of steps k+1 .. k+depth built meanwhile in `depth` background
    threads. `build(step)` must be a pure function of the step (the data order and every draw
    are), so prefetching changes when a batch is built, never what it holds. Steps at or past
    `end` are not prefetched."""

    def __init__(self, build: Callable[[int], Any], depth: int, end: int | None = None):
        self.build, self.depth, self.end = build, depth, end
        self.pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="dtc-prefetch") if depth else None
        self.pending: dict[int, Future] = {}

    def get(self, step: int) -> tuple[Any, float]:
        """(step's batch, the seconds building it took, hidden or not); its errors raise here."""
        future = self.pending.pop(step, None)
        for stale in [k for k in self.pending if k < step or k > step + self.depth]:  # a jump: dropped
            self.pending.pop(stale).cancel()
        for ahead in range(step + 1, step + 1 + self.depth):
            if ahead not in self.pending and (self.end is None or ahead < self.end):
                self.pending[ahead] = self.pool.submit(self._timed, ahead)
        return future.result() if future is not None else self._timed(step)

    def _timed(self, step: int) -> tuple[Any, float]:
        began = time.perf_counter()
        batch = self.build(step)
        return batch, time.perf_counter() - began

    def close(self) -> None:
        if self.pool is not None:
            for future in self.pending.values():
                future.cancel()
            self.pending.clear()
            self.pool.shutdown(wait=True)
