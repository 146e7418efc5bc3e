"""Scene-level splits, the published SEN12MS split lists, the non-overlapping subset and label budgets.

Neighbouring SEN12MS patches overlap by up to 50 %, so a patch-level split leaks test pixels into
training. eossl's own splits are by scene (``ROIs1158_spring_1``), and every random choice is a pure
function of a seed, so any machine recomputes the same subsets.

To compare with published SEN12MS results, the authors' files are read as published: the hold-out
scene list (``ROIs1158_spring/s1_63``) and the patch-level train/test lists of the classification
benchmark (``ROIs1158_spring_s2_1_p30.tif`` per line, as text or as the benchmark's pickled Python list).
Pickles are parsed with a loader that builds nothing but lists, tuples, sets and strings, so a list
file from anywhere cannot run code.
"""

from __future__ import annotations

import io
import pickle
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .bands import PATCH_SIZE
from .layout import parse_patch_file

__all__ = [
    "PatchListSplit",
    "budget_subset",
    "canonical_scene",
    "non_overlapping",
    "official_patch_name",
    "official_scene_name",
    "patch_list_split",
    "read_patch_list",
    "read_scene_list",
    "scene_split",
    "source_split",
    "split_lines",
]

# ROIs1158_spring/s1_63 (published), ROIs1158_spring_s1_63, ROIs1158_spring_63, with or without a
# trailing slash; the sensor folder (s1/s2/lc) names the same scene.
_SCENE_ENTRY = re.compile(
    r"^(?P<roi>ROIs\d+)_(?P<season>spring|summer|fall|winter)[/_](?:(?:s1|s2|lc)_)?(?P<scene>\d+)/*$",
    re.IGNORECASE,
)


def canonical_scene(entry: str) -> str | None:
    """eossl's scene id (``ROIs1158_spring_63``) for any accepted spelling, or None if it is not one."""
    m = _SCENE_ENTRY.match(entry.strip())
    if m is None:
        return None
    return f"{m['roi']}_{m['season'].lower()}_{int(m['scene'])}"


def official_scene_name(scene_id: str) -> str:
    """The published hold-out list's spelling: ``ROIs1158_spring_63`` -> ``ROIs1158_spring/s1_63``."""
    roi, season, scene = scene_id.rsplit("_", 2)
    return f"{roi}_{season}/s1_{scene}"


def official_patch_name(key: str) -> str:
    """The benchmark lists' spelling of a sample (its S2 file name).

    ``ROIs1158_spring_1_p30`` -> ``ROIs1158_spring_s2_1_p30.tif``.
    """
    roi, season, scene, patch = key.split("_")
    return f"{roi}_{season}_s2_{scene}_{patch}.tif"


def _entries(text: str) -> Iterable[tuple[int, str]]:
    """(line number, entry) of a list file: '#' starts a comment, blank lines are skipped."""
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            yield number, entry


def read_scene_list(text: str, name: str) -> tuple[str, ...]:
    """Scene ids of a hold-out list, in file order, duplicates dropped.

    Accepts the published file as it is (``ROIs1158_spring/s1_63``) and the obvious other spellings.
    A line that is not a scene is an error naming ``name`` and the line, never skipped: a skipped
    test scene would silently train on test data.
    """
    scenes: dict[str, None] = {}
    for number, entry in _entries(text):
        scene = canonical_scene(entry)
        if scene is None:
            raise ValueError(
                f"{name}:{number}: {entry!r} is not a SEN12MS scene "
                "(expected e.g. ROIs1158_spring/s1_63 or ROIs1158_spring_63)"
            )
        scenes[scene] = None
    return tuple(scenes)


class _ListsOnlyUnpickler(pickle.Unpickler):
    """Builds only what pickle encodes without globals (str, int, list, tuple, dict) plus set types.

    Every other class or function is refused, so loading never runs code from the file.
    """

    _ALLOWED = {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set")}

    def find_class(self, module: str, name: str):  # noqa: D102 - see the class docstring
        if (module, name) in self._ALLOWED:
            return set if name == "set" else frozenset
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a split list holds only file names")

    def persistent_load(self, pid):  # noqa: D102
        raise pickle.UnpicklingError("refusing persistent ids: a split list holds only file names")


def _patch_names(data: bytes, name: str) -> Iterable[tuple[int, str]]:
    if name.endswith(".pkl") or data[:1] == b"\x80":
        try:
            obj = _ListsOnlyUnpickler(io.BytesIO(data), encoding="utf-8").load()
        except Exception as exc:  # noqa: BLE001 - any failure of a foreign pickle is the file's fault
            raise ValueError(f"{name}: not a pickled list of file names ({exc})") from exc
        if not isinstance(obj, (list, tuple, set, frozenset)):
            raise ValueError(f"{name}: a pickled split list must hold a list, found {type(obj).__name__}")
        for number, item in enumerate(sorted(obj) if isinstance(obj, (set, frozenset)) else obj, 1):
            if not isinstance(item, str):
                raise ValueError(f"{name}: item {number} is {type(item).__name__}, not a file name")
            yield number, item.strip()
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name}: not a text list of file names ({exc})") from exc
    yield from _entries(text)


def read_patch_list(data: bytes, name: str) -> tuple[str, ...]:
    """Sample keys (``ROIs1158_spring_1_p30``) of a patch-level list, in file order, duplicates dropped.

    ``data`` is a text list (one file name per line, any sensor, an optional folder before it) or a
    pickled Python list of such names (``name`` ending in ``.pkl``, or a pickle's first byte). An entry
    that is not a SEN12MS patch is an error naming the file and its line (or item).
    """
    keys: dict[str, None] = {}
    for number, entry in _patch_names(data, name):
        parsed = parse_patch_file(entry.replace("\\", "/").rsplit("/", 1)[-1])
        if parsed is None:
            raise ValueError(
                f"{name}:{number}: {entry!r} is not a SEN12MS patch file name "
                "(expected e.g. ROIs1158_spring_s2_1_p30.tif)"
            )
        keys[parsed[0].key] = None
    return tuple(keys)


@dataclass(frozen=True)
class PatchListSplit:
    """A patch-level split taken from published train/test lists.

    Attributes:
        patches: sample key -> 'train' or 'test', for every patch of the source.
        scenes: scene id -> 'train', 'test' or 'mixed' (patches of the scene on both sides).
        unlisted: keys of source patches in neither list; they train (see :func:`patch_list_split`).
        not_found: number of listed patches that the source does not have.
    """

    patches: dict[str, str]
    scenes: dict[str, str]
    unlisted: tuple[str, ...]
    not_found: int

    @property
    def mixed_scenes(self) -> list[str]:
        return sorted(s for s, v in self.scenes.items() if v == "mixed")


def patch_list_split(
    keys: Sequence[str], scene_ids: Sequence[str], train: Sequence[str], test: Sequence[str]
) -> PatchListSplit:
    """Assign every source patch to the split its list puts it in.

    A patch in both lists is an error (the lists contradict each other). A patch in neither list
    trains, as every patch outside the hold-out does in the scene protocol: with the published lists
    this is only the one patch the benchmark dropped for NaN SAR values; the count is recorded.
    Listed patches missing from the source (a partial download) are counted, not an error.
    """
    train_set, test_set = set(train), set(test)
    both = sorted(train_set & test_set)
    if both:
        raise ValueError(
            f"{len(both)} patches are in both the train and the test list (e.g. {', '.join(both[:3])})"
        )
    patches: dict[str, str] = {}
    unlisted: list[str] = []
    sides: dict[str, set[str]] = defaultdict(set)
    for key, scene in zip(keys, scene_ids, strict=True):
        split = "test" if key in test_set else "train"
        if key not in test_set and key not in train_set:
            unlisted.append(key)
        patches[key] = split
        sides[scene].add(split)
    scenes = {s: (v.pop() if len(v) == 1 else "mixed") for s, v in sorted(sides.items())}
    not_found = len((train_set | test_set) - set(patches))
    return PatchListSplit(patches, scenes, tuple(unlisted), not_found)


def source_split(
    keys: Sequence[str], scene_ids: Sequence[str], official: dict[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(sample key -> split, scene -> split or 'mixed') from the split a source's own metadata assigns.

    reBEN's metadata table gives each patch its official split (train, validation or test), so that a
    result names the same test patches as published ones. A sample the source places in no split is
    one it refused while listing (never written); it is counted as 'train', as unlisted patches are. A
    scene whose samples fall on several sides is 'mixed' in the scene map; the key map decides each sample.
    """
    by_key = {k: official.get(k, "train") for k in keys}
    sides: dict[str, set[str]] = defaultdict(set)
    for key, scene in zip(keys, scene_ids, strict=True):
        sides[scene].add(by_key[key])
    by_scene = {s: (v.pop() if len(v) == 1 else "mixed") for s, v in sorted(sides.items())}
    return by_key, by_scene


def split_lines(names: Iterable[str]) -> bytes:
    """A list file's bytes: one entry per line, newline-terminated."""
    return "".join(f"{n}\n" for n in names).encode()


def scene_split(
    scenes: Sequence[str],
    holdout_fraction: float,
    seed: int,
    holdout_scenes: Sequence[str] | None = None,
) -> dict[str, str]:
    """Assign every scene to 'train' or 'test'.

    With ``holdout_scenes`` the user's list is the test set, in any spelling :func:`canonical_scene`
    accepts (unknown names are an error: a typo would otherwise silently put the intended test scene
    into training). Otherwise a seeded permutation of
    the sorted scenes puts ``round(fraction * n)`` of them (at least one when there are two or more) in
    test.
    """
    unique = sorted(set(scenes))
    if holdout_scenes is not None:
        known = set(unique)
        unknown = [(i, s) for i, s in enumerate(holdout_scenes, 1) if (canonical_scene(s) or s) not in known]
        if unknown:
            listed = ", ".join(f"{s} (entry {i})" for i, s in unknown[:10])
            raise ValueError(f"hold-out scenes not found in the source: {listed}")
        test = {canonical_scene(s) or s for s in holdout_scenes}
    else:
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"holdout fraction must be in [0, 1), got {holdout_fraction}")
        n_test = int(round(holdout_fraction * len(unique)))
        if holdout_fraction > 0 and len(unique) >= 2:
            n_test = max(n_test, 1)
        order = np.random.default_rng(seed).permutation(len(unique))
        test = {unique[i] for i in order[:n_test]}
    return {s: ("test" if s in test else "train") for s in unique}


def non_overlapping(
    scene_ids: Sequence[str], crs: Sequence[str], transforms: np.ndarray, size: int = PATCH_SIZE
) -> np.ndarray:
    """First-come-first-served subset of patches that do not overlap any earlier kept patch of their scene.

    SEN12MS cuts scenes on a 128 px stride, so neighbours share up to half their area. Walking the
    patches in dataset order (patch number within scene), a patch is kept when its footprint does not
    intersect that of a kept patch of the same scene and CRS. Footprints come from the geotransforms,
    so the rule holds for any grid, not only the 128 px one.

    Args:
        scene_ids: scene of each sample, in dataset order.
        crs: CRS string of each sample.
        transforms: (N, 6) affine coefficients (a, b, c, d, e, f) of each sample.
        size: patch height and width in pixels (the dataset's; SEN12MS 256).
    Returns:
        (N,) bool mask of kept samples.
    """
    n = len(scene_ids)
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return keep
    t = np.asarray(transforms, dtype=np.float64).reshape(n, 6)
    x1, y1 = t[:, 2] + t[:, 0] * size, t[:, 5] + t[:, 4] * size
    boxes = np.stack(
        [np.minimum(t[:, 2], x1), np.minimum(t[:, 5], y1), np.maximum(t[:, 2], x1), np.maximum(t[:, 5], y1)],
        1,
    )
    # One group per (scene, CRS); within a group, dataset order. Arrays, not Python objects per sample.
    _, scene = np.unique(np.asarray(scene_ids), return_inverse=True)
    crs_codes, crs_of = np.unique(np.asarray(crs), return_inverse=True)
    group = scene.astype(np.int64) * len(crs_codes) + crs_of
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    for rows in np.split(order, bounds):
        kept = np.empty((len(rows), 4))
        k = 0
        for i in rows:
            box, others = boxes[i], kept[:k]
            # Strict inequalities: patches that only touch along an edge do not overlap.
            hit = (
                (box[2] > others[:, 0])
                & (others[:, 2] > box[0])
                & (box[3] > others[:, 1])
                & (others[:, 3] > box[1])
            )
            if not hit.any():
                keep[i] = True
                kept[k] = box
                k += 1
    return keep


def budget_subset(labels: np.ndarray, eligible: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """Seeded subset of exactly ``budget`` eligible labelled samples, stratified by class.

    Each class gets ``budget * share`` samples (share of the class among eligible labelled samples),
    rounded by largest remainder; classes too small to fill their share give the rest to the others.
    Returns sorted sample indices.

    Args:
        labels: (N,) single-label class codes, 0 = no label (never selected).
        eligible: (N,) bool, e.g. the training split.
        budget: number of samples wanted; must not exceed the labelled eligible samples.
        seed: seed of the draw.
    """
    pool = np.flatnonzero(eligible & (labels > 0))
    if budget > len(pool):
        raise ValueError(f"label budget {budget} exceeds the {len(pool)} labelled training samples")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels[pool], return_counts=True)
    quota = np.zeros(len(classes), dtype=np.int64)
    remaining = budget
    # Water-fill: give every class its proportional share, capped by what it has, until the budget is used.
    open_ = counts > 0
    while remaining > 0 and open_.any():
        share = counts[open_] / counts[open_].sum() * remaining
        floor = np.floor(share).astype(np.int64)
        order = np.argsort(-(share - floor), kind="stable")
        floor[order[: remaining - floor.sum()]] += 1
        idx = np.flatnonzero(open_)
        quota[idx] += np.minimum(floor, counts[idx] - quota[idx])
        remaining = budget - quota.sum()
        open_ = quota < counts
    chosen = []
    for cls, q in zip(classes, quota, strict=True):
        members = pool[labels[pool] == cls]
        chosen.append(rng.choice(members, size=int(q), replace=False))
    out = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    assert len(out) == budget
    return out
