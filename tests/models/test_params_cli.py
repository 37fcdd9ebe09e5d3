"""`mona-dist params`: the numbers users quote, and one-line errors."""

import json
import subprocess
import sys

import pytest

from mona_dist.cli import main


@pytest.mark.parametrize("method,trainable", [("mona", 5_267_712), ("lora", 4_620_288)])
def test_params_json_for_swin_large(method, trainable, capsys):
    assert main(["params", "--backbone", "swin_large_patch4_window7_224", "--method", method, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["trainable"] == trainable
    assert row["total"] > 195_000_000
    assert row["trainable_pct"] == pytest.approx(100 * trainable / row["total"], abs=1e-3)


def test_bad_backbone_is_one_line_naming_the_valid_ones():
    proc = subprocess.run(
        [sys.executable, "-m", "mona_dist.cli", "params", "--backbone", "swin_xl", "--method", "mona"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown backbone 'swin_xl'; valid:" in lines[0]
    assert "any timm SwinTransformer (v1) or VisionTransformer" in lines[0]
