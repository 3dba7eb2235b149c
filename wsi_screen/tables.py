"""Tables a user gives on the command line (``--labels``, ``--slide-mpp-csv``): one reader, one-line errors."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


def read_table(path: Path, columns: Sequence[str], option: str) -> list[dict[str, str]]:
    """Rows of a user's CSV file given to ``option``, which must have ``columns`` (one-line errors)."""
    from wsi_screen.errors import ConfigError

    try:
        with Path(path).open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not set(columns) <= set(reader.fieldnames):
                wanted = " and ".join(repr(c) for c in columns)
                raise ConfigError(f"{path}: {option} needs columns {wanted}, found {reader.fieldnames}")
            return list(reader)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason})") from exc
