"""The Colab notebook, executed end to end on CPU with a small document, in a kernel running this Python.

It runs in a fresh temporary directory (its archive, haystack and receipts land there, nothing in the repository),
with parameters injected after its `parameters` cell as papermill does: a ~2,000-token document and a 256-token hot
window, so the number still has to come back from the cold tier.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from infinitekv.needles import passkey
from infinitekv.receipts import verify_receipt

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]

NOTEBOOK = Path(__file__).resolve().parents[1] / "colab" / "infinitekv.ipynb"
SMALL = {"DOC_TOKENS": 2000, "DEPTH": 0.5, "SEED": 0, "HOT_WINDOW": 256, "MAX_NEW_TOKENS": 16,
         "KL_LENGTHS": (768,), "KL_POSITIONS": 8, "DEVICE": "cpu"}


def with_parameters(notebook, values: dict):
    """Insert a cell assigning `values` right after the cell tagged `parameters` (papermill's convention)."""
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return notebook


def kernel_for_this_python(root: Path) -> str:
    """A kernelspec whose argv is sys.executable, so the notebook imports the infinitekv this test imports."""
    from ipykernel.kernelspec import install

    install(kernel_name="ikv-test", display_name="ikv test", prefix=str(root))
    return "ikv-test"


def text_of(cell) -> str:
    """What the cell printed to stdout (progress bars go to stderr)."""
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def tagged(notebook, tag: str):
    return next(cell for cell in notebook.cells if tag in cell.metadata.get("tags", []))


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook after running every cell in a scratch directory, and that directory."""
    scratch = tmp_path_factory.mktemp("notebook")
    kernels = tmp_path_factory.mktemp("kernels")
    patch = pytest.MonkeyPatch()
    patch.setenv("JUPYTER_PATH", str(kernels / "share" / "jupyter"))
    patch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOK.parents[1]), os.environ.get("PYTHONPATH")])))
    try:
        notebook = with_parameters(nbformat.read(NOTEBOOK, as_version=4), SMALL)
        client = NotebookClient(notebook, kernel_name=kernel_for_this_python(kernels), timeout=1200,
                                resources={"metadata": {"path": str(scratch)}})
        try:
            client.execute()
        finally:  # kept beside the outputs, to read when a test fails
            nbformat.write(notebook, scratch / "executed.ipynb")
    finally:
        patch.undo()
    return notebook, scratch


def test_notebook_runs_in_its_own_directory_with_this_python(executed):
    notebook, scratch = executed
    assert "already installed" in text_of(tagged(notebook, "install"))  # no pip install inside the test
    assert (scratch / "mem").is_dir() and (scratch / "haystack.txt").is_file()
    assert "loaded on cpu" in text_of(tagged(notebook, "load"))


def test_notebook_answers_from_the_cold_tier_and_not_without_it(executed, smollm2):
    notebook, _ = executed
    hidden = passkey(smollm2.tokenizer, SMALL["DOC_TOKENS"], SMALL["DEPTH"], seed=SMALL["SEED"]).answer
    answer = text_of(tagged(notebook, "answer"))
    first_line = answer.splitlines()[0]
    assert first_line.startswith("answer:") and hidden in first_line, answer
    assert "beyond the 256-token hot window" in answer  # the number had to come back from the archive
    ablation = text_of(tagged(notebook, "ablation"))
    first_line = ablation.splitlines()[0]
    assert first_line.startswith("answer with retrieval off:") and hidden not in first_line, ablation


def test_notebook_shows_identical_weight_hashes(executed, smollm2):
    notebook, _ = executed
    lines = text_of(tagged(notebook, "weights-after")).splitlines()
    before, after = (line.split(":")[-1].strip() for line in lines[:2])
    assert before == after == smollm2.weights_sha256
    assert lines[2] == "identical"


def test_notebook_measures_quality_and_plots_it(executed):
    notebook, scratch = executed
    table = text_of(tagged(notebook, "quality")).splitlines()
    assert table[1].split()[0] == "768"
    median_kl, top1 = float(table[1].split()[1]), float(table[1].split()[3])
    receipt = json.loads((scratch / "receipts" / "notebook-quality.json").read_text())
    row = receipt["outputs"]["per_length"]["768"]
    assert round(row["median_kl"], 4) == median_kl and round(row["top1"], 3) == top1
    assert 0 <= median_kl < 1 and 0 < top1 <= 1  # a real comparison, not a broken model
    for tag in ("quality-plot", "memory"):
        assert any("image/png" in output.get("data", {}) for output in tagged(notebook, tag).outputs), tag


def test_notebook_resumes_without_rereading_and_its_receipts_verify(executed):
    notebook, scratch = executed
    resume = json.loads((scratch / "receipts" / "notebook-resume.json").read_text())
    assert resume["metrics"]["resumed_tokens"]["value"] > SMALL["DOC_TOKENS"]
    assert resume["metrics"]["prefill_tokens"]["value"] < 40  # only the follow-up question was read
    assert "continued a" in text_of(tagged(notebook, "resume"))
    verify = text_of(tagged(notebook, "verify"))
    assert "integrity  ok" in verify
    written = sorted((scratch / "receipts").glob("*.json"))
    assert [p.name for p in written] == ["notebook-quality.json", "notebook-resume.json"]
    for path in written:
        assert f"OK  receipts/{path.name}" in verify and verify_receipt(path).ok
    assert "FAIL" not in verify
