"""``wsi-screen models``: a pattern that matches nothing, and options that do not go together."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cli


def test_a_pattern_that_matches_nothing_says_so() -> None:
    res = run_cli("models", "zzz*")
    assert res.code == 1 and res.err_lines == [
        "wsi-screen: error: no architecture matches the pattern 'zzz*'; `wsi-screen models --all` lists them"], res
    res = run_cli("models", "resnet5o*")
    assert res.code == 1 and len(res.err_lines) == 1 and res.err.startswith(
        "wsi-screen: error: no architecture matches the pattern 'resnet5o*'; did you mean resnet50"), res
    # a name (no glob) is still an unknown architecture, with the closest names
    res = run_cli("models", "resnet5")
    assert res.code == 1 and "unknown architecture 'resnet5'; did you mean" in res.err, res
    res = run_cli("models", "resnet5?")
    assert res.code == 0 and "resnet50 " in res.out, res


def test_card_with_encoders_is_a_usage_error() -> None:
    res = run_cli("models", "--card", "--encoders")
    assert res.code == 2 and res.out == "", res
    assert res.err_lines == ["wsi-screen: error: --card prints a model's card and --encoders lists encoders: give "
                             "one of them (see wsi-screen models --help)"], res


def test_all_with_encoders_or_card_is_a_usage_error() -> None:
    """--all lists timm's architectures; it used to be ignored silently beside --encoders and --card."""
    for other, meaning in (("--encoders", "--encoders lists every known encoder without it"),
                           ("--card", "--card prints one model's card")):
        res = run_cli("models", other, "--all")
        assert res.code == 2 and res.out == "", res
        assert res.err_lines == [f"wsi-screen: error: --all lists all of timm's architectures; {meaning}: drop "
                                 "--all (see wsi-screen models --help)"], res


def test_card_of_a_missing_folder_says_there_is_no_such_folder(tmp_path: Path) -> None:
    res = run_cli("models", "--card", tmp_path / "nope")
    assert res.code == 1 and res.err_lines == [f"wsi-screen: error: {tmp_path / 'nope'}: no such model folder"], res
    res = run_cli("models", "--card", tmp_path)  # a folder, but not a model's
    assert res.code == 1 and res.err_lines == [
        f"wsi-screen: error: {tmp_path}: no config.json; not a wsi-screen model folder (an interrupted training run "
        "leaves none)"], res


def test_the_cards_limitations_follow_the_folders_slide_rule(tmp_path: Path) -> None:
    """After `calibrate` chose mean, `models --card` still said the slide rule required a contiguous region."""
    import json
    import shutil

    from wsi_screen.models import default_model_dir
    from wsi_screen.models.card import RULE_NOTES, read_card, with_slide_rule

    folder = tmp_path / "calibrated"
    folder.mkdir()
    for name in ("config.json", "card.json", "slide_rule.json"):
        shutil.copy(default_model_dir() / name, folder / name)
    doc = json.loads((folder / "slide_rule.json").read_text())
    assert doc["rule"] == "region"
    res = run_cli("models", "--card", folder)
    assert res.code == 0 and f"  - Slide rule region: {RULE_NOTES['region']}." in res.out.splitlines(), res
    (folder / "slide_rule.json").write_text(json.dumps({**doc, "rule": "mean", "slide_threshold": 0.26}))
    res = run_cli("models", "--card", folder)
    assert res.code == 0, res
    assert res.out.splitlines()[-2] == ("  - Slide rule mean: every patch is pooled wherever it lies: scattered false "
                                 "positives raise the score, and a small focus is diluted on a large slide.")
    assert "contiguous region" not in res.out and "compensates" not in res.out
    # without slide_rule.json, infer uses the fallback rule (top-k), and the card says so
    (folder / "slide_rule.json").unlink()
    assert f"  - Slide rule topk: {RULE_NOTES['topk']}." in run_cli("models", "--card", folder).out.splitlines()
    # the card on disk is left as written
    card = read_card(folder)
    assert card is not None and with_slide_rule(card, "max")["limitations"][:-1] == card["limitations"]
