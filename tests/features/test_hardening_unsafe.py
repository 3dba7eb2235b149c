"""Files from outside never run code and never reach outside their folder; names are data, never markup.

* Pickles (``.pt``/``.pth``/``.pkl``, and a pickle named ``model.safetensors``) are refused by ``load_model``,
  ``--model`` and ``--pretrained`` *before* anything is unpickled: each payload here would create a marker file
  when unpickled, and the marker must never appear.
* The package source never calls an unpickler, ``torch.load`` without ``weights_only=True``, ``yaml.load``
  without a safe loader, ``eval``/``exec``, or ``numpy.load(allow_pickle=True)`` (checked on the syntax tree).
* ``labels.csv`` paths cannot leave the dataset folder.
* Slide names (file names anyone can choose) are escaped in report.html and travel as data in GeoJSON and CSV.
"""

from __future__ import annotations

import ast
import csv
import json
import pathlib
import pickle
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli
from tests.factory import block_image, write_tiled_tiff
from wsi_screen.errors import DatasetError, ModelError, UnsafeFileError
from wsi_screen.models import CONFIG_NAME, WEIGHTS_NAME, ModelSpec, create_model, load_model, save_model
from wsi_screen.training.data import inside_folder, open_patch_folder

PACKAGE = Path(__file__).resolve().parents[2] / "wsi_screen"


class Payload:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "UNPICKLED"


def _pickles(folder: Path, marker: Path) -> dict[str, Path]:
    """Every disguise of the payload: raw pickles and torch.save zip containers, under honest and lying names."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {"weight": torch.zeros(2), "evil": Payload(marker)}
    files = {}
    for name, raw in (("evil.pt", False), ("evil.pth", False), ("evil.pkl", True), ("evil.bin", False)):
        path = folder / name
        if raw:
            path.write_bytes(pickle.dumps(state, protocol=4))
        else:
            torch.save(state, path)
        files[name] = path
    for name, raw in (("raw-pickle", True), ("torch-zip", False)):
        sub = folder / name
        sub.mkdir()
        if raw:
            (sub / WEIGHTS_NAME).write_bytes(pickle.dumps(state, protocol=2))
        else:
            torch.save(state, sub / WEIGHTS_NAME)
        spec = ModelSpec(arch="screen_cnn32", classes=["normal", "tumour"], input_size=32, positive_class="tumour",
                         threshold=0.5, mpp=0.5)
        (sub / CONFIG_NAME).write_text(spec.to_json())
        files[f"{name} named {WEIGHTS_NAME}"] = sub / WEIGHTS_NAME
    # sanity: the payload does run when unpickled (in a throwaway copy)
    probe = folder / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.exists()
    probe.unlink()
    return files


def test_load_model_refuses_every_pickle(tmp_path: Path, marker: Path) -> None:
    for name, path in _pickles(tmp_path / "w", marker).items():
        with pytest.raises(UnsafeFileError, match="pickle"):
            load_model(path)
        if path.name == WEIGHTS_NAME:
            with pytest.raises(UnsafeFileError, match="arbitrary code"):
                load_model(path.parent)
        assert not marker.exists(), name
    lone = tmp_path / "lone"
    lone.mkdir()
    torch.save({"evil": Payload(marker)}, lone / "checkpoint.ckpt")
    with pytest.raises(UnsafeFileError, match=r"checkpoint\.ckpt"):
        load_model(lone)
    assert not marker.exists()


def test_safetensors_header_lies_are_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "m"
    save_model(bogus, create_model("screen_cnn32", num_classes=2),
               ModelSpec(arch="screen_cnn32", classes=["a", "b"], input_size=32))
    data = (bogus / WEIGHTS_NAME).read_bytes()
    (bogus / WEIGHTS_NAME).write_bytes((10**12).to_bytes(8, "little") + data[8:])  # header length beyond the file
    with pytest.raises(ModelError, match="not a safetensors file"):
        load_model(bogus)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "data"
    root.mkdir()
    rows = ["path,label"]
    rng = np.random.default_rng(0)
    for label in ("normal", "tumour"):
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{label}{i}.png")
            rows.append(f"{label}{i}.png,{label}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_cli_refuses_pickles(tmp_path: Path, marker: Path, tiny_dataset: Path) -> None:
    files = _pickles(tmp_path / "w", marker)
    for name, path in files.items():
        res = run_cli("train", tiny_dataset, "--arch", "screen_cnn32", "--epochs", "1", "--workers", "0",
                      "--pretrained", path, "-o", tmp_path / "m", "--quiet")
        assert res.code == 1 and "pickle" in res.err and "Traceback" not in res.err, (name, res)
        assert len(res.err_lines) == 1, res.err
        assert not marker.exists(), name
    folder = files[f"torch-zip named {WEIGHTS_NAME}"].parent
    image = tiny_dataset / "normal0.png"
    for args in (["predict", image, "--model", folder], ["infer", image, "-o", tmp_path / "run", "--model", folder]):
        res = run_cli(*args, "--quiet")
        assert res.code == 1 and "pickle" in res.err and len(res.err_lines) == 1, (args, res)
    assert not marker.exists()
    assert not (tmp_path / "m" / WEIGHTS_NAME).exists()  # no model came out of it


# -------------------------------------------------------------------------------------- source-level checks
class _Finder(ast.NodeVisitor):
    """Calls that can run code found in data."""

    def __init__(self) -> None:
        self.found: list[str] = []

    @staticmethod
    def _name(node: ast.expr) -> str:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        parts.append(node.id if isinstance(node, ast.Name) else "<expr>")  # (...).eval() is a method, not eval
        return ".".join(reversed(parts))

    @staticmethod
    def _kw(node: ast.Call, key: str) -> ast.expr | None:
        return next((k.value for k in node.keywords if k.arg == key), None)

    def visit_Call(self, node: ast.Call) -> None:
        name = self._name(node.func)
        last = name.rsplit(".", 1)[-1]
        bad = ""
        if name in ("eval", "exec", "builtins.eval", "builtins.exec", "compile"):
            bad = "eval/exec/compile"
        elif name.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve") \
                and last in ("load", "loads", "Unpickler", "open"):
            bad = "unpickling"
        elif name == "torch.load" or name.endswith(".torch.load"):
            weights_only = self._kw(node, "weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                bad = "torch.load without weights_only=True"
        elif name in ("yaml.load", "yaml.load_all"):
            loader = self._kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or "Safe" not in self._name(loader):
                bad = "yaml.load without SafeLoader"
        elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            bad = name
        elif last == "load" and name.split(".")[0] in ("np", "numpy"):
            allow = self._kw(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                bad = "numpy.load(allow_pickle=...)"
        if bad:
            self.found.append(f"line {node.lineno}: {bad}")
        self.generic_visit(node)


def _scan(source: str) -> list[str]:
    finder = _Finder()
    finder.visit(ast.parse(source))
    return finder.found


def test_the_scanner_sees_what_it_should() -> None:
    assert _scan("import pickle\npickle.loads(b'')\n") == ["line 2: unpickling"]
    assert _scan("torch.load('x')\ntorch.load('x', weights_only=True)\n") == [
        "line 1: torch.load without weights_only=True"]
    assert _scan("yaml.load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\nyaml.safe_load(s)\n") == [
        "line 1: yaml.load without SafeLoader"]
    assert _scan("eval(x)\nmodel.eval()\nm.to(x).eval()\nnp.load(f, allow_pickle=True)\nnp.load(f)\n") == [
        "line 1: eval/exec/compile", "line 4: numpy.load(allow_pickle=...)"]


def test_package_never_executes_data() -> None:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        hits = _scan(path.read_text(encoding="utf-8"))
        if hits:
            found[str(path.relative_to(PACKAGE.parent))] = hits
    assert not found, found


# ------------------------------------------------------------------------------------------ labels.csv paths
@pytest.mark.parametrize("bad", ["../outside.png", "sub/../../outside.png", "/etc/passwd", "..\\outside.png",
                                 "C:\\Windows\\win.ini", "\\\\server\\share\\x.png"])
def test_labels_csv_cannot_leave_the_dataset(tmp_path: Path, tiny_dataset: Path, bad: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "outside.png").write_bytes((tiny_dataset / "normal0.png").read_bytes())
    for f in tiny_dataset.glob("*.png"):
        (root / f.name).write_bytes(f.read_bytes())
    text = (tiny_dataset / "labels.csv").read_text() + f"{bad},tumour\n"
    (root / "labels.csv").write_text(text)
    assert not inside_folder(bad)
    with pytest.raises(DatasetError, match="leaves the dataset folder"):
        open_patch_folder(root)
    res = run_cli("train", root, "--arch", "screen_cnn32", "--epochs", "1", "--workers", "0", "-o", tmp_path / "m",
                  "--quiet")
    assert res.code == 1 and len(res.err_lines) == 1 and "leaves the dataset folder" in res.err, res


def _png_header(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file whose header declares ``width`` x ``height`` RGB pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_in_a_dataset_is_a_dataset_error(tmp_path: Path) -> None:
    from wsi_screen.training.data import read_image

    bomb = _png_header(tmp_path / "bomb.png", 30_000, 30_000)
    with pytest.raises(DatasetError, match=r"bomb\.png: unreadable image"):
        read_image(bomb)


def test_labels_csv_relative_paths_still_work(tiny_dataset: Path) -> None:
    assert len(open_patch_folder(tiny_dataset)) == 8
    assert all(inside_folder(p) for p in ("a.png", "x/y.png", "./a.png", "a..b.png"))


# ------------------------------------------------------------------------------------ names as data, not code
HOSTILE = ("<script>alert(1)<\\script>", "\"><img src=x onerror=alert(2)>", "it's & \"quoted\" <td>{{x}}")


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


def test_hostile_slide_names_are_data(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    for i, name in enumerate(HOSTILE):
        write_tiled_tiff(slides / f"{name}.tif", block_image((768, 768), [(32, 32, 736, 736)], seed=i), mpp=0.5)
    run = tmp_path / "run"
    res = run_cli("infer", slides, "-o", run, "--quiet", "--workers", "0")
    assert res.code == 0, res
    with (run / "results.csv").open(newline="", encoding="utf-8") as fh:
        assert sorted(r["slide"] for r in csv.DictReader(fh)) == sorted(HOSTILE)
    for name in HOSTILE:
        fc = json.loads((run / name / "patches.geojson").read_text(encoding="utf-8"))
        assert fc["wsi_screen"]["slide"] == name
        assert json.loads((run / name / "slide.json").read_text())["slide"] == name
    html = (run / "report.html").read_text(encoding="utf-8")
    parser = _Tags()
    parser.feed(html)
    scripts = [t for t, _ in parser.tags if t == "script"]
    assert len(scripts) == 1  # the report's own table sorter, nothing from a name
    assert not [t for t, attrs in parser.tags if t == "img" and any(k.startswith("on") for k, _ in attrs)]
    assert all(src.startswith(("data:image/png;base64,", "data:image/webp;base64,")) for t, attrs in parser.tags
               if t == "img" for k, src in attrs if k == "src" and src is not None)
    for name in HOSTILE:
        assert name not in html  # only ever escaped
