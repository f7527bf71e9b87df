"""gfdit.bench.alone's image comparison (the server round trip is tested in
tests/multiproc/test_server.py::test_bench_report_shows_chunk_batch_sizes)."""

import io

import numpy as np
import pytest
from PIL import Image

from gfdit.bench.alone import image_diff


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_diff_mean_and_max_in_uint8_units():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(8, 6, 3))
    b = a.copy()
    b[0, 0, 0] = 255 - b[0, 0, 0]  # one channel of one pixel changes by |255 - 2x|
    b[1] = np.clip(b[1] + 3, 0, 255)  # a row brightened by up to 3
    expected = np.abs(a.astype(int) - b.astype(int))
    mean, worst = image_diff(_png(a), _png(b))
    assert mean == pytest.approx(expected.mean()) and worst == expected.max()
    assert image_diff(_png(a), _png(a)) == (0.0, 0)


def test_image_diff_refuses_different_sizes():
    a = np.zeros((4, 4, 3))
    with pytest.raises(ValueError, match="different sizes"):
        image_diff(_png(a), _png(np.zeros((4, 5, 3))))
