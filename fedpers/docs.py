"""``python -m fedpers.docs``: regenerate docs/config.md from the config dataclasses.

A test fails when the file is out of date, so every config field stays documented."""

from __future__ import annotations

import sys
from pathlib import Path

from fedpers.config import fields_markdown

CONFIG_DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def main(argv: list[str] | None = None) -> int:
    CONFIG_DOC.parent.mkdir(exist_ok=True)
    CONFIG_DOC.write_text(fields_markdown())
    print(f"wrote {CONFIG_DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
