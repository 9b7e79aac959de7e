"""Running a snippet in a fresh Python from the repository root, for the tests that need a
process of their own (another environment: XLA flags, a kernel cache, compiler flags)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **env: str) -> str:
    """Runs ``code`` (dedented) in a fresh Python with extra environment variables, from the
    repository root; asserts it exits 0 and returns its stdout. ``XLA_FLAGS`` is added to the
    suite's own flags, not put in their place."""
    if "XLA_FLAGS" in env:
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {env['XLA_FLAGS']}"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
