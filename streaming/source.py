"""``SampleSource``: one rank's batches of raw sample arrays and view parameters, for DALI's external source.

It is called once per *batch* (``batch=True``), in a reader process (``shared_readers``; or DALI's
parallel workers with ``readers='dali'``), so the per-sample cost is the read itself plus a few
microseconds of Python, not a per-sample transport:

- a member of a file on this node (a local dataset, a node-cache copy) is not read at all: it is checked
  (CRC-32C) where it lies in the page cache and handed over as a view of the mapped file
  (``ShardReader.view``; the shared-memory readers let the pipeline's process map the same file, so no
  byte is copied). Otherwise (``map_files`` off, or an object store) the members are read into a buffer
  per batch slot: the batch's slot of shared memory with the shared-memory readers (``use_buffers``),
  else one reused per call. From a local file each member in ``READ_CHUNK_BYTES`` pieces, each checked
  right after its ``pread`` while it is in the core's cache; on an object store S1 + S2 in one ranged
  GET, the batch's requests ``requests_in_flight`` at a time (without a node cache, or while a shard is
  still downloading into it), so a reader is bound by bandwidth rather than by one request's latency;
- the ``.npy`` header of a member is checked by comparing its bytes with headers already seen (a dataset
  holds one header per sensor), instead of being parsed for every member;
- S2 is handed over with all its stored bands, as a view of the read buffer: the DALI graph selects the
  bands (``dali_pipeline.select_channels``), free on the GPU, where ``np.take`` on channels-last uint16 cost
  more CPU than the read;
- the view parameters of a batch come out as a few dense arrays.

What a batch holds is a pure function of (seed, epoch, step, rank): the same samples and parameters as
drawn per sample, whatever the number of workers or requests in flight.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from eossl.ingest.bands import PATCH_SIZE
from eossl.ingest.catalog import Catalog, member_crc32c
from eossl.ingest.format import npy_view

from .node_catalog import attach, detach
from .plan import EpochPlan, LoaderPosition, PlanConfig
from .storage import CorruptShardError, ShardReader
from .temporal import SeasonPartners
from .views import ViewSet

__all__ = ["COALESCE_GAP_BYTES", "MemberChecksums", "SampleSource", "source_outputs"]

COALESCE_GAP_BYTES = 64 * 2**10  # members at most this far apart are read together (tar headers, padding)
# partner: the row view 1 is made of in the temporal mode (else the row itself)
IDS = ("row", "position", "epoch", "substituted", "corrupt_shard", "partner")


def source_outputs(views: ViewSet) -> int:
    """Outputs per batch: one array per sensor and sample read per position (``views.sources``), the ids,
    then (matrix, gain, offset, sigma) per view."""
    return len(views.sensors) * views.sources + 1 + 4 * len(views.views)


class _Headers:
    """``.npy`` headers seen so far -> (dtype, shape, data offset): a member whose header bytes equal a
    known one needs no parse (a dataset has one header per sensor and patch shape)."""

    def __init__(self, patch_size: int = PATCH_SIZE):
        self._known: dict[bytes, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        self.patch_size = patch_size

    def view(self, raw: memoryview) -> np.ndarray:
        if len(raw) < 12 or raw[:6] != b"\x93NUMPY":
            raise ValueError("not an .npy member (bad magic)")
        start = 10 if raw[6] == 1 else 12
        end = start + int.from_bytes(raw[8:start], "little")
        header = bytes(raw[:end])
        known = self._known.get(header)
        if known is None:
            arr = npy_view(raw)  # full parse and size check, once per distinct header
            if arr.ndim != 3 or arr.shape[:2] != (self.patch_size, self.patch_size):
                raise ValueError(f"shape {arr.shape}")
            self._known[header] = (arr.dtype, arr.shape, end, end + arr.nbytes)
            return arr
        dtype, shape, offset, nbytes = known
        if len(raw) != nbytes:
            raise ValueError(f".npy member is {len(raw)} bytes, its header says otherwise")
        return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


class MemberChecksums:
    """``ReadCheck`` of one read holding a sample's members: each member's CRC-32C, computed piece by piece
    as the read's bytes arrive (``member_crc32c`` continues a CRC), against the catalog's.

    ``members``: (sensor, offset in the shard, size, expected CRC) of the members to check; ``start``: the
    read's first byte in the shard. Bytes between members (tar headers) are not checked.
    """

    __slots__ = ("_at", "_crc", "_key", "_members", "_row", "_start")

    def __init__(self, start: int, members: list[tuple[str, int, int, int]], key: np.ndarray, row: int):
        self._start = start
        self._members = members
        self._key = key
        self._row = row
        self.begin()

    def begin(self) -> None:
        self._at = self._start
        self._crc = [0] * len(self._members)

    def update(self, data: memoryview) -> None:
        at, end = self._at, self._at + len(data)
        for i, (_, offset, size, _) in enumerate(self._members):
            lo, hi = max(offset, at), min(offset + size, end)
            if lo < hi:
                self._crc[i] = member_crc32c(data[lo - at : hi - at], self._crc[i])
        self._at = end

    def problem(self) -> str | None:
        for (sensor, offset, size, want), got in zip(self._members, self._crc, strict=True):
            if got != want:
                return (
                    f"{sensor} member of sample {self._key[self._row]} (row {self._row}, bytes {offset}-"
                    f"{offset + size}) fails its checksum: crc32c {got:08x}, the catalog says {want:08x}"
                )
        return None


class SampleSource:
    """Batch callable for DALI's external source (pickled into reader processes).

    Maps DALI's (epoch_idx, iteration) to this rank's positions in the epoch plan, reads the samples'
    members and draws their view parameters. Raises StopIteration at the epoch's end.

    Outputs (``source_outputs``): per sensor in ``views.sensors`` a list of HWC arrays (S1 float32 with
    non-finite values replaced by ``s1_fill``, S2 uint16 with every stored band; read-only views of a
    mapped file, or arrays in the read buffers: an S1 with values to fill is copied there first), in the
    temporal mode then the same for the partners; ``ids`` (B, 6) int64 (row, position, epoch,
    substituted, corrupt shard or -1, partner row); per view ``matrix`` (B, 2, 3), ``gain`` and
    ``offset`` (B, C), ``sigma`` (B,), float32.
    """

    def __init__(
        self,
        reader: ShardReader,
        catalog: Catalog,
        rows: np.ndarray,
        views: ViewSet,
        s1_fill: np.ndarray,
        plan_cfg: PlanConfig,
        batch_size: int,
        rank: int,
        world_size: int,
        start: LoaderPosition,
        on_corrupt: str,
        lookahead_steps: int,
        requests_in_flight: int = 1,
        patch_size: int = PATCH_SIZE,
        partners: SeasonPartners | None = None,
    ):
        self.reader = reader
        self.shard = catalog.shard
        self.offset = {s: catalog.offset[s] for s in views.sensors}
        self.size = {s: catalog.size[s] for s in views.sensors}
        self.crc = {s: catalog.crc32c[s] for s in views.sensors} if catalog.crc32c is not None else None
        self.key = catalog.key
        self.rows = rows
        self.views = views
        self.s1_fill = s1_fill
        self.plan_cfg = plan_cfg
        self.batch_size = batch_size
        self.global_batch = batch_size * world_size
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.on_corrupt = on_corrupt
        self.lookahead_steps = lookahead_steps
        self.requests_in_flight = requests_in_flight
        self.patch_size = patch_size
        if views.sources > 1 and partners is None:
            raise ValueError(f"view mode {views.cfg.mode!r} reads a partner per sample: give its partners")
        self.partners = partners
        self._init_runtime()

    def _init_runtime(self) -> None:
        # Plain-array views of the catalog's columns for the per-sample lookups: an element of a
        # ``np.memmap`` costs ~2 us through its Python ``__getitem__``, of an ndarray ~0.1 us.
        self._shard_of = self.shard.view(np.ndarray)
        self._offset_of = {s: a.view(np.ndarray) for s, a in self.offset.items()}
        self._size_of = {s: a.view(np.ndarray) for s, a in self.size.items()}
        self._crc_of = {s: a.view(np.ndarray) for s, a in self.crc.items()} if self.crc is not None else None
        self._plans: dict[int, EpochPlan] = {}
        self._buffers: dict[tuple, np.ndarray] = {}
        self._headers = {s: _Headers(self.patch_size) for s in self.views.sensors}
        self._pool: ThreadPoolExecutor | None = None
        self._placed = None

    def use_buffers(self, place) -> None:
        """Read into ``place(key, nbytes)``'s buffers instead of this object's own (``shared_readers``: the
        batch's slot of shared memory). ``key`` is ('span', k) or ('raw', sensor, k) for sample slot k."""
        self._placed = place

    def __getstate__(self) -> dict:
        runtime = (
            "_plans",
            "_buffers",
            "_headers",
            "_pool",
            "_placed",
            "_shard_of",
            "_offset_of",
            "_size_of",
        )
        runtime += ("_crc_of",)
        # the node's catalog maps travel as file names (node_catalog), not as pickled arrays
        return detach({k: v for k, v in self.__dict__.items() if k not in runtime})

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(attach(state))
        self._init_runtime()

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            self._plans = {
                epoch: EpochPlan(self.rows, self.shard[self.rows], self.plan_cfg, epoch, self.global_batch)
            }
        return self._plans[epoch]

    def _buffer(self, key: tuple, nbytes: int) -> np.ndarray:
        """A byte buffer per (purpose, slot in the batch): where ``use_buffers`` placed it (shared memory),
        else one of this object's, reused at the next call (DALI copies a batch when the call returns).
        Reuse avoids the page faults of a fresh 2 MB allocation per member, which cost more than the read
        itself."""
        if self._placed is not None:
            return self._placed(key, nbytes)
        buf = self._buffers.get(key)
        if buf is None or buf.nbytes < nbytes:
            buf = np.empty(nbytes, dtype=np.uint8)
            self._buffers[key] = buf
        return buf

    # -- one sample ------------------------------------------------------------------------------------
    def _checksums(self, row: int, spans: dict[str, tuple[int, int]], start: int) -> MemberChecksums | None:
        """The read's check: each member's CRC-32C against the catalog's (None when the catalog records none
        for these members)."""
        if self._crc_of is None:
            return None
        members = [(s, o, n, int(self._crc_of[s][row])) for s, (o, n) in spans.items()]
        checked = [m for m in members if m[3] >= 0]
        return MemberChecksums(start, checked, self.key, row) if checked else None

    def _member_bytes(self, row: int, slot: int) -> dict[str, memoryview]:
        """The sample's members: one ranged GET for all of them on an object store, one read per member from
        a local file.

        Ingest writes a sample's members one after the other (a 512-byte tar header between them), so on
        an object store without a cache, where the request, not the bytes, is the cost, S1 + S2 is one
        ranged GET instead of two. Locally, a member is read and checked in pieces (``READ_CHUNK_BYTES``),
        the last member first: the first one, S1, which ``_read`` then scans for non-finite values, is
        read last and still in the core's cache for that scan.
        """
        shard = int(self._shard_of[row])
        spans = {s: (int(self._offset_of[s][row]), int(self._size_of[s][row])) for s in self.views.sensors}
        if len(spans) > 1 and not self.reader.is_local:
            start = min(o for o, _ in spans.values())
            end = max(o + n for o, n in spans.values())
            if end - start - sum(n for _, n in spans.values()) <= COALESCE_GAP_BYTES:
                check = self._checksums(row, spans, start)
                raw = self.reader.view(shard, start, end - start, verify=check)
                if raw is None:
                    out = self._buffer(("span", slot), end - start)
                    raw = memoryview(self.reader.read(shard, start, end - start, out=out, verify=check))
                return {s: raw[o - start : o - start + n] for s, (o, n) in spans.items()}
        members = {}
        for sensor, (offset, size) in sorted(spans.items(), key=lambda item: -item[1][0]):
            check = self._checksums(row, {sensor: (offset, size)}, offset)
            raw = self.reader.view(shard, offset, size, verify=check)
            if raw is None:
                out = self._buffer(("raw", sensor, slot), size)
                raw = memoryview(self.reader.read(shard, offset, size, out=out, verify=check))
            members[sensor] = raw
        return members

    def _read(self, row: int, slot: int = 0) -> list[np.ndarray]:
        """The sample's HWC arrays, one per sensor: views of the slot's buffers, non-finite S1 filled."""
        arrays = []
        members = self._member_bytes(row, slot)
        shard = int(self._shard_of[row])
        for sensor in self.views.sensors:
            try:
                arr = self._headers[sensor].view(members[sensor])
            except ValueError as exc:
                raise CorruptShardError(
                    f"{self.reader.url(shard)}: {sensor} member of sample {self.key[row]} (row {row}) is "
                    f"not a valid patch array ({exc})"
                ) from exc
            if sensor == "s1" and not self._all_finite(arr):  # NaN/Inf kept by ingest: band mean
                if not arr.flags.writeable:  # the file's bytes in place: filled in a copy in the read buffer
                    buffer = self._buffer(("raw", sensor, slot), arr.nbytes)[: arr.nbytes]
                    copy = buffer.view(arr.dtype).reshape(arr.shape)
                    np.copyto(copy, arr)
                    arr = copy
                np.copyto(arr, self.s1_fill, where=~np.isfinite(arr))
            arrays.append(arr)
        return arrays

    def _all_finite(self, arr: np.ndarray) -> bool:
        """Whether every value is finite, into a reused mask: a fresh 128 KB mask per sample is mapped and
        unmapped by the allocator each time, page faults included, ~4x the cost of the test itself."""
        mask = self._buffers.get(("finite", arr.shape))
        if mask is None:
            mask = self._buffers[("finite", arr.shape)] = np.empty(arr.shape, dtype=bool)
        return bool(np.isfinite(arr, out=mask).all())

    def _sample(self, plan: EpochPlan, position: int, slot: int) -> tuple[list[np.ndarray], int, int, int]:
        """(arrays, row, substituted, corrupt shard) of ``position``; a sample of a corrupt shard is
        replaced by the next readable one of the epoch's order (or raises with on_corrupt='fail')."""
        substituted, corrupt_shard = 0, -1
        for probe in range(position, position + len(plan.order)):
            row = int(plan.order[probe % len(plan.order)])
            try:
                return self._read(row, slot), row, substituted, corrupt_shard
            except CorruptShardError as exc:
                if self.on_corrupt == "fail":
                    raise
                warnings.warn(f"skipping sample of a corrupt shard: {exc}", stacklevel=1)
                if not substituted:
                    substituted, corrupt_shard = 1, int(self.shard[row])
        raise CorruptShardError("every shard of the epoch is corrupt")

    # -- one batch -------------------------------------------------------------------------------------
    def positions(self, epoch_idx: int, iteration: int) -> tuple[int, EpochPlan, np.ndarray]:
        """(epoch, plan, this rank's positions) of DALI's batch; StopIteration past the epoch's end."""
        epoch = self.start.epoch + epoch_idx
        step = iteration + (self.start.step if epoch_idx == 0 else 0)
        plan = self.plan(epoch)
        if step >= plan.steps:
            raise StopIteration
        return epoch, plan, plan.positions(step, self.rank, self.world_size)

    def _with_partner(self, plan: EpochPlan, position: int, slot: int) -> tuple:
        """``_sample`` and, in the temporal mode, the partner's arrays and row (``temporal.py``).

        A partner in a corrupt shard is replaced by the sample itself (with on_corrupt='skip'; counted as
        a substitution of that shard), so that the position still yields its two views.
        """
        arrays, row, substituted, corrupt_shard = self._sample(plan, position, slot)
        if self.partners is None:
            return arrays, row, substituted, corrupt_shard, [], row
        partner = self.partners.partner(row, self.plan_cfg.seed, plan.epoch, position)
        if partner == row:
            return arrays, row, substituted, corrupt_shard, arrays, row
        try:
            return (
                arrays,
                row,
                substituted,
                corrupt_shard,
                self._read(partner, slot + self.batch_size),
                partner,
            )
        except CorruptShardError as exc:
            if self.on_corrupt == "fail":
                raise
            warnings.warn(f"partner of a corrupt shard replaced by its sample: {exc}", stacklevel=1)
            shard = corrupt_shard if corrupt_shard >= 0 else int(self.shard[partner])
            return arrays, row, 1, shard, arrays, row

    def _read_batch(self, plan: EpochPlan, positions: np.ndarray) -> list:
        jobs = [(plan, int(p), slot) for slot, p in enumerate(positions)]
        if self.requests_in_flight <= 1 or self.reader.is_local or len(jobs) == 1:  # preads: no threads
            return [self._with_partner(*job) for job in jobs]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.requests_in_flight, thread_name_prefix="eossl-read")
        return list(self._pool.map(lambda job: self._with_partner(*job), jobs))

    def __call__(self, info) -> tuple:
        epoch, plan, positions = self.positions(info.epoch_idx, info.iteration)
        # The last batch's mappings are dropped (unmapped once nothing points into them): a process maps
        # the pages of the batch it reads, not of every shard it holds open.
        self.reader.unmap_files()
        if self.lookahead_steps > 0:
            first = int(positions[0])
            ahead = plan.order[first : first + self.lookahead_steps * self.global_batch]
            self.reader.prefetch(list(dict.fromkeys(self.shard[ahead].tolist())))
        samples = self._read_batch(plan, positions)
        ids = np.empty((len(positions), len(IDS)), dtype=np.int64)
        for i, (_, row, substituted, corrupt_shard, _, partner) in enumerate(samples):
            ids[i] = (row, positions[i], epoch, substituted, corrupt_shard, partner)
        n_sensors = len(self.views.sensors)
        per_sensor = [[s[0][k] for s in samples] for k in range(n_sensors)]
        if self.views.sources > 1:
            per_sensor += [[s[4][k] for s in samples] for k in range(n_sensors)]
        params = []
        for view in self.views.draw_batch(self.plan_cfg.seed, epoch, positions):
            params += [view.matrix, view.gain, view.offset, view.sigma]
        return (*per_sensor, ids, *params)
