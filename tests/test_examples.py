"""The examples run as a reader would run them, on the built-in tiny model, and write their PNGs."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name,size", [("txt2img", (128, 128)), ("img2img", (256, 128)),
                                       ("step_latents", (8 * 128, 128))])
def test_example_runs(tmp_path, name, size):
    out = tmp_path / f"{name}.png"
    r = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "-o", str(out)], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(out).size == size
