"""Model card: what a model is for, what it was trained and validated on, and where it must not be trusted.

``card.json`` sits beside ``config.json`` (the contract a program needs) and is written for people.
``wsi-screen train`` drafts one from what it knows (architecture, classes, resolution, data, validation
metrics with a 95 % bootstrap CI, operating point) and marks what only the user can say (tissue, stain,
task, licence of the data) with :data:`TO_COMPLETE`. A head model's card names its encoder, with the licence and
gating of a registry encoder; another encoder's licence is the user's to state. the ``models`` command prints it;
the report and the notebook show its two-line :func:`summary`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wsi_screen.models.spec import ModelSpec

CARD_NAME = "card.json"
TO_COMPLETE = "TO COMPLETE"
RESEARCH_USE = "Research use only, not for diagnosis."


def draft(spec: ModelSpec, *, auc_ci: tuple[float, float] | None = None) -> dict[str, Any]:
    """A card filled from ``spec`` (and the validation AUC's CI); user fields marked :data:`TO_COMPLETE`."""
    m = spec.metrics or {}
    data = spec.data or {}
    mag = f"~{10 / spec.mpp:.0f}x" if spec.mpp else TO_COMPLETE  # 10x ~ 1 um/px
    cv = m.get("cross_validation") if isinstance(m.get("cross_validation"), dict) else None
    return {
        "name": TO_COMPLETE,
        "intended_use": {
            "task": TO_COMPLETE, "tissue": TO_COMPLETE, "stain": TO_COMPLETE,
            "magnification": mag, "mpp": spec.mpp, "patch_size_px": spec.input_size,
            "classes": list(spec.classes), "positive_class": spec.positive_class,
        },
        "architecture": spec.arch,
        **({"encoder": encoder_section(spec.encoder)} if spec.encoder else {}),
        "training_data": {
            "dataset": data.get("dataset", TO_COMPLETE), "split": data.get("split", ""),
            "n_train": data.get("n_train"), "n_valid": data.get("n_valid"),
            "class_counts": data.get("train_class_counts", {}), "licence": TO_COMPLETE,
            **({"cross_validation": _folds_note(int(cv.get("folds") or 0), data.get("n_train"))} if cv else {}),
        },
        "validation": {
            "data": (f"pooled out-of-fold predictions of {cv.get('folds')}-fold cross-validation "
                     "(every image scored by the fold model that did not train on it; every choice was made on them)"
                     if cv else "the validation split above (every choice was made on it)"), "n": m.get("n"),
            "auc": m.get("auc"), "auc_ci95": list(auc_ci) if auc_ci else None,
            "sensitivity": m.get("sensitivity"), "specificity": m.get("specificity"),
        },
        "operating_point": {"threshold": spec.threshold, "rule": spec.threshold_rule},
        "limitations": [TO_COMPLETE + ": tissues, stains, scanners and magnifications it was not trained on",
                        "No domain model (a head on an encoder): slides are not checked for being out of domain."
                        if spec.encoder else "Patches far from the training data are flagged by the domain distance "
                        "(domain.json); their scores are unreliable."],
        "research_use": RESEARCH_USE,
    }


def _folds_note(k: int, n: Any) -> str:
    """What ``n_train`` and ``n_valid`` mean on a cross-validated model's card (both count the whole pool)."""
    return (f"{k}-fold: n_train and n_valid both count the {n} pooled images; each trained {k - 1} of the {k} fold "
            "models and was validated, out of fold, by the other")


def encoder_section(record: dict[str, Any]) -> dict[str, Any]:
    """What a head model's card says of its encoder (``ModelSpec.encoder``): name, reference, weights and their
    sha256, and the licence and gating of a registry encoder (the registry's, else the record's); for any other
    encoder the licence is :data:`TO_COMPLETE`, the user's to state."""
    from wsi_screen.models.encoders import find_encoder

    info = find_encoder(str(record.get("name", ""))) if record.get("kind") == "registry" else None
    section: dict[str, Any] = {
        "name": record.get("name"), "ref": record.get("ref"), "weights": record.get("weights"),
        "weights_sha256": record.get("weights_sha256"),
    }
    if info is not None:
        section.update(licence=info.licence, gated=info.gated,
                       licence_note="the encoder's weights come under their own licence; the model may not be used "
                                    "beyond its terms")
    else:
        section.update(licence=TO_COMPLETE,
                       licence_note="not a registry encoder: its weights' licence is yours to state")
    return section


def write_card(model_dir: str | Path, spec: ModelSpec, *, auc_ci: tuple[float, float] | None = None) -> Path:
    """Write a drafted ``card.json`` into ``model_dir``."""
    from wsi_screen._safe_write import atomic_write_text

    path = Path(model_dir) / CARD_NAME
    atomic_write_text(path, json.dumps(draft(spec, auc_ci=auc_ci), indent=2, allow_nan=False, default=str) + "\n")
    return path


def read_card(model_dir: str | Path) -> dict[str, Any] | None:
    """The model folder's card, or None (models trained before cards existed)."""
    path = Path(model_dir) / CARD_NAME
    if not path.exists():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


#: how each slide rule treats scattered false-positive patches: the limitation a card states for the rule the model
#: folder actually uses (``wsi-screen calibrate`` may choose another than the one its card was written for)
RULE_NOTES = {
    "region": "a slide is called on a contiguous region of likely tumour, so scattered false-positive patches "
              "alone do not call it",
    "smoothmax": "a slide is called on the highest mean over a patch neighbourhood, so scattered false-positive "
                 "patches weigh less than a cluster",
    "max": "a single false-positive patch anywhere can call a slide positive, and larger slides have more of them",
    "topk": "a few false-positive patches anywhere can call a slide positive, and larger slides have more of them",
    "mean": "every patch is pooled wherever it lies: scattered false positives raise the score, and a small focus is "
            "diluted on a large slide",
    "fraction": "every patch is pooled wherever it lies: scattered false positives raise the score, and a small "
                "focus is diluted on a large slide",
}


def with_slide_rule(card: dict[str, Any], rule: str) -> dict[str, Any]:
    """``card`` with a last limitation saying how the model folder's slide ``rule`` (its ``slide_rule.json``, else
    the fallback) treats scattered false-positive patches (:data:`RULE_NOTES`), as the models command prints it."""
    note = RULE_NOTES.get(rule)
    if note is None:
        return card
    return {**card, "limitations": [*(card.get("limitations") or []), f"Slide rule {rule}: {note}."]}


def _known(value: Any) -> bool:
    return value not in (None, "", TO_COMPLETE)


def _pct(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "?"


def summary(card: dict[str, Any], *, domain_model: bool = True) -> list[str]:
    """Two lines: what the model is for, how well it did and its slide rule (``operating_point.slide_rule``); the
    research-use note and its domain (``domain_model``: whether slides unlike the training data are flagged; a head
    on an encoder has no domain model)."""
    use = card.get("intended_use", {})
    val = card.get("validation", {})
    ci = val.get("auc_ci95")
    auc = f"patch AUC {_pct(val.get('auc'))}" + (f" ({_pct(ci[0])}-{_pct(ci[1])})" if ci else "")
    mpp = use.get("mpp")
    name = card["name"] if _known(card.get("name")) else "Model"
    if _known(use.get("task")):
        head = f"{name}: {use['task']}" + (f" in {use['tissue']}" if _known(use.get("tissue")) else "")
    else:  # a drafted card nobody completed: say so rather than repeat its placeholders
        head = f"{name} (its card is a draft: task and tissue to complete)"
    first = (head + "".join(f", {use[k]}" for k in ("stain", "magnification") if _known(use.get(k)))
             + (f" ({mpp:g} um/px)" if isinstance(mpp, (int, float)) else "") + f"; {auc}.")
    rule = (card.get("operating_point") or {}).get("slide_rule")
    if rule:
        first += f" Slide call: {rule}."
    data = card.get("training_data", {}).get("dataset")
    data = data if _known(data) else "data the card does not name"
    second = (f"{card.get('research_use', RESEARCH_USE)} Trained on {data}; "
              + ("slides unlike that data are flagged out of domain." if domain_model else
                 "it has no domain model, so slides unlike that data are not flagged."))
    return [first, second]


def render(card: dict[str, Any]) -> str:
    """The card as indented text (what the ``models`` command prints); fields left to complete are marked. Figures
    show 4 significant digits (``auc: 0.8374``, not the 0.8373999999999999 card.json holds), as train and evaluate
    print them."""
    lines: list[str] = []

    def shown(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    def walk(value: Any, indent: int, key: str) -> None:
        pad = "  " * indent
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            for k, v in value.items():
                walk(v, indent + 1, str(k))
        elif isinstance(value, list) and value and not all(isinstance(v, (int, float)) for v in value):
            lines.append(f"{pad}{key}:")
            lines.extend(f"{pad}  - {shown(v)}" for v in value)
        else:
            text = ", ".join(map(shown, value)) if isinstance(value, list) else shown(value)
            mark = "   <-- complete this" if value == TO_COMPLETE else ""
            lines.append(f"{pad}{key}: {text}{mark}")

    for k, v in card.items():
        walk(v, 0, k)
    return "\n".join(lines)
