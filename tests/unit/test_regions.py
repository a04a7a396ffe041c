"""Largest inscribed rectangle on hand-made holes (the hint's paste target)."""

import numpy as np
import pytest

from pipeline.regions import largest_inscribed_rectangle


def _hole(shape=(20, 30)):
    return np.zeros(shape, dtype=bool)


def test_rectangle_is_itself():
    hole = _hole()
    hole[3:9, 5:17] = True
    assert largest_inscribed_rectangle(hole) == (3, 5, 9, 17)


def test_l_shape_takes_the_bigger_arm():
    hole = _hole()
    hole[2:18, 2:6] = True  # vertical arm 16 x 4 = 64
    hole[14:18, 2:25] = True  # horizontal arm 4 x 23 = 92
    assert largest_inscribed_rectangle(hole) == (14, 2, 18, 25)


def test_ring_avoids_the_middle():
    hole = _hole((12, 12))
    hole[1:11, 1:11] = True
    hole[4:8, 4:8] = False  # ring of width 3: the best rectangles are its 3 x 10 sides
    y0, x0, y1, x1 = largest_inscribed_rectangle(hole)
    assert (y1 - y0) * (x1 - x0) == 30
    assert hole[y0:y1, x0:x1].all()


def test_one_pixel():
    hole = _hole()
    hole[7, 11] = True
    assert largest_inscribed_rectangle(hole) == (7, 11, 8, 12)


def test_result_is_always_inside_and_maximal_on_random_holes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        hole = rng.random((9, 11)) > 0.3
        if not hole.any():
            continue
        y0, x0, y1, x1 = largest_inscribed_rectangle(hole)
        assert hole[y0:y1, x0:x1].all()
        best = max(
            (b - a) * (d - c)
            for a in range(9)
            for b in range(a + 1, 10)
            for c in range(11)
            for d in range(c + 1, 12)
            if hole[a:b, c:d].all()
        )
        assert (y1 - y0) * (x1 - x0) == best


def test_empty_and_wrong_rank_are_value_errors():
    with pytest.raises(ValueError, match="empty"):
        largest_inscribed_rectangle(_hole())
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 4\)"):
        largest_inscribed_rectangle(np.ones((2, 3, 4), dtype=bool))


def test_a_bbox_partly_outside_is_clipped_and_a_normalised_one_is_told_bbox_is_in_pixels():
    from pipeline.regions import region_from_bbox
    from pipeline.schema import RowError

    hole = region_from_bbox([90, 80, 130, 120], 100, 100)  # past the right and bottom edges: clipped
    assert hole.sum() == 10 * 20 and hole[80:, 90:].all()
    for bbox, code in (([0.1, 0.2, 0.5, 0.6], "region_too_small"), ([0.5, 0.2, 0.1, 0.6], "bad_bbox")):
        with pytest.raises(RowError) as failure:
            region_from_bbox(bbox, 640, 480)
        assert failure.value.code == code and "bbox is in pixels" in str(failure.value)
    with pytest.raises(RowError) as failure:
        region_from_bbox([120, 0, 140, 20], 100, 100)  # entirely outside
    assert failure.value.code == "bad_bbox" and "in pixels" not in str(failure.value)
