"""Stain normalisation: fitting, mapping, refusals, determinism, errors, and the tiatoolbox cross-check."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from wsi_screen.errors import ConfigError, StainFitError
from wsi_screen.tiling import stain

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "tests" / "fixtures" / "stain_reference.json"
TARGET_PNG = REPO / "wsi_screen" / "resources" / "stain_target.png"
FITTED = ("macenko", "reinhard", "vahadane")
fast = settings(max_examples=60, deadline=None)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _angle(u: object, v: object) -> float:
    a, b = np.asarray(u, dtype=float), np.asarray(v, dtype=float)
    return math.degrees(math.acos(float(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


def _center(img: np.ndarray, size: int = 224) -> np.ndarray:
    y, x = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return np.ascontiguousarray(img[y:y + size, x:x + size])


@pytest.fixture(scope="module")
def crc(patches_dir: Path) -> np.ndarray:
    """All 70 CRC-VAL-HE-7K tiles (224x224, seven tissue classes): a stand-in for one slide's sample."""
    files = sorted((patches_dir / "crc-7class-sample" / "images").glob("*/*.jpg"))
    assert len(files) == 70
    return np.stack([_read(f) for f in files])


@pytest.fixture(scope="module")
def fitted(crc: np.ndarray) -> dict[str, stain.StainParams]:
    return {m: stain.fit(crc, m) for m in FITTED}


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@functools.cache
def _normalizer(method: str) -> stain.Normalizer:
    """A fixed normaliser (source fitted on the bundled target's top half) for property tests."""
    half = _read(TARGET_PNG)[:256]
    return stain.Normalizer(stain.fit(half, method), stain.target_params(method)[0])


def test_a_stain_target_without_a_method_or_unusable_is_refused_up_front(tmp_path: Path) -> None:
    """`--stain-target` alone used to tile unnormalised patches without a word; an unusable one failed each slide."""
    from tests.conftest import run_cli

    res = run_cli("tile", str(REPO / "examples"), "-o", str(tmp_path / "out"), "--stain-target", str(TARGET_PNG))
    assert res.code == 2 and "only used with --stain macenko, reinhard or vahadane" in res.err
    assert not (tmp_path / "out").exists()  # refused before anything is written
    blank = tmp_path / "blank.png"  # unusable as a target: one line before any slide, not one per slide
    Image.fromarray(np.full((64, 64, 3), 250, np.uint8)).save(blank)
    res = run_cli("tile", REPO / "examples", REPO / "examples", "-o", tmp_path / "out", "--stain", "macenko",
                  "--stain-target", str(blank))
    errors = [line for line in res.err_lines if "error" in line]
    assert res.code == 1 and len(errors) == 1 and "blank.png" in errors[0] and "too little stained" in errors[0]
    assert not (tmp_path / "out").exists()


# --- fitting --------------------------------------------------------------------------------------------
def test_every_method_is_offered_and_documented() -> None:
    """The methods the library implements are the choices of `tile --stain`, each documented in stain.md."""
    from tests.conftest import run_cli

    res = run_cli("tile", "--help")
    assert res.code == 0
    doc = (REPO / "docs" / "stain.md").read_text()
    for method in stain.METHODS:
        assert method in res.out and f"`{method}`" in doc, method


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_fit_stain_matrix_on_many_patches(fitted: dict[str, stain.StainParams], method: str) -> None:
    params = fitted[method]
    matrix = np.asarray(params.values["stain_matrix"])
    assert matrix.shape == (2, 3)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-9)
    h, e = matrix
    assert h[0] > e[0]  # haematoxylin first: it absorbs more red than eosin
    assert e[1] == max(e)  # eosin absorbs green most
    assert 5.0 < _angle(h, e) < 60.0
    assert all(0.1 < c < 10 for c in params.values["max_concentrations"])


def test_fit_reinhard_on_many_patches(fitted: dict[str, stain.StainParams]) -> None:
    mean, std = fitted["reinhard"].values["lab_mean"], fitted["reinhard"].values["lab_std"]
    assert 30 < mean[0] < 80 and mean[1] > 10 and mean[2] < 0  # H&E: mid lightness, pink-purple
    assert all(1 < s < 40 for s in std)


def test_fit_accepts_images_of_different_sizes(crc: np.ndarray) -> None:
    target = _read(TARGET_PNG)
    params = stain.fit([crc[0], target, crc[-1][:100]], "macenko")
    assert params.method == "macenko"
    single = stain.fit(target, "macenko")  # one (H, W, 3) image
    assert single.to_json() == stain.fit(target[None], "macenko").to_json()


def test_fit_ignores_unstainable_images(crc: np.ndarray) -> None:
    white = np.full((4, 224, 224, 3), 255, np.uint8)
    pen = np.zeros((4, 224, 224, 3), np.uint8)
    pen[...] = (40, 160, 120)  # teal ink
    mixed = np.concatenate([white, crc[60:70], pen])
    assert stain.fit(mixed, "macenko").to_json() == stain.fit(crc[60:70], "macenko").to_json()


def test_vahadane_solver_matches_scikit_learn(reference: dict) -> None:
    """Our vectorised dictionary learning solves the same problem as sklearn's (which loops per pixel)."""
    from sklearn.decomposition import dict_learning

    od = stain._OD_LUT[stain._pooled_pixels(_read(TARGET_PNG))]
    x = od[stain._even(len(od), 400)]
    ours = stain._vahadane_matrix(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's per-pixel lasso warns about convergence
        _, dictionary, _ = dict_learning(x, n_components=2, alpha=stain.VAHADANE_LAMBDA, max_iter=60,
                                         method="cd", random_state=0, positive_code=True,
                                         positive_dict=True)
    theirs = stain._h_first(dictionary)
    assert _angle(ours[0], theirs[0]) < 1.0
    assert _angle(ours[1], theirs[1]) < 1.0


# --- applying ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", FITTED)
def test_apply_maps_stain_towards_target(crc: np.ndarray, fitted: dict[str, stain.StainParams],
                                         method: str) -> None:
    source = fitted[method]
    target, _ = stain.target_params(method)
    out, ok = stain.Normalizer(source, target).apply(crc)
    assert out.dtype == np.uint8 and out.shape == crc.shape and ok.all()
    after = stain.fit(out, method)
    if method == "reinhard":
        def dist(p: stain.StainParams) -> float:
            return float(np.abs(np.subtract(p.values["lab_mean"], target.values["lab_mean"])).sum())
        assert dist(after) < 0.5 * dist(source)
    else:
        def dist(p: stain.StainParams) -> float:
            m, t = p.values["stain_matrix"], target.values["stain_matrix"]
            return _angle(m[0], t[0]) + _angle(m[1], t[1])

        def conc(p: stain.StainParams) -> float:
            ratio = np.divide(p.values["max_concentrations"], target.values["max_concentrations"])
            return float(np.abs(np.log(ratio)).sum())
        assert dist(after) < 0.6 * dist(source)
        assert conc(after) < 0.5 * conc(source)


@pytest.mark.parametrize("method", FITTED)
def test_apply_is_deterministic_and_batch_independent(crc: np.ndarray, fitted: dict[str, stain.StainParams],
                                                      method: str) -> None:
    norm = stain.Normalizer(fitted[method], stain.target_params(method)[0])
    batch = crc[::5]
    out1, ok1 = norm.apply(batch)
    out2, ok2 = norm.apply(batch.copy())
    assert out1.tobytes() == out2.tobytes() and (ok1 == ok2).all()
    halves = np.concatenate([norm.apply(batch[:5])[0], norm.apply(batch[5:])[0]])
    assert halves.tobytes() == out1.tobytes()
    white_first = np.concatenate([np.full((1, 224, 224, 3), 255, np.uint8), batch])
    assert norm.apply(white_first)[0][1:].tobytes() == out1.tobytes()


@pytest.mark.parametrize("method", FITTED)
def test_fit_is_deterministic(crc: np.ndarray, fitted: dict[str, stain.StainParams], method: str) -> None:
    assert stain.fit(crc.copy(), method).to_json() == fitted[method].to_json()


def test_macenko_apply_matches_float64_reference(crc: np.ndarray,
                                                 fitted: dict[str, stain.StainParams]) -> None:
    """The table/float32 fast path equals the textbook concentration solve to within one grey level."""
    src, tgt = fitted["macenko"], stain.target_params("macenko")[0]
    batch = crc[::10]
    od = stain._OD_LUT[batch.reshape(-1, 3)]
    conc = np.linalg.lstsq(np.asarray(src.values["stain_matrix"]).T, od.T, rcond=None)[0].T
    conc *= np.divide(tgt.values["max_concentrations"], src.values["max_concentrations"])
    expected = np.clip(np.rint(255 * np.exp(-conc @ np.asarray(tgt.values["stain_matrix"]))), 0, 255)
    got = stain.Normalizer(src, tgt).apply(batch)[0].reshape(-1, 3)
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def _every_colour() -> np.ndarray:
    """All 2**24 RGB colours, (1, 2**24, 3) uint8."""
    v = np.arange(1 << 24, dtype=np.uint32)
    return np.stack([v >> 16, (v >> 8) & 255, v & 255], axis=-1).astype(np.uint8)[None]


def test_od_map_on_every_colour_matches_float64() -> None:
    """The compiled product-of-tables map is ``255 exp(T @ -OD)`` rounded half up, on all 16.7 M colours: within
    one grey level, and off by one only where float rounding meets a .5 boundary."""
    from wsi_screen.tiling.pixel_kernels import od_map

    t = np.array([[0.9, 0.15, -0.05], [0.2, 1.1, 0.1], [-0.1, 0.25, 0.95]])  # a realistic OD-space map
    flat = _every_colour()[0]
    got = np.empty_like(flat)
    od_map(flat, stain.od_map_tables(t), got)
    worst, off = 0.0, 0
    for start in range(0, len(flat), 1 << 18):  # float64 in chunks that stay in cache: 0.8 s instead of 5.3
        neg_od = -stain._OD_LUT[flat[start:start + (1 << 18)]]  # (n, 3), float64
        exact = 255.0 * np.exp(neg_od @ t.T)
        expected = np.floor(np.minimum(exact + 0.5, 255.0))
        diff = np.abs(got[start:start + (1 << 18)].astype(np.float64) - expected)
        worst, off = max(worst, float(diff.max())), off + int((diff > 0).sum())
    assert worst <= 1 and off / len(flat) < 1e-5
    assert got[-1].tolist() == [255, 255, 255] and got[0].max() <= 2  # white stays white, black stays black


def test_pixel_classes_on_every_colour_follow_the_rule() -> None:
    """The compiled classes equal the rule stated in numpy: stained = mean OD >= MIN_MEAN_OD and no pen colour,
    pen from the 6-bit table, fit = dense and not unambiguous ink."""
    from wsi_screen.tiling.pixel_kernels import LUT_INK, LUT_PEN

    flat = _every_colour()
    stained, pen, fit_px = stain._pixel_classes(flat)
    # each channel's OD looked up from its byte (the same float64 numbers as the log of every pixel: 0.6 s, not 3)
    od = -np.log(np.maximum(np.arange(256, dtype=np.float64), 1) / 255.0)
    dense = od[flat[0]].mean(axis=1) >= stain.MIN_MEAN_OD - 1e-12
    q = (flat[0] >> 2).astype(np.int32)
    code = stain._pen_lut()[q[:, 0] * 4096 + q[:, 1] * 64 + q[:, 2]]
    assert np.array_equal(pen[0], (code & LUT_PEN) > 0)
    assert np.array_equal(stained[0], dense & ((code & LUT_PEN) == 0))
    assert np.array_equal(fit_px[0], dense & ((code & LUT_INK) == 0))
    assert 0.05 < stained.mean() < 0.95 and 0 < pen.mean() < 0.5  # the rule splits the cube


def test_stainable_statistics_match_numpy(crc: np.ndarray, odd_patches: dict[str, np.ndarray]) -> None:
    """The compiled per-patch counts and sums over every STAT_PIXELS-th pixel are numpy's, exactly."""
    from wsi_screen.tiling import pixel_kernels

    names = list(odd_patches)
    batch = np.concatenate([crc[:20], np.stack([odd_patches[k] for k in names])])
    n_px = batch.shape[1] * batch.shape[2]
    step = max(1, n_px // stain.STAT_PIXELS)
    stats = np.zeros((len(batch), 5))
    pixel_kernels.patch_stats(batch.reshape(len(batch), n_px, 3), step, stain._pen_lut(),
                              stain._STAINED_MAX_PRODUCT, stats)
    sample = batch.reshape(len(batch), n_px, 3)[:, ::step]
    stained, pen, _ = stain._pixel_classes(sample)
    total = sample.astype(np.int64).sum(axis=2) * stained
    expected = np.stack([np.full(len(batch), sample.shape[1]), stained.sum(1), pen.sum(1), total.sum(1),
                         (total**2).sum(1)], axis=1)
    np.testing.assert_array_equal(stats, expected)
    odd = dict(zip(names, stats[20:], strict=True))
    assert (stats[:20, 1] > 0).all() and odd["white"][1] == odd["empty"][1] == 0
    assert odd["blue-stroke"][2] > 0.2 * odd["blue-stroke"][0]  # the stroke covers a third of the patch


def test_reinhard_apply_matches_skimage(crc: np.ndarray, fitted: dict[str, stain.StainParams]) -> None:
    from skimage.color import lab2rgb, rgb2lab

    src, tgt = fitted["reinhard"], stain.target_params("reinhard")[0]
    batch = crc[::10]
    np.testing.assert_allclose(stain._rgb_to_lab(batch), rgb2lab(batch), atol=1e-3)
    lab = (rgb2lab(batch) - src.values["lab_mean"]) / src.values["lab_std"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lab2rgb warns when it clips negative Z, as we do silently
        expected = np.rint(np.clip(lab2rgb(lab * tgt.values["lab_std"] + tgt.values["lab_mean"]), 0, 1) * 255)
    diff = np.abs(stain.Normalizer(src, tgt).apply(batch)[0].astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2


# --- patches that must pass unnormalised ------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd_patches(patches_dir: Path, crc: np.ndarray) -> dict[str, np.ndarray]:
    qc = patches_dir / "qc-tiles" / "tiles"
    purple = np.zeros((224, 224, 3), np.uint8)
    purple[...] = (120, 80, 160)
    ink = crc[-1].copy()
    ink[:, :80] = (30, 60, 200)  # a blue stroke over a third of a tumour tile
    return {
        "white": np.full((224, 224, 3), 255, np.uint8),
        "empty": np.zeros((224, 224, 3), np.uint8),
        "black": np.full((224, 224, 3), 12, np.uint8),
        "purple": purple,
        "blue-stroke": ink,
        "almost-white": _center(_read(qc / "almost-white-2.png")),
        "no-tissue": _center(_read(qc / "no-tissue.png")),
        "green-pen": _center(_read(qc / "no-tissue-green-pen.png")),
        "green-pen-on-tissue": _center(_read(qc / "medium-nuclei-score-green-pen-level1.png")),
        "red-pen": _center(_read(qc / "no-tissue-red-pen.png")),
    }


def test_stainable_on_real_tissue(crc: np.ndarray, patches_dir: Path) -> None:
    assert stain.stainable(crc).all()
    tissue = sorted((patches_dir / "qc-tiles" / "tiles").glob("tissue-level*.png"))
    assert stain.stainable(np.stack([_center(_read(f)) for f in tissue])).all()


@pytest.mark.parametrize("method", FITTED)
def test_odd_patches_pass_unnormalised(odd_patches: dict[str, np.ndarray], crc: np.ndarray,
                                       fitted: dict[str, stain.StainParams], method: str) -> None:
    norm = stain.Normalizer(fitted[method], stain.target_params(method)[0])
    batch = np.stack([*odd_patches.values(), crc[-1]])
    out, ok = norm.apply(batch)
    assert out.dtype == np.uint8 and out.shape == batch.shape and ok.dtype == bool
    expected = {**dict.fromkeys(odd_patches, False), "tissue": True}
    assert dict(zip([*odd_patches, "tissue"], ok.tolist(), strict=True)) == expected
    assert out[:-1].tobytes() == batch[:-1].tobytes()
    assert out[-1].tobytes() != batch[-1].tobytes()
    assert (stain.stainable(batch) == ok).all()


@pytest.mark.parametrize("method", FITTED)
def test_fit_refuses_too_little_tissue(odd_patches: dict[str, np.ndarray], method: str) -> None:
    with pytest.raises(StainFitError, match="too little stained tissue"):
        stain.fit(np.stack(list(odd_patches.values())), method)
    with pytest.raises(StainFitError):
        stain.fit(np.zeros((0, 224, 224, 3), np.uint8), method)


def test_fit_refuses_a_single_stain() -> None:
    rng = np.random.default_rng(0)
    shade = rng.uniform(0.3, 1.5, (2, 64, 64, 1))  # one stain at varying density: texture, one colour
    img = np.rint(255 * np.exp(-shade * np.array([0.65, 0.70, 0.29]))).astype(np.uint8)
    with pytest.raises(StainFitError, match=r"could not be told apart|missing"):
        stain.fit(img, "macenko")


def test_empty_and_degenerate_batches() -> None:
    norm = _normalizer("macenko")
    out, ok = norm.apply(np.zeros((0, 224, 224, 3), np.uint8))
    assert out.shape == (0, 224, 224, 3) and ok.shape == (0,)
    out, ok = norm.apply(np.zeros((2, 0, 5, 3), np.uint8))
    assert out.shape == (2, 0, 5, 3) and not ok.any()
    with pytest.raises(ValueError, match="uint8"):
        norm.apply(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        stain.stainable(np.zeros((8, 8, 3), np.uint8))


_pixels = st.one_of(
    arrays(np.uint8, st.tuples(st.integers(1, 3), st.integers(1, 24), st.integers(1, 24), st.just(3))),
    # near one colour, as glass, ink or a fill with scanner noise
    st.builds(lambda c, n, s: np.clip(np.asarray(c, np.int16) + np.random.default_rng(s).integers(
        -n, n + 1, (2, 16, 16, 3)), 0, 255).astype(np.uint8),
        st.tuples(*[st.integers(0, 255)] * 3), st.integers(0, 12), st.integers(0, 2**16)),
)


@fast
@given(batch=_pixels, method=st.sampled_from(FITTED))
def test_random_patches_never_break_apply(batch: np.ndarray, method: str) -> None:
    out, ok = _normalizer(method).apply(batch)  # warnings are errors: a NaN cast would fail here
    assert out.dtype == np.uint8 and out.shape == batch.shape
    assert ok.shape == (batch.shape[0],) and ok.dtype == bool
    assert out[~ok].tobytes() == batch[~ok].tobytes()


# enough pixels to get past MIN_FIT_PIXELS: noise inside a random colour box, or blocky random colours
_fit_pixels = st.one_of(
    st.builds(lambda lo, span, s: np.random.default_rng(s).integers(
        np.asarray(lo), np.minimum(np.asarray(lo) + span, 256), (2, 40, 40, 3)).astype(np.uint8),
        st.tuples(*[st.integers(0, 250)] * 3), st.integers(1, 255), st.integers(0, 2**16)),
    arrays(np.uint8, (2, 8, 8, 3)).map(lambda a: np.repeat(np.repeat(a, 6, axis=1), 6, axis=2)),
)


@fast
@given(batch=st.one_of(_pixels, _fit_pixels), method=st.sampled_from(FITTED))
def test_random_patches_never_break_fit(batch: np.ndarray, method: str) -> None:
    try:
        params = stain.fit(batch, method)
    except StainFitError:
        return
    flat = np.concatenate([np.ravel(np.asarray(v, dtype=np.float64)) for v in params.values.values()])
    assert flat.size and np.isfinite(flat).all()  # fitted values are finite numbers ...
    assert stain.StainParams.from_json(json.loads(json.dumps(params.to_json()))) == params  # ... and valid
    out, ok = stain.Normalizer(params, params).apply(batch)  # ... and usable
    assert out.shape == batch.shape and out.dtype == np.uint8 and ok.shape == (len(batch),)
    assert np.array_equal(out[~ok], batch[~ok])  # patches it does not normalise come back unchanged


# --- parameters, targets, errors --------------------------------------------------------------------------
@pytest.mark.parametrize("method", FITTED)
def test_params_json_round_trip(fitted: dict[str, stain.StainParams], method: str) -> None:
    params = fitted[method]
    text = json.dumps(params.to_json())
    back = stain.StainParams.from_json(json.loads(text))
    assert back == params and back.to_json() == params.to_json()
    norm = stain.Normalizer(params, stain.target_params(method)[0])
    doc = json.loads(json.dumps(norm.to_json()))
    assert set(doc) == {"source", "target"} and doc["source"] == params.to_json()
    rebuilt = stain.Normalizer(stain.StainParams.from_json(doc["source"]),
                               stain.StainParams.from_json(doc["target"]))
    assert rebuilt.to_json() == norm.to_json()


def test_params_from_json_rejects_malformed() -> None:
    with pytest.raises(ConfigError, match=r"unknown stain method 'magic'.*macenko"):
        stain.StainParams.from_json({"method": "magic", "values": {}})
    with pytest.raises(ConfigError, match="malformed"):
        stain.StainParams.from_json({"values": {}})
    with pytest.raises(ConfigError, match="stain_matrix"):
        stain.StainParams.from_json({"method": "macenko", "values": {"max_concentrations": [1, 1]}})
    with pytest.raises(ConfigError, match="finite"):
        stain.StainParams.from_json({"method": "reinhard",
                                     "values": {"lab_mean": [50, float("nan"), 0], "lab_std": [1, 1, 1]}})
    with pytest.raises(ConfigError, match="positive"):
        stain.StainParams.from_json({"method": "vahadane", "values": {
            "stain_matrix": [[1, 0, 0], [0, 1, 0]], "max_concentrations": [1, 0]}})


def test_unknown_method_lists_the_valid_ones(crc: np.ndarray) -> None:
    for call in (lambda: stain.fit(crc[:1], "Macenko"), lambda: stain.target_params("ruifrok")):
        with pytest.raises(ConfigError, match="none, macenko, reinhard, vahadane"):
            call()


def test_normalizer_refuses_mixed_methods(fitted: dict[str, stain.StainParams]) -> None:
    with pytest.raises(ConfigError, match="same method"):
        stain.Normalizer(fitted["macenko"], fitted["vahadane"])


def test_method_none() -> None:
    params, desc = stain.target_params("none")
    assert params == stain.fit(np.zeros((1, 4, 4, 3), np.uint8), "none") == stain.StainParams("none", {})
    assert desc["source"] == "none" and desc["sha256"] is None
    batch = np.full((2, 8, 8, 3), 100, np.uint8)
    out, ok = stain.Normalizer(params, params).apply(batch)
    assert out.tobytes() == batch.tobytes() and not ok.any()


def test_bundled_target() -> None:
    params, desc = stain.target_params("macenko")
    assert desc == {"name": stain.BUNDLED_TARGET_NAME, "source": "bundled",
                    "sha256": hashlib.sha256(TARGET_PNG.read_bytes()).hexdigest(),
                    "path": "wsi_screen/resources/stain_target.png"}
    assert _read(TARGET_PNG).shape == (512, 512, 3)
    params.values["stain_matrix"][0][0] = 99.0  # callers get copies: the cache stays intact
    assert stain.target_params("macenko")[0].values["stain_matrix"][0][0] < 1.0


@pytest.mark.parametrize("suffix", [".png", ".tif", ".jpg"])
def test_user_target(tmp_path: Path, crc: np.ndarray, suffix: str) -> None:
    path = tmp_path / f"my target{suffix}"
    Image.fromarray(crc[-1]).save(path)
    params, desc = stain.target_params("reinhard", str(path))
    assert desc == {"name": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                    "source": "user", "path": str(path.resolve())}
    if suffix != ".jpg":
        assert params == stain.fit(crc[-1], "reinhard")


def test_unreadable_targets_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(ConfigError, match=r"nope\.png"):
        stain.target_params("macenko", missing)
    garbage = tmp_path / "garbage.png"
    garbage.write_text("not an image")
    with pytest.raises(ConfigError, match=r"garbage\.png.*not a readable") as raised:
        stain.target_params("macenko", garbage)
    assert "BytesIO" not in str(raised.value)  # PIL's message names its in-memory buffer, not the file
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64, 3), 250, np.uint8)).save(blank)
    with pytest.raises(ConfigError, match=r"blank\.png.*too little stained tissue"):
        stain.target_params("vahadane", blank)
    with pytest.raises(ConfigError, match="cannot read"):
        stain.target_params("macenko", tmp_path)  # a folder


# --- cross-check against tiatoolbox (tests/fixtures/stain_reference.json) ---------------------------------
def _reference_images(reference: dict, patches_dir: Path) -> dict[str, np.ndarray]:
    roots = {"repo": REPO, "patches": patches_dir}
    return {name: _read(roots[entry["root"]] / entry["path"]) for name, entry in reference["images"].items()}


def test_reference_fixture_is_small_and_complete(reference: dict) -> None:
    assert REFERENCE.stat().st_size < 20_000
    assert reference["versions"]["tiatoolbox"]
    assert len(reference["images"]) == 4 and "target" in reference["images"]


def test_macenko_matches_tiatoolbox(reference: dict, patches_dir: Path) -> None:
    for name, img in _reference_images(reference, patches_dir).items():
        ref = reference["images"][name]["macenko"]
        ours = stain.fit(img, "macenko").values
        for row, ref_row in zip(ours["stain_matrix"], ref["stain_matrix"], strict=True):
            assert _angle(row, ref_row) < 2.0, name
        # tiatoolbox takes the 99th percentile over all pixels, glass included; we over stained ones
        np.testing.assert_allclose(ours["max_concentrations"], ref["max_concentrations"], rtol=0.1,
                                   err_msg=name)


def test_macenko_output_matches_tiatoolbox(reference: dict, patches_dir: Path) -> None:
    images = _reference_images(reference, patches_dir)
    target = stain.target_params("macenko")[0]
    for name, img in images.items():
        if name == "target":
            continue
        out, ok = stain.Normalizer(stain.fit(img, "macenko"), target).apply(img[None])
        mean = out.reshape(-1, 3).mean(axis=0)
        assert ok.all()
        expected = reference["normalised_to_target"]["macenko"][name]["mean_rgb"]
        np.testing.assert_allclose(mean, expected, atol=5, err_msg=name)


def test_reinhard_matches_tiatoolbox(reference: dict, patches_dir: Path) -> None:
    images = _reference_images(reference, patches_dir)
    all_px = {}
    for name, img in images.items():
        ref = reference["images"][name]["reinhard"]
        lab = stain._rgb_to_lab(img).reshape(-1, 3).astype(np.float64)
        # the same colour space: OpenCV's 8-bit L*a*b* is the CIE L*a*b* we compute, rounded
        np.testing.assert_allclose(lab.mean(axis=0), ref["lab_mean"], atol=0.5, err_msg=name)
        np.testing.assert_allclose(lab.std(axis=0), ref["lab_std"], atol=0.5, err_msg=name)
        all_px[name] = stain.StainParams("reinhard", {"lab_mean": stain._floats(lab.mean(axis=0)),
                                                      "lab_std": stain._floats(lab.std(axis=0))})
        # our fit keeps stained pixels only, so it differs where an image shows glass (see docs/stain.md)
        ours = stain.fit(img, "reinhard").values
        np.testing.assert_allclose(ours["lab_mean"], ref["lab_mean"], atol=6, err_msg=name)
        np.testing.assert_allclose(ours["lab_std"], ref["lab_std"], atol=5, err_msg=name)
    for name, img in images.items():  # with tiatoolbox's all-pixel statistics, the same output
        if name != "target":
            out, _ = stain.Normalizer(all_px[name], all_px["target"]).apply(img[None])
            np.testing.assert_allclose(out.reshape(-1, 3).mean(axis=0),
                                       reference["normalised_to_target"]["reinhard"][name]["mean_rgb"],
                                       atol=3, err_msg=name)


def test_vahadane_against_macenko_and_tiatoolbox(reference: dict, patches_dir: Path) -> None:
    """tiatoolbox's Vahadane is not comparable (non-physical vectors); ours stays near Macenko."""
    for name, img in _reference_images(reference, patches_dir).items():
        tia = np.asarray(reference["images"][name]["vahadane"]["stain_matrix"])
        assert tia.min() < 0  # what docs/stain.md reports: a stain vector with negative absorbance
        ours = np.asarray(stain.fit(img, "vahadane").values["stain_matrix"])
        assert ours.min() >= 0
        mac = reference["images"][name]["macenko"]["stain_matrix"]
        assert _angle(ours[0], mac[0]) < 8 and _angle(ours[1], mac[1]) < 16, name


def test_reinhard_colour_table_gives_the_same_bytes(crc: np.ndarray, fitted: dict[str, stain.StainParams],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Past REINHARD_TABLE_AFTER pixels a slide's Reinhard map is looked up in a table of every colour, built by
    the numpy code: the output bytes are the same before and after, and the table is built once."""
    target = stain.target_params("reinhard")[0]
    rng = np.random.default_rng(5)
    batch = np.concatenate([crc[::7], rng.integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)])
    direct = stain.Normalizer(fitted["reinhard"], target)
    monkeypatch.setattr(stain, "REINHARD_TABLE_AFTER", batch[:, ..., 0].size // 2)
    tabled = stain.Normalizer(fitted["reinhard"], target)
    first, _ = tabled.apply(batch)  # one batch: the table is built on this call
    assert tabled._colour_table is not None and tabled._colour_table.shape == (1 << 24, 3)
    table = tabled._colour_table
    second, ok = tabled.apply(batch)
    assert tabled._colour_table is table  # built once
    monkeypatch.setattr(stain, "REINHARD_TABLE_AFTER", 1 << 62)
    expected, ok_direct = direct.apply(batch)
    assert direct._colour_table is None
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected)
    assert np.array_equal(ok, ok_direct) and ok.sum() >= len(crc[::7])
