"""The embedded demo model: a small LlamaGen trained here on procedurally drawn shapes, so a
fresh install serves recognisable pictures with no download. `DEMO_MODEL` is its directory."""

from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parent / "model"
