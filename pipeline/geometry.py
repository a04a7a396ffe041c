"""Region geometry in numpy: the hint rectangle. Driver-safe (no torch)."""

from __future__ import annotations

import numpy as np

__all__ = ["largest_inscribed_rectangle"]


def largest_inscribed_rectangle(hole: np.ndarray) -> tuple[int, int, int, int]:
    """Largest axis-aligned rectangle made only of True pixels: `(y0, x0, y1, x1)`, ends exclusive.

    DTC pastes the product into this rectangle to build the hint. The search runs the classic
    "largest rectangle in a histogram" row by row (O(H*W)) over the hole's bounding box; a hole
    that fills its bounding box (every bbox row of the manifest) is answered directly.
    """
    hole = np.asarray(hole)
    if hole.ndim != 2:
        raise ValueError(f"hole mask must be 2-D (H, W), got shape {hole.shape}")
    hole = hole.astype(bool, copy=False)
    rows = np.flatnonzero(hole.any(axis=1))
    if rows.size == 0:
        raise ValueError("hole mask is empty: no pixel to paste the hint into")
    cols = np.flatnonzero(hole.any(axis=0))
    oy, ox = int(rows[0]), int(cols[0])
    box = hole[oy : int(rows[-1]) + 1, ox : int(cols[-1]) + 1]
    if box.all():
        return oy, ox, oy + box.shape[0], ox + box.shape[1]

    best = (0, 0, 0, 0, 0)  # area, y0, x0, y1, x1 (box coordinates)
    heights = np.zeros(box.shape[1] + 1, dtype=np.int64)  # sentinel 0 at the end flushes the stack
    for y, row in enumerate(box):
        heights[:-1] = np.where(row, heights[:-1] + 1, 0)
        hs = heights.tolist()
        stack: list[int] = []  # column indices with increasing heights
        for x, h in enumerate(hs):
            while stack and hs[stack[-1]] >= h:
                height = hs[stack.pop()]
                left = stack[-1] + 1 if stack else 0
                if height * (x - left) > best[0]:
                    best = (height * (x - left), y + 1 - height, left, y + 1, x)
            stack.append(x)
    _, y0, x0, y1, x1 = best
    return oy + y0, ox + x0, oy + y1, ox + x1
