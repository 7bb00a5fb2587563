"""Size hints: how many embedding tokens an image or video will produce.

An engine often knows the number before the embedding exists (the image size
is in the request).  Passing it as ``LanguageEndpoint.request(...,
expected_tokens=N)`` allocates exactly ``ceil(N / block_size)`` blocks, so a
correct hint never needs a resume (resume stays the safety net for a wrong one).

Qwen2-VL / Qwen2.5-VL style vision towers: 14x14 patches, 2x2 spatial merge
(one token per 28x28 pixels), 2-frame temporal patches for video.  The
processor first resizes the image so that both sides are multiples of 28 and
the pixel count lies in ``[min_pixels, max_pixels]`` (``smart_resize`` of the
published image processor), then::

    image tokens = (H' / 28) * (W' / 28)
    video tokens = ceil(frames / 2) * (H' / 28) * (W' / 28)

Defaults are the published processor defaults: images ``min_pixels = 56*56``,
``max_pixels = 28*28*1280``; videos ``min_pixels = 128*28*28``,
``max_pixels = 768*28*28``.  When the engine already has the processor's
``image_grid_thw`` / ``video_grid_thw``, :func:`tokens_from_grid` is exact.
"""

from __future__ import annotations

import math

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 1280
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
MAX_RATIO = 200


def _positive(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def smart_resize(height: int, width: int, factor: int = PATCH_SIZE * MERGE_SIZE,
                 min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS) -> tuple[int, int]:
    """The size the Qwen2-VL processor resizes an image to: both sides
    multiples of ``factor``, the area within ``[min_pixels, max_pixels]``,
    the aspect ratio kept as closely as possible."""
    _positive("height", height)
    _positive("width", width)
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_RATIO}, got "
                         f"{max(height, width) / min(height, width):g}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def tokens_from_grid(t: int, h: int, w: int, merge_size: int = MERGE_SIZE) -> int:
    """Tokens of a processor grid ``(t, h, w)`` (``image_grid_thw`` / ``video_grid_thw``,
    in patches) after the ``merge_size`` x ``merge_size`` spatial merge."""
    for name, v in (("t", t), ("h", h), ("w", w), ("merge_size", merge_size)):
        _positive(name, v)
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid {h}x{w} is not divisible by the merge size {merge_size}")
    return t * h * w // (merge_size * merge_size)


def qwen2_vl_image_tokens(height: int, width: int, *, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
                          min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS) -> int:
    """Embedding tokens of one image of ``height`` x ``width`` pixels."""
    factor = patch_size * merge_size
    h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
    return tokens_from_grid(1, h // patch_size, w // patch_size, merge_size)


def qwen2_vl_video_tokens(frames: int, height: int, width: int, *, patch_size: int = PATCH_SIZE,
                          merge_size: int = MERGE_SIZE, temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
                          min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS) -> int:
    """Embedding tokens of a video of ``frames`` sampled frames of ``height`` x ``width``
    (the processor pads the frames to a multiple of ``temporal_patch_size``)."""
    _positive("frames", frames)
    factor = patch_size * merge_size
    h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
    t = -(-frames // temporal_patch_size)
    return tokens_from_grid(t, h // patch_size, w // patch_size, merge_size)


__all__ = ["smart_resize", "tokens_from_grid", "qwen2_vl_image_tokens", "qwen2_vl_video_tokens"]
