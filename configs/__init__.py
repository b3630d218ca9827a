"""The experiment configs patchscope ships (YAML), installed with it as package data."""
from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def bundled_config(name: str) -> Path:
    """The path of a shipped config, e.g. `bundled_config("demo.yaml")`."""
    return FOLDER / name
