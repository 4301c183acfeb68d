"""First-order linear recurrences (EMAs, discounted sums) as numpy array operations.

y[n] = x[n] + pole * y[n-1], y[-1] = 0, along one axis. Why not `scipy.signal.lfilter`:
importing scipy.signal costs ~0.6 s (it imports scipy.stats), paid by every `rts refresh`
and worker process, and these recurrences are its only use here.

Method: blocks of `BLOCK` samples. Within a block the recurrence is a product with one
(BLOCK x BLOCK) triangular matrix of powers pole^(i-j) (one BLAS call for the whole
array); the state each block hands on obeys the same recurrence over the blocks' last
values with pole^BLOCK, solved the same way (recursively, on BLOCK times fewer values),
and enters block j as state * pole^(i+1). Every power is computed directly (`**`), not by
repeated products. Accuracy: within a few ulps of the exact recurrence, at least as close
as a float64 loop (whose rounding grows as the pole nears 1); the tests compare with an
extended-precision loop.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike

BLOCK = 32  # fastest here: BLAS work per sample grows with it, passes over the data shrink


def first_order(x: ArrayLike, pole: float, axis: int = -1) -> np.ndarray:
    """y[n] = x[n] + pole * y[n-1] along `axis`, starting from y[-1] = 0 (float64 copy)."""
    if not 0.0 <= pole <= 1.0:
        raise ValueError(f"pole must be in [0, 1], got {pole}")
    values = np.asarray(x, dtype=np.float64)
    if values.ndim == 0:
        raise ValueError("first_order needs an array with at least one axis")
    out = _blocked(np.moveaxis(values, axis, -1), float(pole))
    if np.shares_memory(out, values):  # nothing to add (one sample, or pole 0): still a copy
        out = out.copy()
    # the blocked result is a new array already: no copy of the input is made first
    return np.ascontiguousarray(np.moveaxis(out, -1, axis))


def _blocked(x: np.ndarray, pole: float) -> np.ndarray:
    n = x.shape[-1]
    if n <= 1 or pole == 0.0:
        return x
    size = min(n, BLOCK)
    blocks = -(-n // size)
    lead = x.shape[:-1]
    padded = np.zeros((*lead, blocks * size))
    padded[..., :n] = x
    within, carried = _powers(pole, size)
    local = (padded.reshape(-1, size) @ within).reshape(*lead, blocks, size)
    if blocks > 1:
        # the true state at each block's end, then carried into the next block
        ends = _blocked(np.ascontiguousarray(local[..., -1]), pole**size)
        local[..., 1:, :] += ends[..., :-1, None] * carried
    return local.reshape(*lead, blocks * size)[..., :n]


@lru_cache(maxsize=256)
def _powers(pole: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(the within-block matrix pole^(i-j) for i >= j, pole^(i+1) per position), read-only.
    Cached: an LP replay calls this once per label with the same few poles."""
    lag = np.arange(size)[None, :] - np.arange(size)[:, None]
    within = np.where(lag >= 0, pole ** np.maximum(lag, 0), 0.0)
    carried = pole ** np.arange(1, size + 1, dtype=np.float64)
    for array in (within, carried):
        array.setflags(write=False)
    return within, carried
