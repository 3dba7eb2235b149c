"""The report's pictures: WebP bytes for the page (:func:`webp`), a heatmap's preview (:func:`heatmap_preview`), and
that preview cached (:func:`cached_heatmap_preview`) so that rewriting a report does not encode again the previews
of heatmaps that did not change (about a tenth of a second a slide, minutes for a thousand).

The cache is the run folder's ``.previews`` folder (:data:`wsi_screen.screening.runfolder.PREVIEW_DIR`), not the
slide folders (which hold a slide's results only, written under its lock). An entry is named by the sha256 of what
its preview was made of (:func:`preview_key`: the heatmap's sha256 and the preview's settings, Pillow's version
among them; bump :data:`CACHE_FORMAT` when :func:`heatmap_preview` draws otherwise), so a heatmap redrawn, replaced,
or copied in from elsewhere names another entry and a stale preview cannot be served. An entry is a JSON line (the
key and the preview's sha256), then the preview's bytes: a damaged one is rebuilt; a cache that cannot be written (a
read-only run folder) costs the next report the encoding, not the page. :func:`prune_previews` removes the entries
a report build did not use (and a killed build's temporary files), so the cache holds one preview a pictured slide.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from wsi_screen._safe_write import atomic_write_bytes
from wsi_screen.errors import OutputWriteError

log = logging.getLogger(__name__)

#: the largest (width, height) of a heatmap's preview in the page, pixels: the title and legend stay readable
PREVIEW_PX = (800, 1000)
#: WebP quality of the previews
PREVIEW_QUALITY = 70
#: libwebp's effort: 6 took twice the time for ~4 % less
WEBP_METHOD = 4
#: the cache's format, part of every entry's key: bump it when the preview is made otherwise
CACHE_FORMAT = 2


def webp(image: Any, quality: int) -> bytes:
    """A picture (a PIL image, or an RGB uint8 array) as lossy WebP bytes at ``quality``, transparency flattened on
    white: how the page inlines its pictures."""
    from PIL import Image

    rgba = (image if isinstance(image, Image.Image) else Image.fromarray(image)).convert("RGBA")
    flat = Image.new("RGB", rgba.size, "white")
    flat.paste(rgba, mask=rgba.getchannel("A"))
    buf = io.BytesIO()
    flat.save(buf, format="WEBP", quality=quality, method=WEBP_METHOD)
    return buf.getvalue()


def heatmap_preview(png: Path | bytes) -> bytes:
    """A heatmap picture (a file, or its bytes) shrunk for the page: WebP bytes at most :data:`PREVIEW_PX` pixels
    (never enlarged) at :data:`PREVIEW_QUALITY`."""
    from PIL import Image

    with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as opened:
        image = opened.convert("RGBA")
    image.thumbnail(PREVIEW_PX, Image.Resampling.LANCZOS)
    return webp(image, PREVIEW_QUALITY)


def preview_key(png_bytes: bytes) -> dict[str, Any]:
    """What a heatmap's preview is made of: the heatmap's bytes (their sha256) and the preview's settings."""
    import PIL

    return {"format": CACHE_FORMAT, "heatmap_sha256": hashlib.sha256(png_bytes).hexdigest(),
            "max_px": list(PREVIEW_PX), "quality": PREVIEW_QUALITY, "method": WEBP_METHOD,
            "pillow": PIL.__version__}


def cache_path(cache_dir: Path, key: dict[str, Any]) -> Path:
    """Where the preview made of ``key`` is cached in ``cache_dir``: a file named by the key's sha256."""
    return cache_dir / hashlib.sha256(json.dumps(key, sort_keys=True).encode("ascii")).hexdigest()


def _cached(path: Path, key: dict[str, Any]) -> bytes | None:
    """The preview cached at ``path`` when it was made from ``key`` and is whole; None otherwise."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head, sep, preview = data.partition(b"\n")
    try:
        meta = json.loads(head)
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not sep or not isinstance(meta, dict) or meta.get("key") != key:
        return None
    if meta.get("sha256") != hashlib.sha256(preview).hexdigest():
        log.debug("%s: damaged preview cache; encoding the preview again", path)
        return None
    return preview


def cached_heatmap_preview(png: Path, cache_dir: Path) -> bytes:
    """:func:`heatmap_preview` of ``png``, from the cache in ``cache_dir`` when it holds the preview of these
    heatmap bytes at these settings (marked used: its time is set to now); otherwise encoded and cached. Raises what
    reading an unreadable heatmap raises (OSError, ValueError, SyntaxError), never for the cache."""
    png_bytes = png.read_bytes()
    key = preview_key(png_bytes)
    path = cache_path(cache_dir, key)
    preview = _cached(path, key)
    if preview is not None:
        with contextlib.suppress(OSError):  # used by this build: prune_previews keeps it
            os.utime(path)
        return preview
    preview = heatmap_preview(png_bytes)
    meta = json.dumps({"key": key, "sha256": hashlib.sha256(preview).hexdigest()}, sort_keys=True)
    try:
        atomic_write_bytes(path, meta.encode("ascii") + b"\n" + preview)
    except OutputWriteError as exc:  # the page does not need it; the next report encodes again
        log.debug("preview not cached: %s", exc)
    return preview


def prune_previews(cache_dir: Path, since: float) -> None:
    """Remove the entries of ``cache_dir`` that no report build used since ``since`` (a ``time.time()``), and
    temporary files of builds killed before it; best effort (a file another build is using only costs it the
    encoding)."""
    with contextlib.suppress(OSError):
        for entry in cache_dir.iterdir():
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < since:
                    entry.unlink()


def build_started() -> float:
    """The time a report build starts, for :func:`prune_previews` (a second early: file times may be coarser)."""
    return time.time() - 1.0
