"""The Colab tour executes top to bottom, offline, and shows its pictures."""

from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tour_notebook_executes(tmp_path, monkeypatch):
    """Every cell, with a 4-step training run instead of 200 (SASA_TOUR_STEPS)."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("SASA_TOUR_STEPS", "4")
    notebook = nbformat.read(ROOT / "notebooks" / "tour.ipynb", as_version=4)
    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 3  # the borders, the shifted image, the attention maps
    text = "".join(o.get("text", "") for o in outputs)
    assert "test top-1" in text and "after 4 steps" in text
    assert "ResNet-50 full_attention" in text
