"""DALI's WebDataset index files (``shards/shard-<i>.idx``), written from offsets ingest already knows.

``nvidia.dali.fn.readers.webdataset`` needs, per tar, where each sample's members lie. Without an index
file it walks every tar header at start-up (at full size 1,772 shards, on object storage one request per
member); with ``index_paths`` it reads one small text file per shard. The catalog already records every
member's data offset and size, so the index is written from it, with no second pass over the tars.

Format (DALI's ``wds2idx``, version ``v1.2``): a first line ``v1.2 <samples>``, then one line per sample
in tar order with, per member in tar order, ``<ext> <data offset> <size> <member name>``, where ``ext`` is
the name after the key's first dot (``s2.npy``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .catalog import CATALOG_MEMBERS, Catalog
from .format import SHARD_DIR, member_name
from .storage import DatasetRoot

__all__ = [
    "INDEX_VERSION",
    "index_path",
    "index_text",
    "index_text_from_catalog",
    "webdataset_files",
]

INDEX_VERSION = "v1.2"


def index_path(shard_path: str) -> str:
    """``shards/shard-000001.tar`` -> ``shards/shard-000001.idx``, beside its tar (as ``wds2idx`` does)."""
    if not shard_path.endswith(".tar"):
        raise ValueError(f"{shard_path}: a shard path ends with .tar")
    return shard_path[: -len(".tar")] + ".idx"


def _ext(member: str) -> str:
    return "json" if member == "json" else member_name(member)


def index_text(samples: Iterable[tuple[str, Mapping[str, Sequence[int]]]]) -> bytes:
    """The index of one shard from (key, {member: (data offset, size, ...)}) per sample in tar order.

    Members are listed in tar order (by offset), as ``wds2idx`` lists them; ``member`` is ``json`` or a
    modality (``s1``), absent members are left out.
    """
    lines = []
    for key, members in samples:
        parts = []
        for member, where in sorted(members.items(), key=lambda kv: int(kv[1][0])):
            ext = _ext(member)
            parts.append(f"{ext} {int(where[0])} {int(where[1])} {key}.{ext}")
        lines.append(" ".join(parts))
    return f"{INDEX_VERSION} {len(lines)}\n".encode() + "".join(f"{line}\n" for line in lines).encode()


def index_text_from_catalog(catalog: Catalog, shard: int) -> bytes:
    """The index of shard number ``shard`` from the catalog (what ``eossl verify --deep`` compares with)."""
    rows = [i for i in range(len(catalog)) if int(catalog.shard[i]) == shard]
    return index_text(
        (
            str(catalog.key[i]),
            {
                m: (int(catalog.offset[m][i]), int(catalog.size[m][i]))
                for m in CATALOG_MEMBERS
                if int(catalog.offset[m][i]) >= 0
            },
        )
        for i in rows
    )


def webdataset_files(dataset: str, manifest: dict) -> tuple[list[str], list[str]]:
    """(tar paths, index paths) of a dataset's shards, in manifest order, for ``fn.readers.webdataset``.

    Raises:
        FileNotFoundError: the dataset has no shards (ingested without ``--formats wds``) or no index
            files (written by an eossl that did not write them: ``wds2idx`` makes them).
    """
    out = DatasetRoot(dataset)
    shards = manifest.get("shards") or []
    if not shards:
        raise FileNotFoundError(f"{out.path(SHARD_DIR)}: no shards (ingest with --formats wds)")
    missing = [s["path"] for s in shards if not s.get("dali_index")]
    if missing:
        raise FileNotFoundError(
            f"{out.path(missing[0])}: the manifest lists no DALI index for it ({len(missing)} shards); "
            "re-ingest with this eossl, or write them with DALI's `wds2idx SHARD.tar SHARD.idx`"
        )
    return [out.path(s["path"]) for s in shards], [out.path(s["dali_index"]["path"]) for s in shards]
