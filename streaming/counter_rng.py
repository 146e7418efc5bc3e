"""Counter-based random numbers (Philox4x32-10) in NumPy: uniforms as a pure function of (seed, epoch,
position, stream, index), drawn for a whole batch in a few array operations.

Why not a ``numpy.random.Generator`` per sample and view, seeded with ``[seed, epoch, position, view]``:
seeding one costs ~30 us and the dozen scalar draws of a view ~70 us more, 0.2 ms per sample of a
two-view recipe, a third of what reading the sample's 2.2 MB costs. A counter-based generator (Salmon,
Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011) maps a counter and a key
to random bits with no state in between: the numbers of every sample of a batch come out of one
vectorised computation, and each still depends only on where the sample sits in the epoch, not on the
batch, rank or reader process that draws it.

Philox4x32-10 is the generator of Random123, cuRAND and JAX; ``philox4x32`` reproduces Random123's
published known-answer vectors (tests). The counter of a draw is ``(position, epoch, stream, block)``,
the key ``seed`` (64 bits): distinct (seed, epoch, position, stream) never share a counter and key.
"""

from __future__ import annotations

import numpy as np

__all__ = ["philox4x32", "uniforms"]

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32's multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # its key schedule (Weyl sequence) increments
_MASK = 0xFFFFFFFF
ROUNDS = 10


def philox4x32(counter: np.ndarray, key: tuple[int, int], rounds: int = ROUNDS) -> np.ndarray:
    """Philox4x32-``rounds`` of ``counter`` (..., 4) 32-bit words under ``key`` (two 32-bit words): the
    (..., 4) uint32 random words. Products of two 32-bit words are exact in uint64."""
    words = np.asarray(counter, dtype=np.uint64)
    c0, c1, c2, c3 = (words[..., i] for i in range(4))
    k0, k1 = np.uint64(key[0] & _MASK), np.uint64(key[1] & _MASK)
    for _ in range(rounds):
        p0, p1 = c0 * np.uint64(_M0), c2 * np.uint64(_M1)
        c0, c1, c2, c3 = (
            (p1 >> np.uint64(32)) ^ c1 ^ k0,
            p1 & _MASK,
            (p0 >> np.uint64(32)) ^ c3 ^ k1,
            p0 & _MASK,
        )
        k0, k1 = (k0 + np.uint64(_W0)) & np.uint64(_MASK), (k1 + np.uint64(_W1)) & np.uint64(_MASK)
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def uniforms(seed: int, epoch: int, positions: np.ndarray, stream: int | np.ndarray, n: int) -> np.ndarray:
    """(len(positions), n) float64 uniforms in [0, 1): row i depends only on (seed, epoch, positions[i],
    stream), number j of a row only on j (so a stream read with a larger ``n`` starts the same).
    ``stream`` may be a 1-D array of streams: (len(positions), len(stream), n), in one computation.

    Each Philox block gives four 32-bit words, two 53-bit doubles (NumPy's rule: 27 + 26 high bits).
    """
    positions = np.asarray(positions, dtype=np.int64)
    streams = np.atleast_1d(np.asarray(stream, dtype=np.int64))
    if positions.size and (positions.min() < 0 or positions.max() > _MASK):
        raise ValueError(f"sample positions must lie in [0, 2**32), got {positions.min()}..{positions.max()}")
    if not 0 <= epoch <= _MASK or streams.min() < 0 or streams.max() > _MASK:
        raise ValueError(f"epoch and streams must lie in [0, 2**32), got {epoch} and {stream}")
    blocks = (n + 1) // 2
    counter = np.empty((len(positions), len(streams), blocks, 4), dtype=np.uint64)
    counter[..., 0] = positions[:, None, None]
    counter[..., 1] = epoch
    counter[..., 2] = streams[None, :, None]
    counter[..., 3] = np.arange(blocks)
    seed %= 2**64
    words = philox4x32(counter, (seed & _MASK, seed >> 32)).astype(np.uint64)
    high = (words[..., 0::2] >> np.uint64(5)).astype(np.float64)  # 27 bits
    low = (words[..., 1::2] >> np.uint64(6)).astype(np.float64)  # 26 bits
    out = ((high * 67108864.0 + low) / 9007199254740992.0).reshape(len(positions), len(streams), 2 * blocks)
    return out[:, :, :n] if np.ndim(stream) else out[:, 0, :n]
