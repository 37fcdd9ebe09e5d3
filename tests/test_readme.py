"""README.md's commands run as written.

A command block is runnable when the line `<!-- runnable -->` comes right before its ```bash fence. The slow test
runs each such block with bash (`set -euo pipefail`) in a fresh directory that links `configs/`, `launch/` and
`slurm/` from this checkout, so the relative paths resolve as in a clone and everything the block writes (data/,
runs/) stays out of the checkout. `mona-dist` is this interpreter's console script (or, where none is installed,
a shim to `python -m mona_dist.cli`), importing this checkout's package; CUDA is hidden. No command is changed
or mocked: the blocks are written to be tiny (the CPU configs, a few synthetic images, a few steps).
`make demo` is not marked runnable: it trains 120 steps on 2 ranks and benchmarks six methods (minutes).

The fast tests check every bash block, runnable or not: the files its commands name exist.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^(<!-- runnable -->\n)?```(\w+)\n(.*?)^```$", re.M | re.S)


def blocks(text: str) -> list[tuple[bool, str, str]]:
    """(runnable, language, body) of every fenced block, in order."""
    return [(bool(m.group(1)), m.group(2), m.group(3)) for m in FENCE.finditer(text)]


def runnable_blocks() -> list[str]:
    return [body for runnable, lang, body in blocks(README.read_text()) if runnable and lang == "bash"]


def test_the_marker_is_found_and_only_on_bash_blocks():
    found = blocks(README.read_text())
    assert any(runnable for runnable, _, _ in found), "README.md has no block marked <!-- runnable -->"
    assert all(lang == "bash" for runnable, lang, _ in found if runnable)
    assert README.read_text().count("<!-- runnable -->") == sum(r for r, _, _ in found)  # no stray marker
    assert blocks("<!-- runnable -->\n```bash\necho hi\n```\n\n```yaml\na: 1\n```\n") == [
        (True, "bash", "echo hi\n"), (False, "yaml", "a: 1\n")]


def named_files(body: str) -> set[str]:
    """Repository files a bash block's commands name: configs, launch and slurm scripts."""
    words = shlex.split(body.replace("\\\n", " "), comments=True)
    return {w.split("=", 1)[-1] for w in words if re.match(r"^(\w+=)?(configs|launch|slurm)/\S+\.(yaml|py|sh)$", w)}


def test_every_file_a_readme_command_names_exists():
    names = set().union(*(named_files(b) for _, lang, b in blocks(README.read_text()) if lang == "bash"))
    assert {"configs/cpu/cls.yaml", "slurm/coco_mona.sh", "launch/train.py"} <= names
    assert [n for n in sorted(names) if not (REPO / n).is_file()] == []


def readme_env(tmp_path: Path) -> dict[str, str]:
    bindir = Path(sys.executable).parent
    path = [str(bindir)]
    if not (bindir / "mona-dist").exists():
        shim = tmp_path / "bin" / "mona-dist"
        shim.parent.mkdir()
        shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m mona_dist.cli "$@"\n')
        shim.chmod(0o755)
        path.insert(0, str(shim.parent))
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PATH": os.pathsep.join(path + [os.environ.get("PATH", "")]), "PYTHONPATH": pythonpath,
            "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(runnable_blocks())))
def test_runnable_block_runs_as_written(tmp_path, index):
    body = runnable_blocks()[index]
    work = tmp_path / "clone"
    work.mkdir()
    for name in ("configs", "launch", "slurm"):
        (work / name).symlink_to(REPO / name)
    proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + body], cwd=work, env=readme_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    output = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"README block {index} failed:\n{body}\n--- output\n{output}"
    if "runs/mine" in body:  # what the README says the first-path block leaves behind
        assert (work / "runs/mine/checkpoints/latest/adapter.safetensors").is_file()
        assert (work / "runs/mine/config.yaml").is_file() and (work / "runs/mine/metrics.jsonl").is_file()
        metrics = json.loads((work / "runs/mine-eval/metrics.json").read_text())
        assert 0.0 <= metrics["eval/top1"] <= metrics["eval/top5"] <= 1.0
        images = json.loads((work / "runs/mine-preds/images.json").read_text())
        assert len(images) == 8 and all((work / "runs/mine-preds" / f"{i['name']}.vis.png").is_file() for i in images)
