"""Tables a user gives (slide labels, per-slide mpp): one reader, one-line errors."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


def read_table(path: Path, columns: Sequence[str], option: str) -> list[dict[str, str]]:
    """Rows of a user's CSV file given to ``option``, which must have ``columns`` (one-line errors)."""
    from wsi_screen.errors import ConfigError

    try:
        with Path(path).open(encoding="utf-8-sig", newline="") as fh:  # Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(fh)
            if not reader.fieldnames:  # no header line: None, or [] for a blank first line
                what = "is empty" if reader.fieldnames is None else "starts with a blank line"
                raise ConfigError(f"{path}: {option} {what}; it needs a header line naming the columns "
                                  f"{' and '.join(repr(c) for c in columns)}, then a row per slide")
            if not set(columns) <= set(reader.fieldnames):
                wanted = " and ".join(repr(c) for c in columns)
                raise ConfigError(f"{path}: {option} needs columns {wanted}, found {reader.fieldnames}")
            return list(reader)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason})") from exc


def first_rows(keys: Sequence[tuple[int, str, object]], path: Path, what: str) -> dict[str, tuple[int, object]]:
    """``{key: (line, value)}`` of ``(line, key, value)`` rows; a key given twice with different values is an error
    naming both lines (the same value twice is harmless)."""
    from wsi_screen.errors import ConfigError

    seen: dict[str, tuple[int, object]] = {}
    for line, key, value in keys:
        if key in seen and seen[key][1] != value:
            raise ConfigError(f"{path}:{line}: {key!r} is given {what} {value!r} here and {seen[key][1]!r} on line "
                              f"{seen[key][0]}; keep one")
        seen.setdefault(key, (line, value))
    return seen


def few(names: Sequence[str], shown: int = 5) -> str:
    """``names`` for a one-line message: the first ``shown``, then how many more."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")
