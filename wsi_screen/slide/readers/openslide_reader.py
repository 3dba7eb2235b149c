"""OpenSlide-backed reader: SVS, NDPI, MRXS, SCN, VMS, BIF, generic tiled TIFF, DICOM and the rest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide

from wsi_screen.errors import SlideOpenError, SlideReadError, UnsupportedFormatError
from wsi_screen.slide.readers import into
from wsi_screen.slide.readers.sanity import image_type_problem

_PROPERTY_PREFIXES = ("openslide.", "aperio.", "hamamatsu.", "mirax.", "dicom.", "tiff.", "leica.",
                      "philips.", "ventana.", "sakura.", "generic-tiff.")


def detect(path: Path) -> str | None:
    """OpenSlide's vendor string for ``path``, or None when OpenSlide does not recognise it."""
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


class OpenSlideReader:
    """Reads regions through one ``openslide.OpenSlide`` handle (thread-safe in OpenSlide itself)."""

    name = "openslide"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise UnsupportedFormatError(f"{path}: not a slide format OpenSlide reads") from exc
        except openslide.OpenSlideError as exc:
            raise SlideOpenError(f"{path}: {_explained(exc)}") from exc
        self.vendor = self._osr.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)

    def mpp(self) -> tuple[float, float] | None:
        props = self._osr.properties
        try:
            mx = float(props[openslide.PROPERTY_NAME_MPP_X])
            my = float(props[openslide.PROPERTY_NAME_MPP_Y])
        except (KeyError, ValueError):
            return None
        return mx, my

    def properties(self) -> dict[str, str]:
        props = self._osr.properties
        keep = {}
        for key in sorted(props):
            if not key.startswith(_PROPERTY_PREFIXES) or ".level[" in key:
                continue
            try:
                value = props[key]
            except (KeyError, UnicodeError):  # a damaged key (bytes that are not UTF-8) cannot be looked up
                continue
            if len(value) < 500:
                keep[key] = value
        return keep

    def read_region(self, level: int, xy_l0: tuple[int, int], size: tuple[int, int],
                    out: np.ndarray | None = None) -> np.ndarray:
        try:
            rgba = np.asarray(self._osr.read_region((int(xy_l0[0]), int(xy_l0[1])), level,
                                                    (int(size[0]), int(size[1]))))
        except openslide.OpenSlideError as exc:
            raise SlideReadError(f"{self.path}: corrupt or unreadable tile data near level-0 "
                                 f"({xy_l0[0]}, {xy_l0[1]}): {_one_line(exc)}") from exc
        return into(out, rgba_to_rgb_on_white(rgba))

    def close(self) -> None:
        self._osr.close()


def rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's premultiplied RGBA onto white (areas outside the scan become glass)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    # premultiplied: out = rgb + (255 - alpha)
    out = rgb.astype(np.uint16) + (255 - alpha[..., None]).astype(np.uint16)
    return np.minimum(out, 255).astype(np.uint8)


def _explained(exc: BaseException) -> str:
    """OpenSlide's refusal in the tool's words where its own are cryptic, else quoted on one line."""
    text = _one_line(exc)
    if "image flavor" in text:  # libdicom's reader: Image Type without its third value
        return image_type_problem()
    return f"OpenSlide cannot open it: {text}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
