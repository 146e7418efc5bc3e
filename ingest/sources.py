"""The registry of ingest sources and the detection of a tree's source (``--source-format``)."""

from __future__ import annotations

import fsspec

from .source import SEN12MS_SOURCE, Source

__all__ = [
    "FORMAT_CHOICES",
    "SOURCE_FORMATS",
    "AmbiguousSourceError",
    "detect_source",
    "get_source",
    "no_source_message",
    "recognised_sources",
    "source_of_manifest",
]

# Formats a tree is recognised as (``detect_source``), and every ``--source-format`` value: SSL4EO-S12's
# L2A product is chosen by name, since a tree holding both products is an L1C tree as well.
SOURCE_FORMATS: tuple[str, ...] = ("sen12ms", "bigearthnet-mm", "bigearthnet-v2", "ssl4eo-s12")
FORMAT_CHOICES: tuple[str, ...] = (*SOURCE_FORMATS, "ssl4eo-s12-l2a")

# Paths looked at to recognise a tree: enough for every layout's first sample, a bounded listing on
# a bucket of millions of files.
_DETECT_FILES = 400
_DETECT_DEPTH = 5


class AmbiguousSourceError(ValueError):
    """A tree matches several source layouts, or none: ``--source-format`` must say which."""


def get_source(name: str) -> Source:
    """The source of a ``--source-format`` value."""
    if name == "sen12ms":
        return SEN12MS_SOURCE
    if name == "bigearthnet-mm":
        from .bigearthnet import BIGEARTHNET_SOURCE  # noqa: PLC0415 - imported when used

        return BIGEARTHNET_SOURCE
    if name == "bigearthnet-v2":
        from .reben import REBEN_SOURCE  # noqa: PLC0415

        return REBEN_SOURCE
    if name == "ssl4eo-s12":
        from .ssl4eo import SSL4EO_SOURCE  # noqa: PLC0415

        return SSL4EO_SOURCE
    if name == "ssl4eo-s12-l2a":
        from .ssl4eo import SSL4EO_L2A_SOURCE  # noqa: PLC0415

        return SSL4EO_L2A_SOURCE
    raise ValueError(f"unknown source format {name!r}; choose from {', '.join(FORMAT_CHOICES)}")


def _sample_paths(fs, root: str) -> list[str]:
    """Relative paths of the first files of a tree, breadth first, a few levels deep."""
    if not fs.isdir(root):
        return []
    root = root.rstrip("/")
    paths: list[str] = []
    for folder, _, files in fs.walk(root, maxdepth=_DETECT_DEPTH):
        rel = folder[len(root) :].strip("/")
        paths += [f"{rel}/{f}" if rel else f for f in sorted(files)]
        if len(paths) >= _DETECT_FILES:
            break
    return paths


def recognised_sources(fs, root: str) -> list[Source]:
    """The sources whose layout the tree at ``root`` of ``fs`` has (none, one, or several)."""
    paths = _sample_paths(fs, root)
    return [get_source(name) for name in SOURCE_FORMATS if get_source(name).recognises(paths)]


def detect_source(url: str, storage_options: dict | None = None) -> Source:
    """The one source whose layout the tree at ``url`` has.

    Raises:
        AmbiguousSourceError: none or several layouts match; the message names the candidates and the
            option that chooses.
    """
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    matches = [s.name for s in recognised_sources(fs, root)]
    if len(matches) == 1:
        return get_source(matches[0])
    if matches:
        raise AmbiguousSourceError(
            f"ingest source {url!r} holds files of several layouts ({', '.join(matches)}); choose one with "
            f"--source-format {'|'.join(matches)}"
        )
    # No layout recognised: SEN12MS's own check says what was expected and what is there (archives...),
    # and the ingest adds the other layouts (``no_source_message``).
    return SEN12MS_SOURCE


def no_source_message() -> str:
    """What the other layouts look like, for the error on a tree in which no source is recognised."""
    others = [get_source(n) for n in SOURCE_FORMATS if n != "sen12ms"]
    return (
        "; nor "
        + "; nor ".join(f"{s.title} ({s.expected})" for s in others)
        + ("; --source-format chooses the layout")
    )


def source_of_manifest(manifest: dict) -> Source:
    """The source a dataset was ingested from (datasets written before sources existed are SEN12MS)."""
    return get_source(manifest.get("source", {}).get("format", "sen12ms"))
