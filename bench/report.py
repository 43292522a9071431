"""Shared benchmark plumbing: machine description and docs/BENCHMARKS.md sections."""

from __future__ import annotations

import os
import platform
import re
import sys
from datetime import UTC, datetime
from pathlib import Path


def _vllm_version() -> str:
    try:  # the engine layer needs pydantic and more, which a bare GPU box may lack
        from engine.vllm_api import vllm_version
    except ImportError:
        return "not installed"
    return vllm_version()


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": cpu, "cores": str(len(os.sched_getaffinity(0))), "gpu": gpu,
        "python": platform.python_version(), "torch": torch.__version__,
        "vllm": _vllm_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def command_line() -> str:
    return "llamagen " + " ".join(sys.argv[1:]) if sys.argv else "llamagen"


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the `<!-- name:begin -->...<!-- name:end -->` block of a markdown
    file, so each benchmark owns its section of docs/BENCHMARKS.md."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) \
        else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
