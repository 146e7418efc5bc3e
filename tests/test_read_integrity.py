"""Integrity on the read path: every member's CRC-32C recorded at ingest and checked as it is read.

Faults are injected for real: bytes flipped in a local shard and in a node-cache copy after its download
check, a proxy in front of a real S3 server that damages response bodies, an object genuinely shorter
than the manifest on the first GET. Each outcome is asserted: the error names shard, member and sample,
or the sample is skipped and counted (per shard, in history.jsonl and MLflow), and nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch

from eossl.ingest.catalog import CATALOG_MEMBERS, Catalog, member_crc32c
from eossl.ingest.integrity import manifest_digest
from eossl.streaming.inputs import InputSpec
from eossl.streaming.loader import CorruptDataError, LoaderConfig, SSLLoader, StreamingError
from eossl.streaming.plan import PlanConfig
from eossl.streaming.shard_cache import marker_path
from eossl.streaming.source import MemberChecksums
from eossl.streaming.storage import READ_CHUNK_BYTES, CorruptShardError, ShardReader, StorageOptions
from eossl.streaming.views import ViewConfig

from conftest import TINY_MOCO, cli_set, training_env
from servers import TcpProxy, upload_tree

FAST_RETRIES = StorageOptions(retries=2, backoff_s=0.01, timeout_s=10)


def _cfg(**kw) -> LoaderConfig:
    base = LoaderConfig(
        batch_size=4,
        split="all",
        device="cpu",
        workers=0,
        num_threads=1,
        views=ViewConfig(mode="single", inputs=InputSpec(sensors=("s2",)), size=32),
        plan=PlanConfig(seed=3, shuffle_buffer=4),
        storage=FAST_RETRIES,
    )
    return replace(base, **kw)


def _catalog(root: Path) -> Catalog:
    return Catalog.from_bytes((root / "catalog.npz").read_bytes())


def _shards(root: Path) -> list[dict]:
    return json.loads((root / "manifest.json").read_text())["shards"]


def _flip(path: Path, offset: int, n: int = 64) -> None:
    """Invert ``n`` bytes of ``path`` at ``offset`` in place: same size, same inode, different content."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _victim(root: Path) -> tuple[int, str, int, int, int]:
    """(row, key, shard, offset, size) of the s2 member of the first sample of shard 1."""
    cat = _catalog(root)
    row = int(np.flatnonzero(cat.shard == 1)[0])
    return row, str(cat.key[row]), 1, int(cat.offset["s2"][row]), int(cat.size["s2"][row])


def _epoch(loader: SSLLoader) -> list:
    return list(loader)


def test_catalog_records_each_members_crc32(dataset):
    cat, shards = _catalog(dataset), _shards(dataset)
    assert cat.crc32c is not None
    checked = 0
    for shard, entry in enumerate(shards):
        with tarfile.open(dataset / entry["path"]) as tar:
            for row in np.flatnonzero(cat.shard == shard):
                for m in CATALOG_MEMBERS:
                    if cat.offset[m][row] < 0:
                        assert cat.crc32c[m][row] == -1
                        continue
                    name = f"{cat.key[row]}.json" if m == "json" else f"{cat.key[row]}.{m}.npy"
                    assert cat.crc32c[m][row] == member_crc32c(tar.extractfile(name).read())
                    checked += 1
    assert checked >= 3 * len(cat)


def _crc32c_bitwise(data: bytes, crc: int = 0) -> int:
    """CRC-32C from its definition, one bit at a time: reflected polynomial 0x82F63B78, initial value and
    final XOR 0xFFFFFFFF (RFC 3720, section 12.1); ``crc`` continues a CRC of the bytes before."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_member_crc32c_equals_the_definition_and_continues_across_pieces():
    # RFC 3720 appendix B.4's vectors and the customary check value of "123456789"
    assert member_crc32c(bytes(32)) == 0x8A9136AA
    assert member_crc32c(b"\xff" * 32) == 0x62A8AB43
    assert member_crc32c(bytes(range(32))) == 0x46DD794E
    assert member_crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert member_crc32c(b"123456789") == 0xE3069283
    rng = np.random.default_rng(0)
    buf = rng.integers(0, 256, 4096, dtype=np.uint8)
    for n in [*range(0, 70), 127, 128, 129, 255, 256, 257, 1000, 4000]:  # the kernels' tails and blocks
        start = int(rng.integers(0, 64))  # any alignment
        piece = buf[start : start + n]
        assert member_crc32c(memoryview(piece)) == _crc32c_bitwise(piece.tobytes()), (start, n)
    # a member checked piece by piece (as a checked read does) has its whole CRC, whatever the cuts
    big = rng.integers(0, 256, 3 * READ_CHUNK_BYTES + 12_345, dtype=np.uint8)
    whole = member_crc32c(big)
    assert member_crc32c(big[:5000]) == _crc32c_bitwise(big[:5000].tobytes())
    for cuts in ([READ_CHUNK_BYTES, 2 * READ_CHUNK_BYTES], sorted(rng.integers(1, len(big), 9).tolist())):
        crc, at = 0, 0
        for cut in [*cuts, len(big)]:
            crc = member_crc32c(big[at:cut], crc)
            at = cut
        assert crc == whole
    big[len(big) // 2] ^= 1
    assert member_crc32c(big) != whole


def test_member_checksums_fed_in_any_pieces_name_the_damaged_member():
    """Two members with a gap between them, as a read of S1 + S2 holds them: fed in pieces of any size
    (across members and gaps), each member's CRC is the catalog's; a flipped bit names its member; a
    damaged byte between members (a tar header) is no member's."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 3000, dtype=np.uint8)
    start = 10_000  # the read's first byte in the shard
    layout = [("s1", start + 100, 900), ("s2", start + 1512, 1400)]

    def members() -> list:
        return [(s, o, n, _crc32c_bitwise(data[o - start : o - start + n].tobytes())) for s, o, n in layout]

    keys = np.array(["sample-a", "sample-b"])
    expected = members()
    for piece in (1, 7, 512, 1000, 3000):
        check = MemberChecksums(start, expected, keys, 1)
        for at in range(0, len(data), piece):
            check.update(memoryview(data[at : at + piece]))
        assert check.problem() is None, piece
        check.begin()  # a new attempt forgets what was fed
        check.update(memoryview(data[:5]))
        assert check.problem() is not None
    # one member from the read's first byte (a local member read): the same in any pieces
    whole = [("s2", start, len(data), _crc32c_bitwise(data.tobytes()))]
    for piece in (1, 333, 3000):
        check = MemberChecksums(start, whole, keys, 0)
        for at in range(0, len(data), piece):
            check.update(memoryview(data[at : at + piece]))
        assert check.problem() is None, piece
    data[2999] ^= 1
    check = MemberChecksums(start, whole, keys, 0)
    check.update(memoryview(data))
    assert check.problem().startswith(f"s2 member of sample sample-a (row 0, bytes {start}-{start + 3000})")
    data[2999] ^= 1
    for where, member in ((100, "s1"), (999, "s1"), (1512, "s2"), (2911, "s2"), (1200, None)):
        data[where] ^= 0x10
        check = MemberChecksums(start, expected, keys, 1)
        check.update(memoryview(data[:1300]))
        check.update(memoryview(data[1300:]))
        problem = check.problem()
        data[where] ^= 0x10
        if member is None:
            assert problem is None
        else:
            o, n = dict((s, (o, n)) for s, o, n in layout)[member]
            assert problem.startswith(f"{member} member of sample sample-b (row 1, bytes {o}-{o + n})"), (
                problem
            )


@pytest.mark.parametrize("how", ["read", "view"])
def test_a_damaged_byte_in_any_piece_of_a_checked_local_read_is_caught(copy_of_dataset, how):
    """A local member is read and checked in ``READ_CHUNK_BYTES`` pieces (``read``), or checked where it
    lies in the mapped file (``view``): a flipped byte at either end of a piece, the member's first or
    last byte, fails the read and names the member."""
    root = copy_of_dataset
    row, key, shard, offset, size = _victim(root)
    assert size > 3 * READ_CHUNK_BYTES  # the s2 member spans several pieces
    cat = _catalog(root)
    path = root / _shards(root)[shard]["path"]
    reader = ShardReader(str(root), _shards(root))
    members = [("s2", offset, size, int(cat.crc32c["s2"][row]))]
    out = np.empty(size, dtype=np.uint8)

    def checked():
        check = MemberChecksums(offset, members, cat.key, row)
        if how == "read":
            return reader.read(shard, offset, size, out=out, verify=check)
        return reader.view(shard, offset, size, verify=check)

    assert member_crc32c(checked()) == members[0][3]
    for at in (0, READ_CHUNK_BYTES - 1, READ_CHUNK_BYTES, 2 * READ_CHUNK_BYTES + 1, size - 1):
        _flip(path, offset + at, 1)
        with pytest.raises(CorruptShardError, match=rf"{path.name}: s2 member of sample {key} .*crc32c"):
            checked()
        _flip(path, offset + at, 1)
    assert member_crc32c(checked()) == members[0][3]


def test_flipped_bytes_in_a_local_shard_fail_or_are_skipped_and_counted(copy_of_dataset):
    root = copy_of_dataset
    row, key, shard, offset, size = _victim(root)
    reference = _epoch(SSLLoader(str(root), _cfg()))
    _flip(root / _shards(root)[shard]["path"], offset + size // 2)
    shard_path = str(root / _shards(root)[shard]["path"])

    # fail: the error names the shard file, the member and the sample key.
    with pytest.raises(StreamingError, match=rf"shard-000001\.tar: s2 member of sample {key} .*crc32c"):
        _epoch(SSLLoader(str(root), _cfg(on_corrupt="fail")))

    # skip: the epoch keeps its length and batch size, one sample replaced, counted against its shard.
    loader = SSLLoader(str(root), _cfg(on_corrupt="skip", max_corrupt_fraction=0.5))
    with pytest.warns(UserWarning, match=f"sample {key}"):
        batches = _epoch(loader)
    assert len(batches) == len(reference) and all(len(b.rows) == 4 for b in batches)
    assert loader.substituted == 1 and loader.corrupt_shards == {shard_path: 1}
    assert sum(b.substituted for b in batches) == 1
    assert [s for b in batches for s in b.corrupt_shards] == [shard]
    delivered = torch.cat([b.rows for b in batches]).tolist()
    assert row not in delivered  # the damaged sample itself never reaches the model

    # skip, but above the allowed fraction: the run stops and names the shard.
    with pytest.raises(CorruptDataError, match=rf"{shard_path} \(1\)"):
        _epoch(SSLLoader(str(root), _cfg(on_corrupt="skip", max_corrupt_fraction=0.0)))


def test_a_catalog_without_checksums_is_read_with_a_warning(copy_of_dataset):
    """A dataset written before member checksums: read as before, said once (the loader's warning)."""
    root = copy_of_dataset
    cat = _catalog(root)
    (root / "catalog.npz").write_bytes(replace(cat, crc32c=None).to_bytes())
    manifest = json.loads((root / "manifest.json").read_text())
    assert "crc32c_s2" not in np.load(root / "catalog.npz").files
    manifest["catalog"]["sha256"] = hashlib.sha256((root / "catalog.npz").read_bytes()).hexdigest()
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="no member checksums"):
        loader = SSLLoader(str(root), _cfg())
    assert not loader.checksums
    assert len(_epoch(loader)) == len(loader)


# --- object storage: a real S3 server, a proxy that damages response bodies ---


class FlippingProxy(TcpProxy):
    """``TcpProxy`` that inverts the last byte of the next ``flips`` large chunks from the server.

    A chunk over 4 KiB from the server is part of a member's body (headers are a few hundred bytes and
    come first), so its last byte is body: the response stays well-formed HTTP with damaged content, as
    from a faulty hop or NIC.
    """

    flips = 0
    flipped = 0

    def _pumps(self, client: socket.socket, upstream: socket.socket) -> list:
        return [(self._pump, client, upstream), (self._pump_flipping, upstream, client)]

    def _pump_flipping(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                if len(data) > 4096:
                    with self._lock:
                        flip = self.flips > 0
                        self.flips -= flip
                        self.flipped += flip
                    if flip:
                        data = data[:-1] + bytes([data[-1] ^ 0xFF])
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def flipping_s3(dataset, s3_endpoint, monkeypatch):
    """The dataset at s3://integrity/ds behind a FlippingProxy (AWS_ENDPOINT_URL points at the proxy)."""
    s3fs.S3FileSystem.clear_instance_cache()
    upload_tree(dataset, "s3://integrity/ds")
    proxy = FlippingProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        yield proxy
    finally:
        proxy.stop()


def test_a_damaged_s3_response_is_fetched_again_then_named(dataset, flipping_s3):
    proxy = flipping_s3
    reference = _epoch(SSLLoader(str(dataset), _cfg()))
    loader = SSLLoader("s3://integrity/ds", _cfg(on_corrupt="fail"))
    proxy.flips = 1  # one response damaged: the fresh GET is clean, the epoch equals the local one
    got = _epoch(loader)
    assert proxy.flipped == 1 and loader.substituted == 0
    for x, y in zip(got, reference, strict=True):
        assert torch.equal(x.rows, y.rows) and torch.equal(x.views[0], y.views[0])

    loader = SSLLoader("s3://integrity/ds", _cfg(on_corrupt="fail"))
    proxy.flips = 10**6  # every response damaged: named after the retries
    with pytest.raises(
        StreamingError,
        match=r"s3://integrity/ds/shards/shard-\d+\.tar: s2 member of sample .*crc32c.*3 attempts",
    ):
        _epoch(loader)


def test_a_short_s3_response_is_retried(dataset, s3_endpoint):
    """The object is genuinely short on the first GET (a replaced or still-arriving object), whole on the
    retry: the read succeeds; short on every attempt: CorruptShardError naming the object."""
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdirs("integrity-short", exist_ok=True)
    shards = _shards(dataset)
    whole = (dataset / shards[0]["path"]).read_bytes()
    key = f"integrity-short/ds/{shards[0]['path']}"
    fs.pipe_file(key, whole[:1000])

    def heal(_delay: float) -> None:  # the back-off: meanwhile the whole object arrives
        fs.pipe_file(key, whole)

    reader = ShardReader("s3://integrity-short/ds", shards[:1], FAST_RETRIES, sleep=heal)
    assert reader.read(0, 512, 4096) == whole[512 : 512 + 4096]
    assert reader.stats["retries"] == 1 and reader.stats["requests"] == 2

    fs.pipe_file(key, whole[:1000])
    reader = ShardReader("s3://integrity-short/ds", shards[:1], FAST_RETRIES, sleep=lambda _: None)
    with pytest.raises(CorruptShardError, match=r"shard-000000\.tar: short read .*the same after 3 attempts"):
        reader.read(0, 512, 4096)
    assert reader.stats["retries"] == 2


def test_a_cached_shard_damaged_after_its_download_is_downloaded_again(dataset, s3_endpoint, tmp_path):
    s3fs.S3FileSystem.clear_instance_cache()
    upload_tree(dataset, "s3://integrity-cache/ds")
    cache = tmp_path / "cache"
    waiting = replace(FAST_RETRIES, cache_dir=str(cache), read_while_downloading=False)  # reads the copies
    cfg = _cfg(storage=waiting, on_corrupt="fail")
    reference = _epoch(SSLLoader(str(dataset), _cfg()))
    _epoch(SSLLoader("s3://integrity-cache/ds", cfg))  # fills the cache, each copy sha256-checked
    row, key, shard, offset, size = _victim(dataset)
    (copy,) = cache.rglob("shard-000001.*.tar")
    assert marker_path(copy).exists()  # verified once on this node: not hashed again by the next reader
    _flip(copy, offset + size // 2)  # the disk damages it afterwards (same size, same inode)

    got = _epoch(SSLLoader("s3://integrity-cache/ds", cfg))  # CRC mismatch -> copy dropped, downloaded again
    for x, y in zip(got, reference, strict=True):
        assert torch.equal(x.rows, y.rows) and torch.equal(x.views[0], y.views[0])
    (copy,) = cache.rglob("shard-000001.*.tar")
    assert copy.read_bytes() == (dataset / _shards(dataset)[shard]["path"]).read_bytes()

    # A copy without its verified marker (an older cache, or downloads not verified) is hashed before reuse.
    marker_path(copy).unlink()
    _flip(copy, offset + size // 2)
    reader = ShardReader("s3://integrity-cache/ds", _shards(dataset), waiting)
    assert (
        reader.read(shard, offset, size)
        == (dataset / _shards(dataset)[shard]["path"]).read_bytes()[offset : offset + size]
    )
    assert reader.stats["downloads"] == 1 and marker_path(copy).exists()


# --- training: the count in history.jsonl and MLflow, and the stop ---


def _train(dataset: Path, out: Path, **extra) -> subprocess.CompletedProcess:
    values = {**TINY_MOCO, "log_every": "1", **extra}
    args = ["train", "moco", "--data", str(dataset), "--out", str(out), "--max-steps", "3", "--seed", "1"]
    return subprocess.run(  # started in the run's parent folder: its default MLflow store is there
        [sys.executable, "-m", "eossl.launch", *args, *cli_set(values)],
        capture_output=True,
        text=True,
        timeout=600,
        env=training_env(),
        cwd=out.parent,
    )


@pytest.mark.slow
def test_training_counts_skipped_samples_and_stops_above_the_fraction(copy_of_dataset, tmp_path):
    import mlflow

    root = copy_of_dataset
    _, key, shard, offset, size = _victim(root)
    shard_path = root / _shards(root)[shard]["path"]
    _flip(shard_path, offset + size // 2)

    run = tmp_path / "skip"
    proc = _train(root, run, on_corrupt="skip", max_corrupt_fraction="0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"sample {key}" in proc.stderr  # the warning names the sample
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert history[-1]["replaced_samples"] == 1  # one epoch (3 steps): the damaged sample is met once
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (r,) = client.search_runs([client.get_experiment_by_name("eossl").experiment_id])
    assert client.get_metric_history(r.info.run_id, "replaced_samples")[-1].value == 1
    assert r.data.tags["data_member_checksums"] == "crc32c"

    stopped = _train(root, tmp_path / "stop", on_corrupt="skip", max_corrupt_fraction="0")
    assert stopped.returncode != 0
    assert "max_corrupt_fraction" in stopped.stderr and f"{shard_path} (1)" in stopped.stderr


def test_skipped_sample_counts_are_checkpointed_and_resumed(copy_of_dataset, tmp_path, monkeypatch):
    """Damaged samples in steps 1 and 3 of one epoch, the run checkpointed and stopped after step 1: the
    resumed run goes on from the checkpointed counts, so its total in history.jsonl is the run's and the
    epoch's second damaged sample exceeds ``max_corrupt_fraction`` (one allowed per epoch)."""
    from eossl.train.builders import loader_config
    from eossl.train.config import load_config
    from eossl.train.loop import train
    from eossl.train.methods import get_method

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the default store, ./mlflow.db, outside the checkout
    root, run = copy_of_dataset, tmp_path / "run"
    values = {**TINY_MOCO, "data": str(root), "out": str(run), "log_every": "1", "ckpt_every": "0"}
    cfg = load_config("moco", None, {**values, "max_steps": "1", "max_corrupt_fraction": "0.05"})
    loader = SSLLoader(str(root), loader_config(cfg, get_method("moco").views(cfg)))
    plan, per_epoch = loader.plan(0), len(loader) * cfg.batch_size
    assert plan.steps == 3 and 1 <= 0.05 * per_epoch < 2  # one skipped sample per epoch allowed, not two
    cat, shards = _catalog(root), _shards(root)
    damaged = [int(plan.order[plan.positions(step, 0, 1)][0]) for step in (0, 2)]
    for row in damaged:  # every member the views read, so the sample cannot be read
        for sensor in loader.views.sensors:
            size = int(cat.size[sensor][row])
            _flip(root / shards[int(cat.shard[row])]["path"], int(cat.offset[sensor][row]) + size // 2)
    first_path = shards[int(cat.shard[damaged[0]])]["path"]

    with pytest.warns(UserWarning, match=f"sample {cat.key[damaged[0]]}"):
        assert train(cfg).steps == 1
    (ckpt,) = (run / "checkpoints").glob("step-*")
    (state,) = json.loads((ckpt / "trainer.json").read_text())["replaced_samples"]  # one rank
    assert state == {"substituted": 1, "epoch": 0, "epoch_substituted": 1, "shards": {first_path: 1}}

    resumed = load_config("moco", None, {**values, "max_steps": "3", "max_corrupt_fraction": "0.05"})
    with pytest.warns(UserWarning), pytest.raises(CorruptDataError, match=r"2 samples skipped .* epoch 0"):
        train(resumed)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [(h["step"], h["replaced_samples"]) for h in history] == [(1, 1.0), (2, 1.0)]


def test_verify_deep_checks_every_members_checksum_and_names_the_damage(copy_of_dataset):
    """``eossl verify`` sees a shard whose sha256 differs; ``--deep`` names which sample and member."""
    from eossl.ingest.verify import verify

    root = copy_of_dataset
    assert verify(str(root), deep=True) == []
    cat, shards = _catalog(root), _shards(root)
    s2_row = _victim(root)[0]  # the s2 member of the first sample of shard 1: its last 64 bytes
    json_row = int(np.flatnonzero(cat.shard == 2)[-1])  # the json member of the last sample of shard 2:
    damaged = [
        (s2_row, "s2", int(cat.size["s2"][s2_row]) - 64, 64),
        (json_row, "json", 1, 1),
    ]  # it starts "{"
    expected = []
    for row, member, at, n in damaged:
        shard = root / shards[int(cat.shard[row])]["path"]
        start, size = int(cat.offset[member][row]), int(cat.size[member][row])
        _flip(shard, start + at, n)
        with open(shard, "rb") as f:
            f.seek(start)
            got = member_crc32c(f.read(size))
        want = int(cat.crc32c[member][row])
        assert got != want
        expected.append(
            f"{shard}: {member} member of sample {cat.key[row]} (bytes {start}-{start + size}) fails its "
            f"checksum: crc32c {got:08x}, the catalog says {want:08x}"
        )

    shallow = verify(str(root))
    assert any("shard-000001.tar: sha256/size differ" in p for p in shallow)
    assert not any("checksum" in p for p in shallow)
    assert [p for p in verify(str(root), deep=True) if "checksum" in p] == expected
