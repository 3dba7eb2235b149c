"""Encoders by name or by file (wsi_screen.models.encoder, .encoders): the registry, the bundled model's
backbone, a tiny timm model written into a local hub cache (offline) and into files, and the one-line error for
an encoder that is missing offline."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from tests.hub import TINY_ARCH, TINY_MEAN, TINY_STD, tiny_state, write_hub_model
from wsi_screen.errors import EncoderNotFoundError, ModelError, UnknownModelError
from wsi_screen.models.encoder import EncoderModule, file_sha256, load_encoder, recorded_mpp
from wsi_screen.models.encoders import ENCODERS, get_encoder_info

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, size=(5, 96, 96, 3), dtype=np.uint8)


def reference_embeddings(images: np.ndarray, state: dict[str, torch.Tensor], mean: tuple[float, ...] = TINY_MEAN,
                         std: tuple[float, ...] = TINY_STD) -> np.ndarray:
    """What the tiny model embeds, computed here with timm directly: normalise, resize to 160, forward."""
    import timm

    model = timm.create_model(TINY_ARCH, pretrained=False, num_classes=0).eval()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")})
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(x, size=(160, 160), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        return model(x).numpy()


def test_registry_knows_the_pathology_encoders() -> None:
    for name in ("uni", "uni2-h", "virchow2", "h-optimus-0", "prov-gigapath", "phikon-v2"):
        info = ENCODERS[name]
        assert info.hub.startswith("hf-hub:") and info.input_size == 224 and info.mpp == 0.5
        assert info.licence and info.dim >= 1024
    assert get_encoder_info("UNI2_h").name == "uni2-h"
    virchow = ENCODERS["virchow2"]
    assert virchow.pooling == "cls+mean" and virchow.dim == 2 * 1280 and virchow.kwargs["reg_tokens"] == 4
    assert ENCODERS["h-optimus-0"].mean == (0.707223, 0.578729, 0.703617)
    assert ENCODERS["phikon-v2"].loader == "transformers" and ENCODERS["uni"].gated
    with pytest.raises(UnknownModelError, match="did you mean virchow2"):
        get_encoder_info("virchov2")


def test_bundled_model_backbone_is_its_penultimate_features() -> None:
    from wsi_screen.models import load_model
    from wsi_screen.models.domain import feature_tap, joined

    encoder = load_encoder("default")
    ident = encoder.identity
    assert (ident.dim, ident.input_size, ident.mpp, ident.kind) == (512, 96, 0.972, "model-folder")
    classifier = load_model(precision="fp32")
    with feature_tap(classifier.module) as captured:
        classifier.predict(IMAGES)
    np.testing.assert_allclose(encoder.embed(IMAGES), joined(captured)["penultimate"].numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ref", ["hf-hub:wsi-screen-test/tiny-vit", "timm/test_vit.tiny_tag"])
def test_hub_model_loads_from_local_cache_offline(offline_hub: Path, ref: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    repo = ref.removeprefix("hf-hub:")
    weights = write_hub_model(offline_hub, repo)
    with caplog.at_level("INFO", logger="wsi_screen.models.encoder"):
        encoder = load_encoder(ref)
    assert "64-dim embeddings; its own input 160 px, no recorded resolution" in caplog.text
    assert "None" not in caplog.text
    ident = encoder.identity
    assert (ident.dim, ident.input_size, ident.mean, ident.std) == (64, 160, TINY_MEAN, TINY_STD)
    assert ident.weights_sha256 == file_sha256(weights) and ident.kind == "hub"
    np.testing.assert_allclose(encoder.embed(IMAGES), reference_embeddings(IMAGES, tiny_state()), rtol=1e-4, atol=1e-4)


def test_local_weights_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = tiny_state(seed=1)
    st, pth = tmp_path / "tiny.safetensors", tmp_path / "tiny.pth"
    save_file(state, str(st))
    torch.save({"state_dict": state}, pth)
    for path in (st, pth):
        encoder = load_encoder(TINY_ARCH, weights=path)
        ident = encoder.identity
        assert ident.weights_sha256 == file_sha256(path) and ident.kind == "file"
        assert ident.input_size == 160 and encoder.dim == 64  # from timm's config of the architecture
        want = reference_embeddings(IMAGES, state, ident.mean, ident.std)
        np.testing.assert_allclose(encoder.embed(IMAGES), want, rtol=1e-4, atol=1e-4)


def test_pickle_with_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(2), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ModelError, match="tensors only") as info:
        load_encoder(TINY_ARCH, weights=path)
    assert "\n" not in str(info.value)


def test_a_whole_pickled_model_is_refused_in_a_line_of_our_own(example_slide: Path, tmp_path: Path) -> None:
    """torch.save(model) used to be refused with the first line of torch's page of advice on how to unpickle it
    ("Weights only load failed. This file can still be loaded, to do so you have two options, ...")."""
    import timm

    path = tmp_path / "whole.pth"
    torch.save(timm.create_model(TINY_ARCH, pretrained=False), path)
    res = run_cli("embed", example_slide, "--encoder", TINY_ARCH, "--weights", path, "--mpp", "0.5", "-o",
                  tmp_path / "emb")
    assert res.code == 1 and res.err_lines == [
        f"wsi-screen: error: {path}: holds a pickled object (timm.models.vision_transformer.VisionTransformer), not "
        "tensors only, and wsi-screen does not unpickle objects; save the model's state dict instead: "
        "safetensors.torch.save_file(model.state_dict(), FILE) or torch.save(model.state_dict(), FILE)"], res


def test_an_empty_or_damaged_safetensors_file_is_called_that(tmp_path: Path) -> None:
    """An empty x.safetensors was 'not a weights file (.safetensors, .pth or .bin)', though it is named one."""
    from safetensors.torch import save_file

    empty = tmp_path / "x.safetensors"
    empty.touch()
    with pytest.raises(ModelError, match=r"x\.safetensors: is empty \(0 bytes\); copy the weights file again$"):
        load_encoder(TINY_ARCH, weights=empty)
    cut = tmp_path / "cut.safetensors"
    save_file(tiny_state(), str(cut))
    cut.write_bytes(cut.read_bytes()[:5])  # a copy stopped inside the header's length
    with pytest.raises(ModelError, match=r"cut\.safetensors: cannot be read as safetensors \(its header is "):
        load_encoder(TINY_ARCH, weights=cut)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ModelError, match=r"notes\.txt: not a weights file \(\.safetensors, \.pth or \.bin\)$"):
        load_encoder(TINY_ARCH, weights=other)
    res = run_cli("train", tmp_path, "--encoder", TINY_ARCH, "--weights", empty, "-o", tmp_path / "m")
    assert res.code == 1 and res.err_lines == [f"wsi-screen: error: {empty}: is empty (0 bytes); copy the weights "
                                               "file again"], res


def test_wrong_architecture_for_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file(tiny_state(), str(path))
    with pytest.raises(ModelError, match="do not fit"):
        load_encoder("resnet10t", weights=path)


def test_deeper_model_of_the_family_is_refused(tmp_path: Path) -> None:
    """Only the classifier's tensors may be left over: resnet34's weights given as resnet18's are refused (its
    extra blocks are not a classifier), resnet18's own, fc included, load."""
    import timm
    from safetensors.torch import save_file

    for arch in ("resnet18", "resnet34"):
        torch.manual_seed(0)
        state = timm.create_model(arch, pretrained=False, num_classes=10).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / f"{arch}.safetensors"))
    encoder = load_encoder("resnet18", weights=tmp_path / "resnet18.safetensors")
    assert encoder.dim == 512
    with pytest.raises(ModelError, match=r"not in the architecture: layer1\.2\.bn1\.bias") as info:
        load_encoder("resnet18", weights=tmp_path / "resnet34.safetensors")
    assert "fc." not in str(info.value) and "\n" not in str(info.value)


def test_cls_plus_mean_pooling_skips_register_tokens() -> None:
    import timm

    backbone = timm.create_model(TINY_ARCH, pretrained=False, num_classes=0, reg_tokens=2, global_pool="").eval()
    module = EncoderModule(backbone, pooling="cls+mean", input_size=160, prefix_tokens=backbone.num_prefix_tokens)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        tokens = backbone(x)
        out = module(x)
    assert backbone.num_prefix_tokens == 3 and out.shape == (2, 128)
    torch.testing.assert_close(out, torch.cat([tokens[:, 0], tokens[:, 3:].mean(1)], dim=1))


def test_missing_offline_is_one_line(offline_hub: Path, example_slide: Path, patches_dir: Path,
                                     tmp_path: Path) -> None:
    res = run_cli("embed", example_slide, "--encoder", "hf-hub:nobody/absent", "-o", tmp_path / "emb")
    assert res.code == 1 and len(res.err_lines) == 1, res
    line = res.err_lines[0]
    assert "nobody/absent" in line and str(offline_hub / "hub") in line
    assert "huggingface-cli download nobody/absent" in line and "--weights=FILE" in line
    res = run_cli("train", patches_dir / "pcam", "--encoder", "uni", "--head", "linear", "-o", tmp_path / "m")
    assert res.code == 1 and len(res.err_lines) == 1, res
    assert "MahmoodLab/uni" in res.err_lines[0] and "--encoder=uni --weights=FILE" in res.err_lines[0]
    with pytest.raises(EncoderNotFoundError):
        load_encoder("virchow2")


def test_a_head_models_missing_hub_encoder_gives_advice_that_fits_it(offline_hub: Path, tmp_path: Path) -> None:
    """predict/evaluate/infer take a head model, not `--encoder`/`--weights`: the advice for its hub encoder missing
    offline used to end "or pass a local file: --encoder=ARCH --weights=FILE", options those commands lack."""
    import shutil

    from PIL import Image

    from wsi_screen.models import ModelSpec, save_model
    from wsi_screen.models.head import build_head, head_record

    weights = write_hub_model(offline_hub, "wsi-screen-test/tiny-vit")
    identity = load_encoder("hf-hub:wsi-screen-test/tiny-vit").identity
    record = head_record("linear", identity.dim)
    spec = ModelSpec(arch="tiny-vit+linear", classes=["normal", "tumour"], input_size=96, positive_class="tumour",
                     mpp=0.972, mean=identity.mean, std=identity.std, threshold=0.5, encoder=identity.to_dict(),
                     head=record)
    save_model(tmp_path / "m", build_head(record, 2), spec)
    Image.fromarray(IMAGES[0]).save(tmp_path / "patch.png")
    assert run_cli("predict", tmp_path / "patch.png", "--model", tmp_path / "m").code == 0
    cache = weights.parents[2]  # hub/models--wsi-screen-test--tiny-vit
    shutil.rmtree(cache)
    res = run_cli("predict", tmp_path / "patch.png", "--model", tmp_path / "m")
    assert res.code == 1 and len(res.err_lines) == 1, res
    line = res.err_lines[0]
    assert "is not in the Hugging Face cache" in line and "is offline (HF_HUB_OFFLINE)" in line, line
    assert line.endswith("get it where there is network with `huggingface-cli download wsi-screen-test/tiny-vit` "
                         f"(same HF_HOME), or copy its cache folder {cache} from a machine that has it"), line
    assert "--weights" not in line and "--encoder" not in line


def test_unreachable_hub_is_one_line() -> None:
    """Online (HF_HUB_OFFLINE unset) but the hub unreachable: one line saying it could not be reached, not
    huggingface_hub's retry lines. The `embed` command runs in the background from the start of the session
    (tests/conftest.py, ``BACKGROUND``): it waits ~25 s through huggingface_hub's retries."""
    from tests.conftest import background

    code, output = background("tests/models/test_encoder.py::test_unreachable_hub_is_one_line").result(timeout=300)
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, output
    assert "the hub could not be reached (no network?)" in lines[0] and "huggingface-cli download" in lines[0]


def test_unknown_references() -> None:
    with pytest.raises(ModelError, match="architecture without weights"):
        load_encoder("resnet50")
    with pytest.raises(UnknownModelError, match="unknown encoder"):
        load_encoder("not-an-encoder")
    with pytest.raises(ModelError, match="no such model folder"):
        load_encoder("./missing/model")


def test_cli_words_for_references(tmp_path: Path, example_slide: Path) -> None:
    """The CLI points at its own commands, not at Python names; a weights file goes with an architecture name."""
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file(tiny_state(), str(path))
    out = tmp_path / "emb"
    res = run_cli("embed", example_slide, "--encoder", "hf-hub:org/name", "--weights", path, "--mpp", "0.5", "-o", out)
    assert res.code == 1 and len(res.err_lines) == 1, res
    assert "--weights goes with a timm architecture name" in res.err and "unknown architecture" not in res.err
    # a model folder (the bundled one by name, or any) holds its own weights: the same words, not "unknown
    # architecture 'default'"
    from wsi_screen.models import default_model_dir

    for ref in ("default", str(default_model_dir())):
        res = run_cli("train", tmp_path, "--encoder", ref, "--weights", path, "-o", tmp_path / "m")
        assert res.code == 1 and res.err_lines == [
            f"wsi-screen: error: {ref}: --weights goes with a timm architecture name (e.g. resnet50), not a model "
            "folder; name the architecture the file is for, or leave the file out to load the folder's own"], res
    assert not (tmp_path / "m").exists()
    res = run_cli("embed", example_slide, "--encoder", "zzqqxx", "--weights", path, "--mpp", "0.5", "-o", out)
    assert res.code == 1 and "unknown architecture 'zzqqxx'; `wsi-screen models` lists them" in res.err, res
    res = run_cli("embed", example_slide, "--encoder", "resnet50", "--mpp", "0.5", "-o", out)
    assert res.code == 1 and "(`wsi-screen models --encoders` lists them)" in res.err, res
    assert "wsi_screen." not in res.err


def test_models_lists_encoders() -> None:
    res = run_cli("models", "--encoders")
    assert res.code == 0, res
    lines = res.out.splitlines()
    assert lines[0].split() == ["encoder", "hub", "dim", "size", "mpp", "licence", "gated"]
    virchow = next(line for line in lines if line.startswith("virchow2"))
    assert virchow.split()[:5] == ["virchow2", "hf-hub:paige-ai/Virchow2", "2560", "224", "0.5"]
    assert virchow.split()[-1] == "yes" and len(lines) == 1 + len(ENCODERS)
    # the note under the list says which commands' option it is about (it read as advice for `models` itself)
    assert res.err_lines == ["train --encoder and embed --encoder also take 'default' or a model folder (its "
                             "backbone), hf-hub:ORG/NAME, timm/NAME.TAG, or an architecture with --weights FILE "
                             "(docs/encoders.md)."], res
    res = run_cli("models", "--encoders", "UNI*")  # a glob, as for architectures
    assert res.code == 0 and [line.split()[0] for line in res.out.splitlines()[1:]] == ["uni", "uni2-h"], res
    res = run_cli("models", "--encoders", "virchov*")
    assert res.code == 1 and len(res.err_lines) == 1, res  # a glob matching none, as for architectures
    assert "no encoder matches the pattern 'virchov*'; did you mean virchow2" in res.err, res
    res = run_cli("models", "--encoders", "virchov")  # a name: unknown, with the close ones
    assert res.code == 1 and "unknown encoder 'virchov'; did you mean virchow" in res.err, res


def test_an_encoder_recording_no_resolution_is_refused_before_its_weights_are_read(
        example_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_hub: Path) -> None:
    """embed with an architecture and a weights file (a foundation encoder's are GBs) but no --mpp built the network
    and read the file before refusing for want of a resolution; the reference alone says it records none."""
    from safetensors.torch import save_file

    from wsi_screen.models import encoder as encoder_module

    path = tmp_path / "tiny.safetensors"
    save_file(tiny_state(), str(path))
    read: list[Path] = []
    real = encoder_module.read_state
    monkeypatch.setattr(encoder_module, "read_state", lambda p: read.append(p) or real(p))
    res = run_cli("embed", example_slide, "--encoder", TINY_ARCH, "--weights", path, "-o", tmp_path / "emb")
    assert res.code == 1 and res.err_lines == [
        f"wsi-screen: error: encoder {TINY_ARCH} records no patch resolution; pass --mpp"], res
    assert read == [] and not (tmp_path / "emb").exists()
    # one rule: what the reference records is the loaded encoder's mpp; a reference that cannot load is refused alike
    assert recorded_mpp(TINY_ARCH, weights=path) is None is load_encoder(TINY_ARCH, weights=path).identity.mpp
    assert read == [path]
    assert recorded_mpp("default") == 0.972 == load_encoder("default").identity.mpp
    assert recorded_mpp("uni") == ENCODERS["uni"].mpp and ENCODERS["uni"].mpp is not None
    # a hub reference records none; one absent offline says it is missing (as loading it would) before any mpp word
    with pytest.raises(EncoderNotFoundError, match="org/name is not in the Hugging Face cache"):
        recorded_mpp("hf-hub:org/name")
    hub_weights = write_hub_model(offline_hub, "org/name")
    assert recorded_mpp("hf-hub:org/name") is None
    res = run_cli("embed", example_slide, "--encoder", "hf-hub:org/name", "-o", tmp_path / "emb")
    assert res.code == 1 and res.err_lines == [
        "wsi-screen: error: encoder hf-hub:org/name records no patch resolution; pass --mpp"], res
    assert hub_weights.is_file() and not (tmp_path / "emb").exists()
    with pytest.raises(UnknownModelError, match="unknown encoder 'zzqqxx'"):
        recorded_mpp("zzqqxx")
    with pytest.raises(ModelError, match="goes with a timm architecture name"):
        recorded_mpp("default", weights=path)
