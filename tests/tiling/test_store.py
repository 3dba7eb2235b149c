"""PatchStore: layout, round trip, atomic commit, schema and completeness checks, locking."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.synchronize
from pathlib import Path

import numpy as np
import pytest

from wsi_screen.errors import IncompleteStoreError, SchemaVersionError, StoreError, StoreLockedError
from wsi_screen.tiling.store import (
    ARRAY_KEYS,
    SCHEMA_VERSION,
    PatchStore,
    StoreWriter,
    is_complete,
    patches_per_shard,
    read_attrs,
    store_location,
    store_lock,
)


def _write(loc: str, n: int = 10, size: int = 32, *, commit: bool = True) -> StoreWriter:
    rng = np.random.default_rng(0)
    w = StoreWriter(loc, n_patches=n, patch_size=size, thumbnail_shape=(20, 30),
                    attrs={"mpp": 0.5, "patch_size": size, "tile_size_l0": 64, "n_patches": n,
                           "slide": {"name": "s"}, "settings": {"k": 1}})
    patches = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    shard = w.shard
    for first in range(0, n, shard):
        w.write_patches(first, patches[first:first + shard])
    w.write_images(thumbnail=np.full((20, 30, 3), 7, np.uint8), mask=np.ones((20, 30), np.uint8))
    w.write_arrays(coords=np.arange(2 * n).reshape(n, 2) * 64, tissue=np.linspace(0, 1, n),
                   stain_ok=np.ones(n, bool))
    if commit:
        w.commit()
    return w


def test_round_trip(tmp_path: Path) -> None:
    loc = store_location(tmp_path, "slide A")
    assert loc.endswith("slide A.zarr")
    _write(loc, n=10)
    store = PatchStore.open(loc)
    assert len(store) == 10
    assert store.coords.dtype == np.int64 and store.coords.shape == (10, 2)
    assert store.coords[3].tolist() == [384, 448]
    assert store.read(0).shape == (32, 32, 3)
    assert store.read([9, 2]).shape == (2, 32, 32, 3)
    assert np.array_equal(store.read([2]), store.read(slice(2, 3)))
    assert store.thumbnail.shape == (20, 30, 3) and store.mask.dtype == np.uint8
    assert store.tissue.dtype == np.float32 and store.stain_ok.all()
    assert store.attrs["schema_version"] == SCHEMA_VERSION and store.attrs["complete"] is True
    assert set(ARRAY_KEYS) <= {p.name for p in Path(loc).iterdir()}
    assert not Path(loc + ".partial").exists()


def test_one_patch_per_chunk_and_whole_shards(tmp_path: Path) -> None:
    loc = store_location(tmp_path, "s")
    _write(loc, n=5, size=224)
    meta = json.loads((Path(loc) / "patches" / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"][0] == patches_per_shard(224)
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["chunk_shape"] == [1, 224, 224, 3]
    w = StoreWriter(store_location(tmp_path, "t"), n_patches=100, patch_size=224, thumbnail_shape=(2, 2),
                    attrs={})
    with pytest.raises(ValueError, match="whole shards"):
        w.write_patches(1, np.zeros((3, 224, 224, 3), np.uint8))
    w.abort()
    assert not Path(store_location(tmp_path, "t") + ".partial").exists()


def test_uncommitted_store_is_not_visible(tmp_path: Path) -> None:
    loc = store_location(tmp_path, "s")
    _write(loc, commit=False)
    assert not Path(loc).exists()
    assert read_attrs(loc) is None
    attrs = read_attrs(loc + ".partial")
    assert attrs is not None and attrs["complete"] is False and not is_complete(attrs)
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        PatchStore.open(loc + ".partial")
    assert PatchStore.open(loc + ".partial", require_complete=False).attrs["complete"] is False


def test_schema_version_refused(tmp_path: Path) -> None:
    loc = store_location(tmp_path, "s")
    _write(loc)
    meta_path = Path(loc) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["schema_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SchemaVersionError, match="schema version 99"):
        PatchStore.open(loc)


def test_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such patch store"):
        PatchStore.open(tmp_path / "missing.zarr")
    (tmp_path / "junk.zarr").mkdir()
    (tmp_path / "junk.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError):
        PatchStore.open(tmp_path / "junk.zarr")


def test_commit_replaces_existing(tmp_path: Path) -> None:
    loc = store_location(tmp_path, "s")
    _write(loc, n=4)
    _write(loc, n=7)
    assert len(PatchStore.open(loc)) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]  # no .partial or .old left behind


def _hold_lock(loc: str, ready: multiprocessing.synchronize.Event, release: multiprocessing.synchronize.Event) -> None:
    with store_lock(loc):
        ready.set()
        release.wait(10)


def test_lock_excludes_other_processes(tmp_path: Path) -> None:
    loc = store_location(tmp_path, "s")
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(loc, ready, release))
    proc.start()
    try:
        assert ready.wait(30)
        with pytest.raises(StoreLockedError, match="another wsi-screen process"), store_lock(loc):
            pass
    finally:
        release.set()
        proc.join(10)
    with store_lock(loc):  # free again
        pass


def test_fast_shard_writer_is_byte_identical_to_zarr(tmp_path: Path) -> None:
    import zarr

    from wsi_screen.tiling.store import _compressor, encode_shard

    rng = np.random.default_rng(3)
    size, n = 64, 0
    shard = patches_per_shard(size)
    n = shard * 2 + 7  # two full shards and a short last one
    patches = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    patches[5] = 0  # an all-zero patch is written like any other
    ref = zarr.open_group(tmp_path / "ref.zarr", mode="w").create_array(
        "patches", shape=patches.shape, dtype="uint8", chunks=(1, size, size, 3), shards=(shard, size, size, 3),
        compressors=_compressor(), fill_value=0, config={"write_empty_chunks": True})
    ref[...] = patches
    for i, first in enumerate(range(0, n, shard)):
        ours = b"".join(encode_shard(patches[first:first + shard], shard))
        assert ours == (tmp_path / "ref.zarr" / "patches" / "c" / str(i) / "0" / "0" / "0").read_bytes()
    loc = store_location(tmp_path, "s")
    w = StoreWriter(loc, n_patches=n, patch_size=size, thumbnail_shape=(4, 4), attrs={})
    for first in range(0, n, shard):
        w.write_patches(first, patches[first:first + shard])
    w.write_images(thumbnail=np.zeros((4, 4, 3), np.uint8), mask=np.zeros((4, 4), np.uint8))
    w.write_arrays(coords=np.zeros((n, 2), np.int64), tissue=np.zeros(n), stain_ok=np.zeros(n, bool))
    w.commit()
    assert np.array_equal(PatchStore.open(loc).read(slice(None)), patches)
    assert np.array_equal(PatchStore.open(loc).read([n - 1, 5, shard]), patches[[n - 1, 5, shard]])


def _written_store(tmp_path: Path, n: int, size: int = 32) -> tuple[str, np.ndarray]:
    patches = np.random.default_rng(7).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    loc = store_location(tmp_path, "d")
    w = StoreWriter(loc, n_patches=n, patch_size=size, thumbnail_shape=(4, 4), attrs={"patch_size": size})
    shard = patches_per_shard(size)
    for first in range(0, n, shard):
        w.write_patches(first, patches[first:first + shard])
    w.write_images(thumbnail=np.zeros((4, 4, 3), np.uint8), mask=np.zeros((4, 4), np.uint8))
    w.write_arrays(coords=np.zeros((n, 2), np.int64), tissue=np.zeros(n), stain_ok=np.zeros(n, bool))
    w.commit()
    return loc, patches


def test_direct_shard_reader_matches_zarr_for_every_kind_of_index(tmp_path: Path) -> None:
    shard = patches_per_shard(32)
    n = shard * 2 + 5
    loc, patches = _written_store(tmp_path, n)
    store = PatchStore.open(loc)
    assert store._fast_shard == shard  # the direct reader is in use
    for index in (0, n - 1, -1, slice(None), slice(3, shard + 9), slice(None, None, 5), slice(-4, None),
                  [n - 1, 0, 0, shard], np.array([], dtype=np.int64), np.array([-2, 1])):
        as_array = np.asarray(index) if isinstance(index, list) else index
        ours = store.read(index)
        zarrs = store._read_zarr(as_array)
        assert ours.shape == zarrs.shape and np.array_equal(ours, zarrs), index
        assert np.array_equal(ours, patches[as_array]), index
    for bad in (n, -n - 1, [0, n]):
        with pytest.raises(IndexError):
            store.read(bad)


def test_reading_patch_by_patch_opens_no_array_per_patch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """read() checks each index against len(store), which opened the coords array every time: one patch at a time
    (a DataLoader's way) took ~640 us a patch instead of ~115 us. The length comes from the cached coords."""
    loc, patches = _written_store(tmp_path, 40)
    store = PatchStore.open(loc)
    assert len(store) == 40
    opened: list[str] = []
    real = PatchStore.array

    def counting(self: PatchStore, key: str) -> object:
        opened.append(key)
        return real(self, key)

    monkeypatch.setattr(PatchStore, "array", counting)
    for i in range(40):
        assert np.array_equal(store[i], patches[i])
    assert len(store) == 40 and opened == []

def test_direct_shard_reader_refuses_a_damaged_shard_index(tmp_path: Path) -> None:
    loc, _ = _written_store(tmp_path, 10)
    shard_file = Path(loc) / "patches" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[-10] ^= 0xFF  # inside the index: its CRC32C no longer matches
    shard_file.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged patch shard"):
        PatchStore.open(loc).read(slice(None))
