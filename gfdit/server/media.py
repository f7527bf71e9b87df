"""Encoding results for HTTP: PNG (Pillow) for images, H.264 MP4 (PyAV, FFmpeg's encoders) for video.

CPU-bound: the server calls these in a worker thread (asyncio.to_thread), never on the event loop.
"""

from __future__ import annotations

import base64
import io

import numpy as np

__all__ = ["kImageFormats", "image_bytes", "image_b64", "png_bytes", "mp4_bytes"]

kImageFormats = ("png", "jpeg", "webp")  # what image_bytes encodes (Pillow's PNG, JPEG and WebP writers)


def image_bytes(image: np.ndarray, fmt: str = "png", compression: int | None = None) -> bytes:
    """uint8 RGB [H, W, 3] -> an encoded image. `compression` (0-100, OpenAI's output_compression) is
    the JPEG/WebP quality, 100 the best (default 100, as OpenAI's); PNG is lossless and ignores it."""
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{fmt}: expected uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    if fmt not in kImageFormats:
        raise ValueError(f"image format must be one of {kImageFormats}, got {fmt!r}")
    quality = 100 if compression is None else compression
    if not 0 <= quality <= 100:
        raise ValueError(f"compression must be in [0, 100], got {compression}")
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image).save(buf, format="PNG")
    elif fmt == "jpeg":
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(image).save(buf, format="WEBP", quality=quality, lossless=False)
    return buf.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 RGB [H, W, 3] -> PNG."""
    return image_bytes(image, "png")


def image_b64(image: np.ndarray, fmt: str = "png", compression: int | None = None) -> str:
    """uint8 RGB [H, W, 3] -> base64 of its encoding (OpenAI's b64_json)."""
    return base64.b64encode(image_bytes(image, fmt, compression)).decode("ascii")


def mp4_bytes(frames: np.ndarray, fps: int) -> bytes:
    """uint8 RGB frames [F, H, W, 3] -> MP4 (H.264, yuv420p; MPEG-4 part 2 if FFmpeg lacks libx264).
    yuv420p needs even sizes: every preset's sizes are multiples of 16."""
    import av

    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"mp4: expected uint8 [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"mp4: yuv420p needs even sizes, got {width}x{height}")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
