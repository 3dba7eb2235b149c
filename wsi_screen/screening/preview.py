"""The report's pictures: WebP bytes for the page (:func:`webp`), a heatmap's preview (:func:`heatmap_preview`), and
that preview cached beside its heatmap (:func:`cached_heatmap_preview`) so that rewriting a report does not encode
again the previews of heatmaps that did not change (about a tenth of a second a slide, minutes for a thousand).

The cache is one file in the slide's folder (:data:`wsi_screen.screening.runfolder.PREVIEW_CACHE`): a JSON line
naming what the preview was made of (the heatmap's sha256 and the preview's settings, Pillow's version among them)
and the preview's own sha256, then the preview's bytes. It is used only when all of that matches, so a heatmap
redrawn, replaced, or copied in from elsewhere gets a new preview; a damaged or foreign file is rebuilt; a cache that
cannot be written (a read-only slide folder, a folder replaced meanwhile) costs the next report the encoding, not
the page. A report killed while it wrote the cache left no cache, so the next one writes it, and removes the killed
one's temporary file first.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

from wsi_screen._safe_write import atomic_write_bytes
from wsi_screen.errors import OutputWriteError
from wsi_screen.screening import runfolder

log = logging.getLogger(__name__)

#: the largest (width, height) of a heatmap's preview in the page, pixels: the title and legend stay readable
PREVIEW_PX = (800, 1000)
#: WebP quality of the previews
PREVIEW_QUALITY = 70
#: libwebp's effort: 6 took twice the time for ~4 % less
WEBP_METHOD = 4
#: the cache file's format, recorded in it: another is rebuilt
CACHE_FORMAT = 1


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


def cache_path(png: Path) -> Path:
    """Where the preview of the heatmap ``png`` is cached: beside it, in the slide's folder."""
    return png.with_name(runfolder.PREVIEW_CACHE)


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


def cached_heatmap_preview(png: Path) -> bytes:
    """:func:`heatmap_preview` of ``png``, from its cache when the heatmap and the settings are those the cached
    preview was made of; otherwise encoded and cached. Raises what reading an unreadable heatmap raises (OSError,
    ValueError, SyntaxError), never for the cache."""
    png_bytes = png.read_bytes()
    key = preview_key(png_bytes)
    path = cache_path(png)
    preview = _cached(path, key)
    if preview is not None:
        return preview
    preview = heatmap_preview(png_bytes)
    meta = json.dumps({"key": key, "sha256": hashlib.sha256(preview).hexdigest()}, sort_keys=True)
    with contextlib.suppress(OSError):  # a killed report's temporary file (it left no cache); best effort
        for left in path.parent.glob(f".{path.name}.*.tmp"):
            left.unlink(missing_ok=True)
    try:
        atomic_write_bytes(path, meta.encode("ascii") + b"\n" + preview)
    except OutputWriteError as exc:  # the page does not need it; the next report encodes again
        log.debug("preview not cached: %s", exc)
    return preview
