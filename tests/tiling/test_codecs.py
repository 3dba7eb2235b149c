"""Store codecs (``tile --codec``) and coordinates-only stores (``tile --pixels none``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.factory import he_texture
from wsi_screen.errors import ConfigError, StoreError
from wsi_screen.slide.discovery import SlideSource
from wsi_screen.tiling.codecs import DEFAULT_QUALITY, PatchCodec
from wsi_screen.tiling.grid import TileSpec
from wsi_screen.tiling.pipeline import TileConfig, tile_slide
from wsi_screen.tiling.store import PatchStore, StoreWriter, patches_per_shard, store_location


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.mark.parametrize("name", ["jpeg", "jpegxl"])
def test_lossy_shards_are_zarrs_own_and_plain_zarr_reads_them(tmp_path: Path, name: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import zarr

    from wsi_screen.tiling import store as store_module
    from wsi_screen.tiling.store import _patch_codecs, encode_shard

    codec = PatchCodec(name)
    size = 48
    monkeypatch.setattr(store_module, "SHARD_BYTES", 8 * size * size * 3)  # shards of 8 patches: a small test
    shard = patches_per_shard(size)
    n = shard + 3  # one full shard and a short one
    tex = he_texture(size * 4, size * 4, seed=2)
    patches = np.stack([np.roll(tex, 7 * i, axis=(0, 1))[:size, :size] for i in range(n)])
    ref = zarr.open_group(tmp_path / "ref.zarr", mode="w").create_array(
        "patches", shape=patches.shape, dtype="uint8", chunks=(1, size, size, 3), shards=(shard, size, size, 3),
        fill_value=0, config={"write_empty_chunks": True}, **_patch_codecs(codec))
    ref[...] = patches
    for i, first in enumerate(range(0, n, shard)):
        ours = b"".join(encode_shard(patches[first:first + shard], shard, codec))
        assert ours == (tmp_path / "ref.zarr" / "patches" / "c" / str(i) / "0" / "0" / "0").read_bytes()

    loc = store_location(tmp_path, "s")
    w = StoreWriter(loc, n_patches=n, patch_size=size, thumbnail_shape=(4, 4), attrs={"patch_size": size},
                    codec=codec)
    for first in range(0, n, shard):
        w.write_patches(first, patches[first:first + shard])
    w.write_images(thumbnail=np.zeros((4, 4, 3), np.uint8), mask=np.zeros((4, 4), np.uint8))
    w.write_arrays(coords=np.zeros((n, 2), np.int64), tissue=np.zeros(n), stain_ok=np.zeros(n, bool))
    w.commit()
    store = PatchStore.open(loc)
    assert store._decoder is not None  # the direct shard reader, not zarr's per-chunk path
    ours = store.read(slice(None))
    plain = zarr.open_group(loc, mode="r")["patches"][...]  # plain zarr, codec found by its registered name
    assert np.array_equal(ours, plain)
    assert np.array_equal(store.read([n - 1, 2]), plain[[n - 1, 2]])
    assert store.codec == codec and store.attrs["codec"] == {"name": name, "quality": DEFAULT_QUALITY[name]}
    assert 30 < _psnr(patches, ours) < 60  # lossy, and close


def test_codec_quality_rules() -> None:
    assert PatchCodec("lz4").quality is None
    # lz4 with a quality was taken silently by the API's tile() (the tile command refused it): one rule for both
    with pytest.raises(ConfigError, match=r"^lz4 is lossless and has no quality; use `codec` jpeg or jpegxl \(or drop "
                                          r"`quality`\)$"):
        PatchCodec("lz4", 50)
    assert PatchCodec("jpeg").quality == 90
    # a WsiScreenError (still a ValueError) naming the setting: the API gave a raw ValueError
    with pytest.raises(ConfigError, match=r"^`quality` 0 is not a quality of JPEG: give a whole number from 1 to 100$"):
        PatchCodec("jpeg", 0)
    with pytest.raises(ValueError, match=r"^`codec` 'webp' is not a patch codec; choose one of lz4, jpeg, jpegxl$"):
        PatchCodec("webp")
    with pytest.raises(ConfigError, match=r"`quality` 90\.5 is not a quality of JPEG XL"):
        PatchCodec("jpegxl", 90.5)  # type: ignore[arg-type]
    assert PatchCodec("jpeg", np.int64(80)).quality == 80 and type(PatchCodec("jpeg", np.int64(80)).quality) is int
    assert PatchCodec.from_json(None) == PatchCodec("lz4")  # a store from before codecs


@pytest.fixture(scope="module")
def tissue_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1536 x 1280 px of H&E texture at 0.5 um/px (tissue everywhere but a glass border)."""
    from tests.factory import block_image, write_tiled_tiff

    folder = tmp_path_factory.mktemp("codec_slide")
    img = block_image((1536, 1280), [(128, 128, 1408, 1152)], seed=4)
    return write_tiled_tiff(folder / "tissue.tif", img, mpp=0.5)


def _tile(slide: Path, out: Path, **kw: object) -> PatchStore:
    config = TileConfig(spec=TileSpec(mpp=0.5, size_px=128), **kw)  # type: ignore[arg-type]
    result = tile_slide(SlideSource(slide, slide.stem), str(out), config)
    assert result.status == "done", result
    return PatchStore.open(result.store)


def test_a_renamed_slide_is_not_recognised_and_the_message_says_so(tmp_path: Path, tissue_slide: Path) -> None:
    """The message for a coordinates-only store whose slide cannot be opened said "if the slide has moved ... (the
    same file is recognised by its fingerprint), or open the store with PatchStore.open(..., slide=PATH)"; for a
    renamed slide, doing that failed ("not the file this store was made from"), the fingerprint hashing the name.
    It also offered `stores`=..., which no Python function takes: now the Python way, or the CLI's under the CLI."""
    from wsi_screen.errors import name_settings

    first = tmp_path / "first.tif"
    shutil.copy(tissue_slide, first)
    store = _tile(first, tmp_path / "coords", pixels=False)
    store.close()
    renamed = first.rename(tmp_path / "second.tif")  # the same folder, a new name
    with pytest.raises(StoreError) as python:
        PatchStore.open(store.location).read(0)
    said = str(python.value)
    assert said.endswith(f"a slide moved to another folder under the same file name is recognised by its fingerprint: "
                         f"open the store with `wsi_screen.PatchStore.open({store.location!r}, slide=PATH)`; a renamed "
                         "one is not (the fingerprint includes the file name): give it back its name, or tile it "
                         "again"), said
    assert "`stores`" not in said
    with pytest.raises(StoreError, match=r"not the file this store was made from \(another file name or content: the "
                                         r"fingerprint includes the file name, so a renamed slide is another file\)"):
        PatchStore.open(store.location, slide=renamed).read(0)
    with name_settings({"stores": "--stores"}), pytest.raises(StoreError) as cli:
        PatchStore.open(store.location).read(0)
    assert f"screen or embed it at its new path with `stores`={tmp_path / 'coords'}; a renamed one" in str(cli.value)
    assert "PatchStore.open" not in str(cli.value)


@pytest.mark.parametrize("stain", ["none", "macenko"])
def test_coordinates_only_store_reads_the_pixel_stores_bytes(tmp_path: Path, tissue_slide: Path, stain: str) -> None:
    full = _tile(tissue_slide, tmp_path / "lz4", stain=stain, codec=PatchCodec("lz4"))
    coords = _tile(tissue_slide, tmp_path / "coords", stain=stain, pixels=False)
    assert not coords.has_pixels and coords.codec is None
    assert not (Path(coords.location) / "patches").exists()  # no pixels on disk
    assert np.array_equal(coords.coords, full.coords) and np.array_equal(coords.tissue, full.tissue)
    assert np.array_equal(coords.thumbnail, full.thumbnail) and np.array_equal(coords.mask, full.mask)
    assert coords.attrs["stain"] == full.attrs["stain"]
    n = len(full)
    assert n >= 40
    expected = full.read(slice(None))
    assert np.array_equal(coords.read(slice(None)), expected)  # byte for byte, every patch
    assert np.array_equal(coords.read([n - 1, 0, 7]), expected[[n - 1, 0, 7]])
    assert np.array_equal(coords.read(-1), expected[-1])
    if stain == "macenko":
        assert full.stain_ok.any()
        with pytest.raises(StoreError, match="coordinates-only"):
            _ = coords.stain_ok
    coords.close()


def _moved_coordinates_store(tmp_path: Path, tissue_slide: Path) -> tuple[PatchStore, np.ndarray, Path]:
    """A coordinates-only store tiled from a copy of the slide, its first patch, and where the copy was moved to
    (another folder, same file: the fingerprint includes the name)."""
    moved = tmp_path / "moved.tif"
    shutil.copy(tissue_slide, moved)
    store = _tile(moved, tmp_path / "coords", pixels=False)
    first = store.read(0)
    store.close()
    (tmp_path / "away").mkdir()
    away = tmp_path / "away" / "moved.tif"
    moved.rename(away)
    return store, first, away


def test_coordinates_only_store_follows_a_moved_slide(tmp_path: Path, tissue_slide: Path) -> None:
    store, first, away = _moved_coordinates_store(tmp_path, tissue_slide)
    with pytest.raises(StoreError, match=r"cannot be opened.*slide=PATH"):
        PatchStore.open(store.location).read(0)
    with PatchStore.open(store.location, slide=away) as again:
        assert np.array_equal(again.read(0), first)
    (tmp_path / "other").mkdir()
    other = tmp_path / "other" / "moved.tif"
    shutil.copy(tissue_slide, other)
    with other.open("r+b") as f:  # same size, other content
        f.seek(-100, 2)
        f.write(b"\0" * 100)
    with pytest.raises(StoreError, match="not the file this store was made from"):
        PatchStore.open(store.location, slide=other).read(0)


def test_a_store_pickles_with_the_slide_it_was_opened_with(tmp_path: Path, tissue_slide: Path) -> None:
    """A DataLoader's spawned workers (macOS, Windows) unpickle the dataset: it reopened the store by location
    alone, so a coordinates-only store opened with its moved slide failed in every worker ("cannot be opened"), and
    the store itself, once it had read a patch, did not pickle at all ("cannot pickle '_thread.lock' object")."""
    import pickle

    store, first, away = _moved_coordinates_store(tmp_path, tissue_slide)
    with PatchStore.open(store.location, slide=away, workers=1) as opened:
        assert np.array_equal(opened.read(0), first)  # its slide reader is open now
        clone = pickle.loads(pickle.dumps(opened))
        assert clone.slide_path == str(away) and np.array_equal(clone.read(0), first)
        clone.close()
        dataset = pickle.loads(pickle.dumps(opened.as_dataset()))
        assert len(dataset) == len(opened) and np.array_equal(dataset[0], first)
        dataset.store.close()

def test_tile_cli_codec_pixels_and_settings(tmp_path: Path, tissue_slide: Path) -> None:
    out = tmp_path / "out"
    res = run_cli("tile", tissue_slide, "-o", out, "--size", "128", "--codec", "lz4")
    assert res.code == 0, res
    lz4_bytes = sum(f.stat().st_size for f in (out / "tissue.zarr" / "patches").rglob("*") if f.is_file())
    # another codec is another store: refused without --overwrite, as any other setting
    res = run_cli("tile", tissue_slide, "-o", out, "--size", "128")
    assert res.code == 1 and "codec" in res.err
    res = run_cli("tile", tissue_slide, "-o", out, "--size", "128", "--overwrite")
    assert res.code == 0, res
    store = PatchStore.open(out / "tissue.zarr")
    assert store.settings["codec"] == {"name": "jpeg", "quality": 90}  # the default
    jpeg_bytes = sum(f.stat().st_size for f in (out / "tissue.zarr" / "patches").rglob("*") if f.is_file())
    assert jpeg_bytes < lz4_bytes / 2
    res = run_cli("tile", tissue_slide, "-o", tmp_path / "c", "--size", "128", "--pixels", "none")
    assert res.code == 0 and "coordinates only" in res.err, res
    assert PatchStore.open(tmp_path / "c" / "tissue.zarr").settings["pixels"] == "none"
    res = run_cli("tile", tissue_slide, "-o", tmp_path / "q", "--codec", "lz4", "--quality", "80")
    assert res.code != 0 and "lz4 is lossless" in res.err and "Traceback" not in res.err


def test_tile_pixels_none_refuses_codec_and_quality(tmp_path: Path, tissue_slide: Path) -> None:
    """A coordinates-only store keeps no pixels: --codec and --quality were accepted and silently ignored."""
    said = ("wsi-screen: error: --codec and --quality say how patch pixels are kept, and --pixels none keeps none "
            "(a coordinates-only store): drop them, or use --pixels store")
    res = run_cli("tile", tissue_slide, "-o", tmp_path / "c", "--pixels", "none", "--codec", "jpegxl",
                  "--quality", "50")
    assert (res.code, res.out, res.err_lines) == (1, "", [said]), res
    res = run_cli("tile", tissue_slide, "-o", tmp_path / "c", "--pixels", "none", "--codec", "jpeg")  # typed: refused
    assert res.code == 1 and res.err_lines == [said.replace("--codec and --quality say", "--codec says").replace(
        "drop them", "drop it")], res
    assert not (tmp_path / "c").exists()
    # a --config file's codec at its default is left alone (the file may serve runs that keep pixels); another is not
    cfg = tmp_path / "wsi-screen.toml"
    cfg.write_text('[tile]\ncodec = "jpeg"\n')
    res = run_cli("--config", cfg, "tile", tissue_slide, "-o", tmp_path / "c", "--size", "128", "--pixels", "none")
    assert res.code == 0 and "coordinates only" in res.err, res
    cfg.write_text("[tile]\nquality = 90\n")  # jpeg's default, as --help gives it: was refused (None != 90)
    res = run_cli("--config", cfg, "tile", tissue_slide, "-o", tmp_path / "c", "--size", "128", "--pixels", "none")
    assert res.code == 0 and "coordinates only" in res.err, res
    cfg.write_text("[tile]\nquality = 80\n")
    res = run_cli("--config", cfg, "tile", tissue_slide, "-o", tmp_path / "d", "--pixels", "none")
    assert res.code == 1 and res.err_lines == [said.replace("--codec and --quality say", "--quality says").replace(
        "drop them", "drop it")], res


def test_plain_zarr_reads_a_jpeg_store_through_the_declared_entry_points(tmp_path: Path) -> None:
    """What an installed wsi-screen gives a user of plain zarr: the entry points pyproject.toml declares (put on
    the path as a distribution's metadata) let ``zarr.open_group`` decode a JPEG store without importing
    wsi_screen (zarr loads the codec class by itself)."""
    import os
    import subprocess
    import sys
    import tomllib

    repo = Path(__file__).resolve().parents[2]
    groups = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["entry-points"]
    dist = tmp_path / "site" / "wsi_screen_codecs-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: wsi-screen-codecs\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in groups.items()))
    size, n = 32, 3
    patches = np.stack([he_texture(size, size, seed=i) for i in range(n)])
    loc = store_location(tmp_path, "s")
    w = StoreWriter(loc, n_patches=n, patch_size=size, thumbnail_shape=(4, 4), attrs={}, codec=PatchCodec("jpeg"))
    w.write_patches(0, patches)
    w.write_images(thumbnail=np.zeros((4, 4, 3), np.uint8), mask=np.zeros((4, 4), np.uint8))
    w.write_arrays(coords=np.zeros((n, 2), np.int64), tissue=np.zeros(n), stain_ok=np.zeros(n, bool))
    w.commit()
    expected = PatchStore.open(loc).read(slice(None))
    code = ("import sys, zarr, numpy as np\n"
            f"a = zarr.open_group({loc!r}, mode='r')['patches'][...]\n"
            "np.save(sys.stdout.buffer, a)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(repo)]),
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = proc.stdout
    import io

    assert np.array_equal(np.load(io.BytesIO(out)), expected)
