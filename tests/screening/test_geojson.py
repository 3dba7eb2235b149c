"""QuPath GeoJSON export: structure, round trip, escaping and the atomic writer."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from wsi_screen.errors import ConfigError, DatasetError
from wsi_screen.screening.geojson import geojson_to_coords, packed_rgb, patches_to_geojson, write_geojson

CLASSES = ["normal", "tumour"]


def _example() -> tuple[np.ndarray, np.ndarray]:
    coords = np.array([[0, 0], [224, 0], [448, 896], [1_000_000, 1_500_000]], dtype=np.int64)
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.123456789, 0.876543211]])
    return coords, probs


def _signed_area(ring: list[list[int]]) -> float:
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(ring))


def test_structure() -> None:
    coords, probs = _example()
    fc = patches_to_geojson(coords, 224, probs, CLASSES, slide_name="s1")
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 4
    assert fc["wsi_screen"] == {"slide": "s1", "classes": CLASSES, "tile_size_l0": 224, "n_patches": 4, "n_foci": 0,
                                "evidence_indices": [], "positive_class": None, "threshold": None,
                                "threshold_source": None, "decision": "most probable class"}
    for i, (feat, (x, y)) in enumerate(zip(fc["features"], coords.tolist(), strict=True)):
        assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Polygon"
        rings = feat["geometry"]["coordinates"]
        assert len(rings) == 1
        ring = rings[0]
        assert ring == [[x, y], [x + 224, y], [x + 224, y + 224], [x, y + 224], [x, y]]
        assert len(ring) == 5 and ring[0] == ring[-1]
        assert all(type(v) is int for pt in ring for v in pt)
        assert _signed_area(ring) == 224 * 224  # counter-clockwise in GeoJSON's (y up) sense
        props = feat["properties"]
        assert props["objectType"] == "tile" and props["index"] == i and props["name"] == f"tile {i}"
        assert list(props["measurements"]) == CLASSES
        assert set(props["classification"]) == {"name", "color", "colorRGB"}
        assert len(props["classification"]["color"]) == 3
    names = [f["properties"]["classification"]["name"] for f in fc["features"]]
    assert names == ["normal", "tumour", "normal", "tumour"]  # argmax; ties go to the first class
    assert fc["features"][3]["properties"]["measurements"] == {"normal": 0.123457, "tumour": 0.876543}
    json.dumps(fc, allow_nan=False)  # plain JSON types only


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    coords, probs = _example()
    fc = patches_to_geojson(coords, 224, probs, CLASSES, slide_name="s1")
    out = write_geojson(fc, tmp_path / "deep" / "s1.geojson")
    assert [p.name for p in out.parent.iterdir()] == ["s1.geojson"]
    back = json.loads(out.read_text(encoding="utf-8"))
    assert back == fc
    xy, sizes = geojson_to_coords(back)
    assert xy.dtype == np.int64 and np.array_equal(xy, coords)
    assert np.array_equal(sizes, np.full(4, 224))


def test_names_are_data(tmp_path: Path) -> None:
    name = 'evil"}, {"type": "x\n\u00e9\u2603</script>\\'
    classes = ['a"b', "tum\u00f6ur \\ {0}"]
    fc = patches_to_geojson(np.array([[1, 2]]), 3, np.array([[0.25, 0.75]]), classes, slide_name=name)
    out = write_geojson(fc, tmp_path / "x.geojson")
    text = out.read_text(encoding="utf-8")
    assert text.isascii()  # non-ASCII escaped, so any reader's encoding guess is safe
    back = json.loads(text)
    assert back["wsi_screen"]["slide"] == name
    assert list(back["features"][0]["properties"]["measurements"]) == classes
    assert back["features"][0]["properties"]["classification"]["name"] == classes[1]


def test_colours() -> None:
    fc = patches_to_geojson(np.array([[0, 0]]), 10, np.array([[0.2, 0.8]]), CLASSES, slide_name="s",
                            colors={"tumour": (200, 0, 0)})
    cls = fc["features"][0]["properties"]["classification"]
    assert cls == {"name": "tumour", "color": [200, 0, 0], "colorRGB": packed_rgb((200, 0, 0))}
    assert packed_rgb((200, 0, 0)) == -3670016  # QuPath's legacy signed ARGB
    assert packed_rgb((0, 0, 0)) == -16777216
    with pytest.raises(ConfigError, match="colour"):
        patches_to_geojson(np.array([[0, 0]]), 10, np.array([[0.2, 0.8]]), CLASSES, slide_name="s",
                           colors={"tumour": (300, 0, 0)})


def test_tile_classes_agree_with_the_declared_threshold_as_written() -> None:
    # 0.7999996 is written as 0.8: at a threshold of 0.8 the tile must say tumour, as its measurement does
    probs = np.array([[0.2000004, 0.7999996], [0.21, 0.79], [0.1, 0.9], [0.6, 0.4]])
    fc = patches_to_geojson(np.arange(8).reshape(4, 2), 10, probs, CLASSES, slide_name="s", positive_index=1,
                            threshold=0.8, threshold_source="the slide call's patch threshold (region rule)")
    meta = fc["wsi_screen"]
    assert meta["threshold"] == 0.8 and meta["threshold_source"].startswith("the slide call's")
    names = [f["properties"]["classification"]["name"] for f in fc["features"]]
    assert names == ["tumour", "normal", "tumour", "normal"]
    for f in fc["features"]:
        props = f["properties"]
        assert (props["classification"]["name"] == "tumour") == (props["measurements"]["tumour"] >= meta["threshold"])
        assert props["threshold"] == 0.8


def test_foci_are_annotations_first_largest_first() -> None:
    import shapely
    import shapely.geometry

    from wsi_screen.screening.aggregate import AggregateConfig, diagnose
    from wsi_screen.screening.spatial import patch_grid

    p = np.full((12, 12), 0.1)
    p[1:5, 1:6] = 0.95          # 20 patches
    p[8:11, 8:11] = 0.85        # 9 patches
    rows, cols = np.nonzero(p >= 0)
    coords = np.stack([cols * 96, rows * 96], 1)
    probs = np.stack([1 - p[rows, cols], p[rows, cols]], 1)
    grid = patch_grid(coords, probs[:, 1], 96, 0.972)
    res = diagnose(probs[:, 1], AggregateConfig(rule="region", slide_threshold=0.05, region_threshold=0.8,
                                                min_focus_patches=6), positive="tumour", negative="normal", grid=grid)
    fc = patches_to_geojson(coords, 96, probs, CLASSES, slide_name="s", positive_index=1, threshold=0.8,
                            foci=res.foci)
    assert fc["wsi_screen"]["n_foci"] == 2 and fc["wsi_screen"]["n_patches"] == 144
    first, second = fc["features"][:2]
    assert [f["properties"]["objectType"] for f in fc["features"][:3]] == ["annotation", "annotation", "tile"]
    props = first["properties"]
    assert props["name"] == f"focus 1: micro, {res.largest_focus_mm:.2f} mm" and props["category"] == "micro"
    assert props["classification"]["name"] == "tumour" and props["rank"] == 1 and second["properties"]["rank"] == 2
    assert props["measurements"] == {"longest axis (mm)": round(res.largest_focus_mm, 4),
                                     "area (mm^2)": round(20 * (96 * 0.972 / 1000) ** 2, 5), "patches": 20,
                                     "mean P(tumour)": 0.95, "max P(tumour)": 0.95}
    assert second["properties"]["measurements"]["patches"] == 9
    shape = shapely.geometry.shape(first["geometry"])
    assert shapely.is_valid(shape) and shape.exterior.is_ccw and shape.bounds == (96, 96, 6 * 96, 5 * 96)
    # tile readers skip the annotations
    xy, _ = geojson_to_coords(json.loads(json.dumps(fc)))
    assert np.array_equal(xy, coords)


def test_empty() -> None:
    fc = patches_to_geojson(np.zeros((0, 2), np.int64), 10, np.zeros((0, 2)), CLASSES, slide_name="s")
    assert fc["features"] == []
    xy, sizes = geojson_to_coords(fc)
    assert xy.shape == (0, 2) and sizes.shape == (0,)


def test_invalid_input(tmp_path: Path) -> None:
    xy = np.array([[0, 0]])
    with pytest.raises(ConfigError, match="shape"):
        patches_to_geojson(xy, 10, np.array([[0.5, 0.5, 0.0]]), CLASSES, slide_name="s")
    with pytest.raises(ConfigError, match="within"):
        patches_to_geojson(xy, 10, np.array([[np.nan, 0.5]]), CLASSES, slide_name="s")
    with pytest.raises(ConfigError, match="unique"):
        patches_to_geojson(xy, 10, np.array([[0.5, 0.5]]), ["a", "a"], slide_name="s")
    with pytest.raises(ConfigError, match="integer"):
        patches_to_geojson(np.array([[0.5, 0.0]]), 10, np.array([[0.5, 0.5]]), CLASSES, slide_name="s")
    with pytest.raises(ConfigError, match="cannot write"):
        write_geojson({"type": "FeatureCollection", "features": [], "x": float("nan")}, tmp_path / "n.json")
    assert not list(tmp_path.iterdir())
    with pytest.raises(DatasetError, match="FeatureCollection"):
        geojson_to_coords({"type": "Feature"})
    bad = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [2, 0], [2, 1], [0, 1],
                                                                             [0, 0]]]}}]}
    with pytest.raises(DatasetError, match="square"):
        geojson_to_coords(bad)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 30).flatmap(lambda n: st.tuples(
    arrays(np.int64, (n, 2), elements=st.integers(0, 2_000_000)),
    arrays(np.float64, (n, 3), elements=st.floats(0.0, 1.0)))),
    st.integers(1, 4096), st.text(max_size=20))
def test_round_trip_property(data: tuple[np.ndarray, np.ndarray], tile: int, name: str) -> None:
    coords, probs = data
    fc = patches_to_geojson(coords, tile, probs, ["a", "b", "c"], slide_name=name)
    back = json.loads(json.dumps(fc))
    xy, sizes = geojson_to_coords(back)
    assert np.array_equal(xy, coords.reshape(-1, 2)) and np.all(sizes == tile)
    assert back["wsi_screen"]["slide"] == name
