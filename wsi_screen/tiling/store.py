"""PatchStore: the one module that knows the zarr layout of a slide's patch store.

Layout of ``OUT/<slide name>.zarr`` (zarr v3 group; see docs/store.md for users of plain zarr):

=============== ========================== ===================================================================
key             dtype, shape               meaning
=============== ========================== ===================================================================
``patches``     uint8 (N, S, S, 3)         RGB patches; one patch per chunk (encoded by the store's codec,
                                           :mod:`wsi_screen.tiling.codecs`), shards of many patches; absent
                                           from a coordinates-only store (``pixels`` ``"none"``), whose
                                           patches :class:`PatchStore` reads from the slide on demand
``coords``      int64 (N, 2)               level-0 (x, y) of each patch's top-left corner
``tissue``      float32 (N,)               fraction of the patch's footprint that is tissue
``stain_ok``    bool (N,)                  True where stain normalisation was applied, False where the patch
                                           passed unnormalised (too little stained tissue, pen, empty);
                                           absent from a coordinates-only store
``thumbnail``   uint8 (h, w, 3)            the whole slide at ``tissue.thumbnail_mpp``
``mask``        uint8 (h, w)               tissue label map on the thumbnail: 0 glass, 1 tissue, 2 pen,
                                           3 artifact
=============== ========================== ===================================================================

Group attributes: ``schema_version``, ``complete``, ``mpp``, ``patch_size``, ``tile_size_l0``, ``stride_l0``,
``n_patches``, ``codec`` (name, quality), ``pixels`` (``"store"`` or ``"none"``), ``reader_choice``,
``slide`` (path, name, vendor, reader, level-0 mpp, dimensions, fingerprint...), ``stain``
(method, fitted parameters, target), ``tissue`` (settings, ``thumbnail_mpp``, ``min_tissue``, labels),
``grid``, ``package_version`` and ``settings`` (what must match for a store to be reused).

Committing is atomic: a store is written under ``<name>.zarr.partial`` and renamed into place only after
every file has been fsynced and ``complete`` set, so a killed run never leaves a store that looks finished.
Patches are written a whole shard at a time by one writer (zarr-python #3682: concurrent partial-shard
writes lose data). On object stores (fsspec URLs) where rename does not exist, the store is written in place
and ``complete`` is written last.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from wsi_screen._safe_write import LockTaken, acquire, failure_text, fsync_file, fsync_tree, swap_in
from wsi_screen.errors import ConfigError, IncompleteStoreError, SchemaVersionError, StoreError, StoreLockedError, shown
from wsi_screen.tiling.codecs import BLOSC_CLEVEL, BLOSC_CNAME, PatchCodec

log = logging.getLogger(__name__)

#: version 2 added the patch codec (``codec``) and coordinates-only stores (``pixels`` ``"none"``, no ``patches``)
SCHEMA_VERSION = 2
#: versions this toolkit reads (version 1 is version 2 with lz4 patches)
READABLE_SCHEMAS = (1, 2)
#: the ``kind`` attribute of a store of embeddings (:mod:`wsi_screen.embedding.features` writes them; patch stores
#: have none): named here so that opening one as a patch store says what it is
EMBEDDINGS_KIND = "wsi-screen embeddings"

PATCHES = "patches"
COORDS = "coords"
TISSUE = "tissue"
STAIN_OK = "stain_ok"
THUMBNAIL = "thumbnail"
MASK = "mask"
ARRAY_KEYS = (PATCHES, COORDS, TISSUE, STAIN_OK, THUMBNAIL, MASK)

ATTR_SCHEMA = "schema_version"
ATTR_COMPLETE = "complete"
ATTR_SETTINGS = "settings"
ATTR_CODEC = "codec"
ATTR_PIXELS = "pixels"
#: ``pixels`` values: the store holds the patches, or only what is needed to read them from the slide
PIXELS_CHOICES = ("store", "none")

STORE_SUFFIX = ".zarr"
PARTIAL_SUFFIX = ".partial"

#: rows per chunk of the thumbnail and mask (zarr encodes a chunk with several temporary copies of it)
IMAGE_CHUNK_ROWS = 256
#: target uncompressed bytes per shard of patches
SHARD_BYTES = 8 << 20
#: how many batches of patches may wait for the background shard writer (bounds memory)
WRITE_BEHIND = 2
#: background threads writing patch shards (each shard file has exactly one writer)
WRITERS = 2


def is_url(location: str | os.PathLike[str]) -> bool:
    """True for fsspec URLs (``s3://``, ``gs://``, ``memory://`` ...), False for local paths."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_location(location: str | os.PathLike[str]) -> str:
    """``file://`` URLs as the plain path they name; other URLs and paths unchanged."""
    text = str(location)
    if not text.startswith("file://"):
        return text
    from urllib.parse import unquote, urlparse

    url = urlparse(text)
    if url.netloc not in ("", "localhost"):
        raise StoreError(f"{text}: file:// URLs must name a local path (file:///path/to/folder)")
    return unquote(url.path)


def store_location(out: str | os.PathLike[str], name: str) -> str:
    """Where the store of slide ``name`` lives under output location ``out``."""
    out = local_location(out)
    if is_url(out):
        return str(out).rstrip("/") + "/" + name + STORE_SUFFIX
    return str(Path(out) / (name + STORE_SUFFIX))


def partials(out: str | os.PathLike[str], names: Sequence[str]) -> dict[Path, Path]:
    """The ``<name>.zarr.partial`` work folders of the stores of ``names`` under ``out``, each with the store its
    writer locks (for :func:`~wsi_screen._safe_write.abandoned_work_removed`); none under a URL, where a store is
    written in place."""
    if is_url(local_location(out)):
        return {}
    return {Path(store_location(out, name) + PARTIAL_SUFFIX): Path(store_location(out, name)) for name in names}


def patches_per_shard(size_px: int) -> int:
    """How many patches one shard holds (a deterministic function of the patch size)."""
    return int(max(1, min(1024, SHARD_BYTES // (size_px * size_px * 3))))


def _compressor() -> zarr.codecs.BloscCodec:
    """Blosc/lz4 of every array but lossy-coded patches (see :mod:`wsi_screen.tiling.codecs`)."""
    return zarr.codecs.BloscCodec(cname=BLOSC_CNAME, clevel=BLOSC_CLEVEL, shuffle="noshuffle")


def _image_codec_class(codec_id: str) -> Any:
    """The zarr v3 array-to-bytes codec ``numcodecs.<codec_id>`` wrapping imagecodecs' numcodecs codec."""
    from zarr.codecs.numcodecs._codecs import _NumcodecsArrayBytesCodec

    class ImageCodec(_NumcodecsArrayBytesCodec, codec_name=codec_id):
        def __init__(self, **codec_config: Any) -> None:
            import warnings

            from zarr.errors import ZarrUserWarning

            with warnings.catch_warnings():  # "not in the zarr v3 specification": documented in docs/store.md
                warnings.simplefilter("ignore", ZarrUserWarning)
                super().__init__(**codec_config)

    ImageCodec.__name__ = ImageCodec.__qualname__ = "".join(p.capitalize() for p in codec_id.split("_"))
    return ImageCodec


#: numcodecs ids of the image codecs stores use, and their zarr v3 names (``numcodecs.<id>``)
IMAGE_CODEC_IDS = {"jpeg": "imagecodecs_jpeg", "jpegxl": "imagecodecs_jpegxl"}
ImagecodecsJpeg = _image_codec_class(IMAGE_CODEC_IDS["jpeg"])
ImagecodecsJpegxl = _image_codec_class(IMAGE_CODEC_IDS["jpegxl"])


def register_codecs() -> None:
    """Make zarr (and numcodecs) know the image codecs of lossy stores. Importing this module does it, and an
    installed wsi-screen declares them as ``zarr.codecs`` / ``numcodecs.codecs`` entry points, so plain zarr
    reads every store without importing wsi_screen (docs/store.md)."""
    import numcodecs.registry
    from imagecodecs import numcodecs as image_codecs
    from zarr.registry import register_codec

    for cls in (image_codecs.Jpeg, image_codecs.Jpegxl):
        numcodecs.registry.register_codec(cls)
    for wrapper in (ImagecodecsJpeg, ImagecodecsJpegxl):
        register_codec(wrapper.codec_name, wrapper)


register_codecs()


def _patch_codecs(codec: PatchCodec) -> dict[str, Any]:
    """``create_array`` keywords that encode each patch chunk with ``codec``."""
    if not codec.lossy:
        return {"compressors": _compressor()}
    config = codec.numcodec().get_config()
    config.pop("id")
    wrapper = ImagecodecsJpeg if codec.name == "jpeg" else ImagecodecsJpegxl
    return {"serializer": wrapper(**config), "compressors": None}


def encode_shard(patches: np.ndarray, shard: int, codec: PatchCodec | None = None) -> list[bytes]:
    """One ``patches`` shard file as its pieces in order (written one after the other, never joined in
    memory), byte for byte what zarr's ``sharding_indexed`` codec writes.

    zarr-python spends about a millisecond of Python per inner chunk, which with one patch per chunk made it
    the tiler's bottleneck. The format is small and fixed by the zarr v3 sharding specification: the inner
    chunks (``bytes`` + ``blosc``, or the image codec, encoded by the same numcodecs codec zarr uses), then the index of
    ``(offset, nbytes)`` little-endian uint64 pairs (``2**64 - 1`` for absent chunks) and its CRC32C.
    ``tests/tiling/test_store.py`` checks byte equality with zarr's own writer.
    """
    import google_crc32c

    encoder = (codec or PatchCodec("lz4")).numcodec()
    parts = [bytes(encoder.encode(np.ascontiguousarray(p))) for p in patches]
    index = np.full((shard, 2), np.iinfo(np.uint64).max, dtype="<u8")
    offset = 0
    for i, part in enumerate(parts):
        index[i] = (offset, len(part))
        offset += len(part)
    index_bytes = index.tobytes()
    crc = np.array([google_crc32c.value(index_bytes)], dtype="<u4").tobytes()
    return [*parts, index_bytes, crc]


def _write_parts(path: Path, parts: list[bytes]) -> None:
    """Write a file from its pieces in order, without joining them in memory."""
    with path.open("wb") as f:
        f.writelines(parts)


def _shard_decoder(meta: Mapping[str, Any]) -> Any | None:
    """The numcodecs codec that decodes one inner chunk when ``patches`` uses the layout :func:`encode_shard`
    writes (sharded, one patch per inner chunk, ``bytes`` + any ``blosc`` or one image codec inside, index
    at the end with ``crc32c``); None for any other layout (read through zarr)."""
    try:
        (codec,) = meta["codecs"]
        conf = codec["configuration"]
        inner = [c["name"] for c in conf["codecs"]]
        index = [c["name"] for c in conf["index_codecs"]]
        if inner == ["bytes", "blosc"]:
            from numcodecs import Blosc

            decoder: Any = Blosc()
        elif len(inner) == 1 and inner[0] in {f"numcodecs.{i}" for i in IMAGE_CODEC_IDS.values()}:
            import numcodecs.registry

            decoder = numcodecs.registry.get_codec({"id": inner[0].removeprefix("numcodecs."),
                                                    **conf["codecs"][0].get("configuration", {})})
        else:
            return None
        ok = (codec["name"] == "sharding_indexed"
                and index == ["bytes", "crc32c"] and conf.get("index_location", "end") == "end"
                and tuple(conf["chunk_shape"])[:1] == (1,) and meta["data_type"] == "uint8"
                and meta["chunk_key_encoding"]["name"] == "default"
                and meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") == "/")
        return decoder if ok else None
    except (KeyError, TypeError, ValueError):
        return None


def read_shard_patches(path: str, shard: int, wanted: np.ndarray, out: np.ndarray, decoder: Any = None) -> None:
    """Decode patches ``wanted`` (positions inside the shard, ascending) of one shard file into ``out``.

    The inverse of :func:`encode_shard`: one ``pread`` for the index, one for the span of the wanted chunks,
    decoding straight into ``out`` with ``decoder`` (default Blosc; numcodecs and imagecodecs release the GIL).
    zarr-python reads the same bytes
    about 10x slower (per-chunk Python in its codec pipeline), which starved inference of patches.
    """
    import google_crc32c

    if decoder is None:
        from numcodecs import Blosc

        decoder = Blosc()
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # never written: zarr's fill value
        out[...] = 0
        return
    try:
        size = os.fstat(fd).st_size
        tail = shard * 16 + 4
        raw = os.pread(fd, tail, size - tail) if size >= tail else b""
        if len(raw) != tail or np.frombuffer(raw[-4:], "<u4")[0] != google_crc32c.value(raw[:-4]):
            raise StoreError(f"{path}: damaged patch shard (bad index checksum); re-tile the slide")
        index = np.frombuffer(raw, "<u8", count=shard * 2).reshape(shard, 2)[wanted]
        absent = index[:, 0] == np.iinfo(np.uint64).max
        present = index[~absent]
        start, span = 0, memoryview(b"")
        if present.size:
            start = int(present[:, 0].min())
            end = int((present[:, 0] + present[:, 1]).max())
            if end > size - tail:
                raise StoreError(f"{path}: damaged patch shard (chunk beyond the data); re-tile the slide")
            span = memoryview(os.pread(fd, end - start, start))
        for k, (offset, nbytes) in enumerate(index):
            if absent[k]:
                out[k] = 0
            else:
                o = int(offset) - start
                decoder.decode(span[o:o + int(nbytes)], out=out[k])
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ reading
def _in_range(index: int | slice | np.ndarray, n: int) -> int | slice | np.ndarray:
    """``index`` (:func:`_patch_index`'s) with negative numbers counted from the end, as Python's; an
    :class:`IndexError` naming it where it lies outside ``n`` patches (zarr's said "index out of bounds for
    dimension with length 0" for a store without tissue)."""
    if isinstance(index, slice):
        return index
    if isinstance(index, int):
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"patch {index} out of range for {n} patches")
        return i
    idx = np.where(index < 0, index + n, index)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"patch index out of range for {n} patches")
    return idx


def _patch_index(index: object) -> int | slice | np.ndarray:
    """``index`` as :meth:`PatchStore.read` takes it: an integer, a slice, or integers (a list or an integer array);
    a float, a bool or a string would be cast to a patch number, or fail deep in zarr."""
    if isinstance(index, Integral) and not isinstance(index, bool):
        return int(index)
    if isinstance(index, slice):
        return index
    if isinstance(index, np.ndarray | Sequence) and not isinstance(index, str | bytes):
        with contextlib.suppress(ValueError):  # a ragged list
            idx = np.asarray(index)
            if idx.dtype.kind in "iu" or (idx.size == 0 and idx.ndim == 1):
                return idx.astype(np.int64).reshape(-1)
    raise ConfigError(f"`index` of a store's patches is an integer, a slice or a list of integers, not "
                      f"{shown(index)}")


class PatchStore:
    """A slide's patches: a sequence of (S, S, 3) uint8 RGB arrays with their level-0 ``coords``.

    Made by :func:`wsi_screen.tile` (or ``wsi-screen tile``), opened with :meth:`open`. ``store[i]`` is patch
    ``i`` (a slice or index list gives (n, S, S, 3)), ``len(store)`` the count, iteration goes in order;
    ``coords`` (N, 2) int64, ``tissue`` (N,), ``thumbnail`` and ``mask`` (the tissue labels on it), ``mpp``,
    ``patch_size`` and ``attrs`` (the slide, the stain, the settings) describe them; :meth:`as_dataset` feeds
    a ``torch.utils.data.DataLoader``. The layout on disk is in docs/store.md.

    A coordinates-only store (``pixels=False``) has no ``patches`` array: :meth:`read` then reads the
    patches from the slide (the path the store records, or ``slide``), normalised with the store's fitted stain,
    the same bytes a pixel store made with the same settings holds (:mod:`wsi_screen.tiling.ondemand`).

    Examples
    --------
    >>> import wsi_screen
    >>> with wsi_screen.open_slide("examples/CMU-1-Small-Region.svs") as slide:
    ...     store = wsi_screen.tile(slide, mpp=2.0, size=64)
    >>> len(store), store[0].shape, store[0].dtype, store.coords[0].tolist()
    (34, (64, 64, 3), dtype('uint8'), [1028, 257])
    >>> import torch
    >>> batch = next(iter(torch.utils.data.DataLoader(store.as_dataset(), batch_size=8)))
    >>> tuple(batch.shape)
    (8, 64, 64, 3)
    """

    def __init__(self, location: str | os.PathLike[str], group: zarr.Group, *,
                 slide: str | os.PathLike[str] | None = None, workers: int = 2) -> None:
        self.location = str(location)
        self._group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self._coords: np.ndarray | None = None
        self._fast_shard: int | None = None  # patches per shard when the direct shard reader applies
        self._fast_shape: tuple[int, ...] = ()
        self._fast_n = 0
        self._decoder: Any = None
        self._slide_path = None if slide is None else str(slide)
        self._workers = workers
        self._on_demand: Any = None  # the slide reader of a coordinates-only store, opened on first read
        if not is_url(self.location) and self.has_pixels:
            meta_path = Path(self.location) / PATCHES / "zarr.json"
            with contextlib.suppress(OSError, ValueError):
                meta = json.loads(meta_path.read_text())
                decoder = _shard_decoder(meta)
                if decoder is not None:
                    self._decoder = decoder
                    self._fast_shard = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
                    self._fast_shape = tuple(int(v) for v in meta["shape"][1:])
                    self._fast_n = int(meta["shape"][0])

    @classmethod
    def open(cls, location: str | os.PathLike[str], *, require_complete: bool = True,
             slide: str | os.PathLike[str] | None = None, workers: int = 2) -> PatchStore:
        """Open a store; refuses unknown schema versions and, by default, incomplete stores.

        ``slide`` (a coordinates-only store) reads the patches from this file instead of the path the store
        records (a moved slide; it must be the same file, checked by fingerprint); ``workers`` reader threads.
        """
        loc = str(location)
        if not is_url(loc) and not Path(loc).exists():
            raise StoreError(f"{loc}: no such patch store")
        try:
            group = zarr.open_group(loc, mode="r")
        except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as exc:
            inside = sorted(p.name for p in Path(loc).glob("*.zarr")) if not is_url(loc) else []
            hint = f"; it holds stores ({', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''})" if inside \
                else " (no zarr group there)"
            raise StoreError(f"{loc}: not a wsi-screen patch store{hint}") from exc
        attrs = dict(group.attrs)
        if attrs.get("kind") == EMBEDDINGS_KIND:
            raise StoreError(f"{loc}: an embeddings store (the features `wsi-screen embed` writes), not a patch "
                             "store; open it with `wsi_screen.embedding.features.FeatureStore(path)`")
        version = attrs.get(ATTR_SCHEMA)
        if version not in READABLE_SCHEMAS:
            raise SchemaVersionError(f"{loc}: store schema version {version!r} is not supported by this "
                                     f"wsi-screen (reads versions {', '.join(map(str, READABLE_SCHEMAS))}); "
                                     "re-tile the slide")
        if require_complete and attrs.get(ATTR_COMPLETE) is not True:
            raise IncompleteStoreError(f"{loc}: store is incomplete (interrupted run); rerun the tiler")
        return cls(loc, group, slide=slide, workers=workers)

    # ---- metadata
    @property
    def name(self) -> str:
        return str(self.attrs["slide"]["name"])

    @property
    def mpp(self) -> float:
        return float(self.attrs["mpp"])

    @property
    def patch_size(self) -> int:
        return int(self.attrs["patch_size"])

    @property
    def tile_size_l0(self) -> int:
        return int(self.attrs["tile_size_l0"])

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.attrs.get(ATTR_SETTINGS, {}))

    @property
    def slide_path(self) -> str | None:
        """The slide file given to :meth:`open` (a moved slide), None when the store reads the one it records."""
        return self._slide_path

    @property
    def has_pixels(self) -> bool:
        """False for a coordinates-only store, whose patches are read from the slide."""
        return self.attrs.get(ATTR_PIXELS, "store") != "none"

    @property
    def codec(self) -> PatchCodec | None:
        """How the patches are encoded (None for a coordinates-only store)."""
        return PatchCodec.from_json(self.attrs.get(ATTR_CODEC)) if self.has_pixels else None

    @property
    def pixels_record(self) -> dict[str, Any]:
        """Where this store's patches come from when read: ``pixels`` ``"store"`` (decoded from ``codec``: its
        ``name`` and ``quality``) or ``"none"`` (coordinates only: read from the slide, ``codec`` None). What a
        run's slide.json and run.json (``store_pixels``) and a feature store (``patch_pixels``) record, so
        results made from lossy (JPEG) patches say so."""
        codec = self.codec
        return {"pixels": "store" if self.has_pixels else "none", "codec": codec.to_json() if codec else None}

    def lossy_note(self, doing: str) -> str | None:
        """One line for a log saying that ``doing`` (``"embedding"``, ``"scoring"``) reads this store's lossy
        (JPEG, JPEG XL) patches, which are not quite the slide's; None for lz4 and coordinates-only stores."""
        codec = self.codec
        if codec is None or not codec.lossy:
            return None
        return (f"{doing} the {codec.label}-compressed patches of a store "
                f"(quality {codec.quality}): the results differ from those of the slide's own pixels, enough to "
                "move a result near its threshold; lz4 or coordinates-only stores give exactly those")

    def array(self, key: str) -> zarr.Array:
        """The zarr array stored under ``key`` (one of :data:`ARRAY_KEYS`)."""
        node = self._group[key]
        if not isinstance(node, zarr.Array):
            raise StoreError(f"{self.location}: {key!r} is not an array")
        return node

    def __len__(self) -> int:
        return len(self.coords)  # cached: read() asks for every patch, and opening the array costs ~0.5 ms

    # ---- arrays
    @property
    def coords(self) -> np.ndarray:
        """Level-0 (x, y) of every patch, int64 (N, 2)."""
        if self._coords is None:
            self._coords = np.asarray(self.array(COORDS)[...], dtype=np.int64).reshape(-1, 2)
        return self._coords

    @property
    def tissue(self) -> np.ndarray:
        return np.asarray(self.array(TISSUE)[...], dtype=np.float32)

    @property
    def stain_ok(self) -> np.ndarray:
        if not self.has_pixels:
            raise StoreError(f"{self.location}: a coordinates-only store does not record which patches were "
                             "stain-normalised (that is decided on their pixels, as they are read)")
        return np.asarray(self.array(STAIN_OK)[...], dtype=bool)

    @property
    def thumbnail(self) -> np.ndarray:
        return np.asarray(self.array(THUMBNAIL)[...])

    @property
    def mask(self) -> np.ndarray:
        return np.asarray(self.array(MASK)[...])

    def read(self, index: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """Patches by index, slice or index list: uint8 (n, S, S, 3) (or (S, S, 3) for an int). Anything else (a
        float, a bool, a string) is a :class:`~wsi_screen.errors.ConfigError`."""
        index = _in_range(_patch_index(index), len(self))
        if not self.has_pixels:
            return self._read_slide(index)
        if self._fast_shard is None:
            return self._read_zarr(index)
        if isinstance(index, int):
            return self._read_direct(np.array([index]))[0]
        return self._read_direct(np.arange(self._fast_n)[index] if isinstance(index, slice) else index)

    def _read_direct(self, idx: np.ndarray) -> np.ndarray:
        shard = int(self._fast_shard or 1)
        out = np.empty((len(idx), *self._fast_shape), dtype=np.uint8)
        if idx.size == 0:
            return out
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        shards = sorted_idx // shard
        bounds = np.flatnonzero(np.diff(shards)) + 1
        dest = np.empty_like(out) if not np.array_equal(order, np.arange(len(idx))) else out
        root = Path(self.location) / PATCHES
        for lo, hi in itertools.pairwise([0, *bounds.tolist(), len(idx)]):
            number = int(shards[lo])
            read_shard_patches(str(root / "c" / str(number) / "0" / "0" / "0"), shard,
                               sorted_idx[lo:hi] - number * shard, dest[lo:hi], self._decoder)
        if dest is not out:
            out[order] = dest
        return out

    def _read_slide(self, index: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        if self._on_demand is None:
            from wsi_screen.tiling.ondemand import SlidePatches

            self._on_demand = SlidePatches(self.location, self.attrs, slide=self._slide_path, workers=self._workers)
        if isinstance(index, int):
            return self._on_demand.read(self.coords[[index]])[0]
        return self._on_demand.read(self.coords[np.arange(len(self))[index] if isinstance(index, slice) else index])

    def close(self) -> None:
        """Close the slide a coordinates-only store reads from (a store with pixels holds nothing open)."""
        if self._on_demand is not None:
            self._on_demand.close()
            self._on_demand = None

    def __enter__(self) -> PatchStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def in_memory(self) -> bool:
        """Whether the store lives in this process's memory (``memory://``), not on disk or at a URL."""
        return self.location.startswith("memory://")

    def __getstate__(self) -> dict[str, Any]:
        """A store on disk pickles by location, with the slide it was opened with (a moved one) and its reader
        threads: a DataLoader worker (spawned: macOS, Windows) opens it again, and nothing open travels (a
        coordinates-only store's slide reader, once it has read, holds locks). A store in memory lives in this
        process only; it pickles as it is, without its slide reader."""
        if self.in_memory:
            return {**self.__dict__, "_on_demand": None}
        return {"location": self.location, "slide": self._slide_path, "workers": self._workers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_group" not in state:  # by location: as it was opened (the process that pickled it accepted it)
            state = PatchStore.open(state["location"], require_complete=False, slide=state["slide"],
                                    workers=state["workers"]).__dict__
        self.__dict__.update(state)

    def _read_zarr(self, index: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        arr = self.array(PATCHES)
        if isinstance(index, (int, np.integer, slice)):
            return np.asarray(arr[index])
        idx = np.asarray(index, dtype=np.int64)
        if idx.size == 0:
            return np.zeros((0, self.patch_size, self.patch_size, 3), dtype=np.uint8)
        return np.asarray(arr.get_orthogonal_selection((idx,)))

    # ---- a sequence of patches
    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """``store[i]``: patch ``i`` as uint8 (S, S, 3); a slice or index list gives (n, S, S, 3) (see :meth:`read`)."""
        return self.read(index)

    def __iter__(self) -> Iterator[np.ndarray]:
        """Every patch in order, (S, S, 3) uint8, decoded a shard at a time."""
        step = patches_per_shard(self.patch_size)
        for start in range(0, len(self), step):
            yield from self.read(slice(start, start + step))

    def as_dataset(self, transform: Callable[[np.ndarray], Any] | None = None) -> PatchDataset:
        """The patches as a map-style dataset for ``torch.utils.data.DataLoader``: item ``i`` is
        ``transform(store[i])``, or the (S, S, 3) uint8 patch itself (the default collate stacks those into
        an (n, S, S, 3) uint8 tensor). A store on disk pickles by location (and the slide it was opened with),
        for DataLoader worker processes."""
        return PatchDataset(self, transform)

    def __repr__(self) -> str:
        return f"PatchStore({self.location!r}, {len(self)} patches of {self.patch_size} px at {self.mpp} um/px)"


class PatchDataset:
    """A store's patches as a dataset (:meth:`PatchStore.as_dataset`)."""

    def __init__(self, store: PatchStore, transform: Callable[[np.ndarray], Any] | None = None) -> None:
        self.store = store
        self.transform = transform

    def __len__(self) -> int:
        return len(self.store)

    def __repr__(self) -> str:
        if self.transform is None:
            return f"PatchDataset({self.store!r}, uint8 patches)"
        return f"PatchDataset({self.store!r}, transform={getattr(self.transform, '__name__', self.transform)})"

    def __getitem__(self, index: int) -> Any:
        patch = self.store.read(int(index))
        return patch if self.transform is None else self.transform(patch)

    def __getstate__(self) -> dict[str, Any]:
        if self.store.in_memory:
            raise StoreError(f"{self.store.location}: a store in memory cannot be sent to another process; "
                             "use DataLoader(num_workers=0), or tile into a folder")
        return {"store": self.store, "transform": self.transform}  # the store pickles by location


# ------------------------------------------------ reads made in the slide reader's child process (one store open)
_open_store: tuple[tuple[str, str | None], PatchStore] | None = None


def read_rows(location: str, start: int, stop: int, workers: int = 2, slide: str | None = None) -> np.ndarray:
    """Patches ``start:stop`` of the store at ``location`` (uint8 (n, S, S, 3)), read where this runs: the slide
    reader's child, through its caller (``slide``: as :meth:`PatchStore.open` takes it). The store stays open for
    the next batch; another location or slide closes it."""
    global _open_store
    if _open_store is None or _open_store[0] != (location, slide):
        close_rows()
        _open_store = ((location, slide), PatchStore.open(location, workers=workers, slide=slide))
    return np.asarray(_open_store[1].read(slice(start, stop)))


def close_rows() -> None:
    """Close the store (and its slide) :func:`read_rows` holds open, if any."""
    global _open_store
    held, _open_store = _open_store, None
    if held is not None:
        held[1].close()


def read_attrs(location: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A store's attributes, or None when nothing (readable) is there. Never raises for a missing store."""
    loc = str(location)
    if not is_url(loc) and not (Path(loc) / "zarr.json").exists():
        return None
    try:
        return dict(zarr.open_group(loc, mode="r").attrs)
    except (FileNotFoundError, ValueError, KeyError, OSError, json.JSONDecodeError):
        return None


def is_complete(attrs: Mapping[str, Any] | None) -> bool:
    """Whether attributes describe a finished store of the current schema (a reusable one)."""
    return bool(attrs) and attrs.get(ATTR_COMPLETE) is True and attrs.get(ATTR_SCHEMA) == SCHEMA_VERSION  # type: ignore[union-attr]


def remove_store(location: str | os.PathLike[str]) -> None:
    """Delete a store (local directory or fsspec location)."""
    loc = str(location)
    if is_url(loc):
        import fsspec

        fs, path = fsspec.core.url_to_fs(loc)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    elif Path(loc).exists():
        shutil.rmtree(loc)


# ------------------------------------------------------------------------------------------------ writing
class StoreWriter:
    """Writes one store: create, fill whole shards, then :meth:`commit` (or :meth:`abort`)."""

    def __init__(self, location: str | os.PathLike[str], *, n_patches: int, patch_size: int,
                 thumbnail_shape: tuple[int, int], attrs: Mapping[str, Any], codec: PatchCodec | None = None,
                 pixels: bool = True) -> None:
        """``codec`` encodes each patch (default lz4); ``pixels=False`` writes a coordinates-only store (no
        ``patches`` array; :meth:`write_patches` is not called)."""
        self.location = str(location)
        self.remote = is_url(self.location)
        self.work = self.location if self.remote else self.location + PARTIAL_SUFFIX
        remove_store(self.work)
        self.n_patches = int(n_patches)
        self.patch_size = int(patch_size)
        self.shard = patches_per_shard(self.patch_size)
        self._writer: ThreadPoolExecutor | None = None
        self._pending: deque[Future[None]] = deque()
        self._failed = False
        self._synced: set[str] = set()
        self.codec = codec or PatchCodec("lz4")
        self.pixels = pixels
        self._attrs = {ATTR_SCHEMA: SCHEMA_VERSION, ATTR_COMPLETE: False,
                       ATTR_CODEC: self.codec.to_json() if pixels else None,
                       ATTR_PIXELS: "store" if pixels else "none", **attrs}
        try:
            self._group = zarr.open_group(self.work, mode="w", attributes=self._attrs)
            s = self.patch_size
            self._patches = None if not pixels else self._group.create_array(
                PATCHES, shape=(self.n_patches, s, s, 3), dtype="uint8", chunks=(1, s, s, 3),
                shards=(self.shard, s, s, 3), fill_value=0, **_patch_codecs(self.codec),
                dimension_names=("patch", "y", "x", "channel"),
                # every patch is real data: skipping zarr's per-chunk "all fill value?" scan is 2-3x faster
                config={"write_empty_chunks": True})
            th, tw = thumbnail_shape
            rows = max(1, min(th, IMAGE_CHUNK_ROWS))
            self._thumbnail = self._group.create_array(THUMBNAIL, shape=(th, tw, 3), dtype="uint8",
                                     chunks=(rows, max(tw, 1), 3), compressors=_compressor(),
                                     fill_value=0, dimension_names=("y", "x", "channel"))
            self._mask = self._group.create_array(MASK, shape=(th, tw), dtype="uint8", chunks=(rows, max(tw, 1)),
                                     compressors=_compressor(), fill_value=0, dimension_names=("y", "x"))
        except OSError as exc:
            raise _write_error(self.location, exc) from exc

    def write_patches(self, start: int, batch: np.ndarray) -> None:
        """Write patches ``start .. start+len(batch)``: whole shards only (the last may be short).

        On a local filesystem the shards are encoded, written and fsynced by one background thread (one
        writer per shard, as zarr requires), so the caller reads the next patches meanwhile; at most
        :data:`WRITE_BEHIND` batches wait. ``batch`` must not be modified after the call. A write error
        surfaces here on a later call, or in :meth:`write_arrays` / :meth:`commit`, as a StoreError.
        """
        n = batch.shape[0]
        if self._patches is None:
            raise ValueError("a coordinates-only store holds no patches")
        if start % self.shard != 0 or (n % self.shard != 0 and start + n != self.n_patches):
            raise ValueError(f"writes must cover whole shards of {self.shard} patches (got {start}+{n})")
        if self.remote:
            try:
                self._patches[start:start + n] = batch
            except OSError as exc:
                raise _write_error(self.location, exc) from exc
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="store-write")
        while len(self._pending) >= WRITE_BEHIND:
            self._pending.popleft().result()
        self._pending.append(self._writer.submit(self._write_local, start, batch))

    def _write_local(self, start: int, batch: np.ndarray) -> None:
        if self._failed:
            return  # an earlier shard failed: write nothing more (the caller gets that error)
        try:
            for first in range(start, start + batch.shape[0], self.shard):
                part = batch[first - start:first - start + self.shard]
                key = PATCHES + "/c/" + "/".join(map(str, (first // self.shard, 0, 0, 0)))
                path = Path(self.work) / key
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_parts(path, encode_shard(part, self.shard, self.codec))
                fsync_file(path)  # now, while reading goes on, rather than all at commit
                self._synced.add(str(path))
        except OSError as exc:
            self._failed = True
            raise _write_error(self.location, exc) from exc
        except BaseException:
            self._failed = True
            raise

    def _drain(self, *, raise_errors: bool = True) -> None:
        """Wait for every background shard write; re-raise the first error."""
        first: BaseException | None = None
        while self._pending:
            future = self._pending.popleft()
            if not raise_errors:
                future.cancel()
            try:
                future.result()
            except BaseException as exc:
                first = first or exc
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if first is not None and raise_errors:
            raise first

    def write_images(self, *, thumbnail: np.ndarray, mask: np.ndarray) -> None:
        """Write the thumbnail and the tissue label map (any time before :meth:`commit`; the tiler writes them
        first so it need not hold them while patches stream)."""
        try:
            for y0 in range(0, thumbnail.shape[0], IMAGE_CHUNK_ROWS):  # chunk by chunk: bounded temporaries
                self._thumbnail[y0:y0 + IMAGE_CHUNK_ROWS] = thumbnail[y0:y0 + IMAGE_CHUNK_ROWS]
                self._mask[y0:y0 + IMAGE_CHUNK_ROWS] = mask[y0:y0 + IMAGE_CHUNK_ROWS]
        except OSError as exc:
            raise _write_error(self.location, exc) from exc

    def write_arrays(self, *, coords: np.ndarray, tissue: np.ndarray, stain_ok: np.ndarray | None) -> None:
        """Write the per-patch tables (after every pending patch shard); ``stain_ok`` None in a
        coordinates-only store."""
        self._drain()
        n = self.n_patches
        try:
            self._group.create_array(COORDS, data=np.asarray(coords, dtype=np.int64).reshape(n, 2),
                                     chunks=(max(n, 1), 2), compressors=_compressor(),
                                     dimension_names=("patch", "xy"))
            self._group.create_array(TISSUE, data=np.asarray(tissue, dtype=np.float32).reshape(n),
                                     chunks=(max(n, 1),), compressors=_compressor(),
                                     dimension_names=("patch",))
            if stain_ok is not None:
                self._group.create_array(STAIN_OK, data=np.asarray(stain_ok, dtype=bool).reshape(n),
                                         chunks=(max(n, 1),), compressors=_compressor(),
                                         dimension_names=("patch",))
        except OSError as exc:
            raise _write_error(self.location, exc) from exc

    def commit(self, extra_attrs: Mapping[str, Any] | None = None) -> None:
        """Mark complete and move into place; after this the store is durable and finished."""
        self._drain()
        try:
            if not self.remote:
                fsync_tree(Path(self.work), skip=self._synced)
            self._group.attrs.update({**(extra_attrs or {}), ATTR_COMPLETE: True})
            if self.remote:
                return
            work, final = Path(self.work), Path(self.location)
            fsync_file(work / "zarr.json")
            swap_in(work, final)
        except OSError as exc:
            raise _write_error(self.location, exc) from exc

    def abort(self) -> None:
        """Remove the unfinished store (local) or leave it marked incomplete (remote)."""
        self._failed = True
        self._drain(raise_errors=False)
        if not self.remote:
            with contextlib.suppress(OSError):
                remove_store(self.work)


def _write_error(location: str, exc: OSError) -> StoreError:
    return StoreError(failure_text(location, exc, " the store"))


@contextlib.contextmanager
def store_lock(location: str | os.PathLike[str], *, wait: bool = False) -> Iterator[None]:
    """Per-store inter-process lock (``flock`` on a file beside the store); no-op for URLs.

    With ``wait=False`` a store locked by another process raises :class:`StoreLockedError`.
    """
    loc = str(location)
    if is_url(loc):
        yield
        return
    try:
        lock = acquire(Path(loc), wait=wait)
    except LockTaken:
        raise StoreLockedError(f"{loc}: another wsi-screen process is writing this store; skipped "
                               "(rerun afterwards to pick it up)") from None
    except OSError as exc:
        raise _write_error(loc, exc) from exc
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def store_lock_unless_read_only(location: str | os.PathLike[str], reusable: Callable[[], bool]) -> Iterator[None]:
    """:func:`store_lock`; where it fails only because the store's folder cannot be written (a shared, read-only
    archive of stores, a read-only mount) and ``reusable()`` says the output there is complete and current, nothing
    is locked: reading a complete output under its final name needs no lock, and nothing can replace it from here."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(store_lock(location))
        except StoreError as exc:
            cause = exc.__cause__
            read_only = isinstance(cause, OSError) and cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
            if not (read_only and reusable()):
                raise
            log.debug("%s: its folder cannot be written (%s); complete and current, it is used as it is", location,
                      cause)
        yield
