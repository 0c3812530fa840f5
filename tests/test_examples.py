"""The examples run end to end on a tiny configuration (CPU here, the default device elsewhere):
each exits 0 and prints its summary table, so an API change that breaks one fails here."""
import importlib.util
import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _run(script, *args, timeout=600):
    out = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], capture_output=True, text=True,
                         timeout=timeout, cwd=os.path.dirname(EXAMPLES))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def test_moe_language_model_small():
    text = _run("moe_language_model.py", "--small", "--steps", "5")
    table = text[text.index("\nFFN"):].splitlines()[2:]  # the summary after the progress bars
    rows = [line.split() for line in table if line.strip()]
    assert [r[0] for r in rows] == ["pit", "ragged", "dense"]
    for _, loss, tokens_per_s in rows:
        assert 0 < float(loss) < 10 and float(tokens_per_s) > 0  # 5 steps: 2 timed after the first 3


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn (pip install '.[test]' or '.[examples]')")
def test_sparse_training_mlp_short():
    text = _run("sparse_training_mlp.py", "--steps", "20")
    rows = [line for line in text.splitlines() if line.startswith(("dense ", "dense_sparse, density"))]
    assert len(rows) == 2
    for row in rows:
        accuracy, step_ms = map(float, row.split()[-2:])
        assert 0 <= accuracy <= 1 and step_ms > 0
