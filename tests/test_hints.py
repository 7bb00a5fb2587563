"""Size hints against the published Qwen2-VL formula.

The reference below follows the published processor step by step (round each
side to a multiple of 28; if the area exceeds max_pixels scale by
sqrt(area / max_pixels) and floor; if below min_pixels scale up and ceil; one
token per 28x28 pixels; video frames padded to pairs), written independently
of embresume.hints so that a slip in either shows.
"""

import math

import pytest
from hypothesis import given, settings, strategies as st

from embresume import hints


def reference_tokens(h, w, frames=None):
    min_px, max_px = (56 * 56, 28 * 28 * 1280) if frames is None else (128 * 28 * 28, 768 * 28 * 28)
    hb, wb = max(28, round(h / 28) * 28), max(28, round(w / 28) * 28)
    if hb * wb > max_px:
        b = math.sqrt(h * w / max_px)
        hb, wb = max(28, math.floor(h / b / 28) * 28), max(28, math.floor(w / b / 28) * 28)
    elif hb * wb < min_px:
        b = math.sqrt(min_px / (h * w))
        hb, wb = math.ceil(h * b / 28) * 28, math.ceil(w * b / 28) * 28
    t = 1 if frames is None else (frames + 1) // 2
    grid_h, grid_w = hb // 14, wb // 14          # patches of 14
    return t * grid_h * grid_w // 4              # 2x2 merge


@pytest.mark.parametrize("h, w, tokens", [
    (224, 224, 64),            # 8 x 8
    (448, 448, 256),
    (1008, 672, 36 * 24),
    (28, 28, 4),               # below min_pixels: scaled up to 56 x 56
    (2048, 2048, 35 * 35),     # above max_pixels: 980 x 980
    (1080, 1920, 26 * 47),     # 1920*1080 > max_pixels: 728 x 1316
])
def test_known_images(h, w, tokens):
    assert hints.qwen2_vl_image_tokens(h, w) == tokens == reference_tokens(h, w)


def test_known_videos():
    # 16 frames of 336 x 336: 8 temporal patches x 12 x 12
    assert hints.qwen2_vl_video_tokens(16, 336, 336) == 8 * 12 * 12
    # an odd frame count is padded to a pair
    assert hints.qwen2_vl_video_tokens(5, 336, 336) == 3 * 12 * 12
    # small video frames are scaled up to min_pixels = 128 * 28 * 28
    assert hints.qwen2_vl_video_tokens(2, 112, 112) == reference_tokens(112, 112, 2) >= 128


@settings(max_examples=400, deadline=None)
@given(st.integers(14, 8000), st.integers(14, 8000))
def test_image_tokens_match_the_published_formula(h, w):
    if max(h, w) / min(h, w) > 200:
        with pytest.raises(ValueError):
            hints.qwen2_vl_image_tokens(h, w)
        return
    n = hints.qwen2_vl_image_tokens(h, w)
    assert n == reference_tokens(h, w)
    hb, wb = hints.smart_resize(h, w)
    assert hb % 28 == 0 and wb % 28 == 0
    assert hb * wb <= 28 * 28 * 1280


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(28, 2000), st.integers(28, 2000))
def test_video_tokens_match_the_published_formula(frames, h, w):
    assert hints.qwen2_vl_video_tokens(frames, h, w) == reference_tokens(h, w, frames)


def test_grid_and_bad_values():
    assert hints.tokens_from_grid(1, 16, 16) == 64
    assert hints.tokens_from_grid(4, 24, 36) == 4 * 24 * 36 // 4
    for bad in [(0, 4, 4), (1, 3, 4), (1, 4, -2)]:
        with pytest.raises(ValueError):
            hints.tokens_from_grid(*bad)
    with pytest.raises(ValueError):
        hints.qwen2_vl_image_tokens(0, 100)
