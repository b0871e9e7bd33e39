"""What `atelier import-kohya` has read so far: config values, the options it could not map, notes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atelier.tools.kohya_coverage import NOT_HERE


@dataclass
class Imported:
    values: dict[str, Any] = field(default_factory=dict)  # dotted key -> value
    unmapped: list[tuple[str, Any, str]] = field(default_factory=list)  # sd-scripts name, value, why
    notes: list[str] = field(default_factory=list)

    def set(self, key: str, value: Any) -> None:
        self.values[key] = value

    def skip(self, name: str, value: Any, why: str | None = None) -> None:
        self.unmapped.append((name, value, why or NOT_HERE.get(name) or "no Atelier key"))


def source_path(value: str, source: Path) -> Path:
    """A path from the source file: relative ones are relative to the file's folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (source.parent / path).resolve()
