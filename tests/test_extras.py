"""The optional extras (pyproject.toml, mona_dist/extras.py): without one, the task or engine that needs it says so in
one line naming the extra; the core imports and runs cls without any. The packages are really missing in a
subprocess (`sys.modules[name] = None` makes their import fail, as on a machine without them), nothing is mocked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mona_dist.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
ALL_EXTRA_MODULES = sorted({m for modules in EXTRAS.values() for m in modules})


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)


# Each case hides one package, runs `mona-dist train` on the task's CPU config in this same fresh process (the task
# modules are never imported: the check comes first), and prints the exit code and the last stderr line.
TASK_CASES = r"""
import contextlib, io, json, sys
from mona_dist.cli import main
out = []
for task, config, hidden in [("coco", "coco", "mmdet"), ("voc", "voc", "pycocotools"), ("seg", "ade20k", "mmseg"),
                             ("seg", "ade20k", "regex")]:
    saved = sys.modules.pop(hidden, None)
    sys.modules[hidden] = None
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--config", f"{ROOT}/configs/cpu/{config}.yaml", "--set", "output_dir=run"])
    out.append([task, hidden, code, err.getvalue().strip().splitlines()])
    del sys.modules[hidden]
    if saved is not None:
        sys.modules[hidden] = saved
print(json.dumps(out))
"""


def test_a_task_without_its_extra_refuses_in_one_line_naming_it(tmp_path):
    proc = run_python(f"ROOT = {str(ROOT)!r}\n" + TASK_CASES, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(proc.stdout.strip().splitlines()[-1])
    extra = {"coco": "det", "voc": "det", "seg": "seg"}
    for task, hidden, code, lines in cases:
        assert code == 2, (task, hidden, lines)
        assert lines[-1] == f"mona-dist train: error: task {task} needs {hidden}: pip install -e '.[{extra[task]}]'"
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


FAIRSCALE_CASE = r"""
import sys
sys.modules["fairscale"] = None
from torch import nn
from mona_dist.config.schema import EngineConfig, OptimConfig
from mona_dist.engine import build_engine
from mona_dist.extras import MissingExtra
try:
    build_engine(nn.Linear(2, 2), EngineConfig(name="fairscale", zero_stage=1, precision="fp32"), OptimConfig(),
                 micro_batch_size=1)
except MissingExtra as err:
    print(err)
"""


def test_the_fairscale_engine_without_its_extra_refuses_naming_it(tmp_path):
    proc = run_python(FAIRSCALE_CASE, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "engine fairscale needs fairscale: pip install -e '.[fairscale]'"


CORE_IMPORTS = r"""
import importlib, json, pkgutil, sys
for name in HIDDEN:
    sys.modules[name] = None
import mona_dist
from mona_dist.cli import build_parser
build_parser()
failed = []
for info in pkgutil.walk_packages(mona_dist.__path__, "mona_dist."):
    try:
        importlib.import_module(info.name)
    except ImportError:
        failed.append(info.name)
from mona_dist.tasks import TASKS
TASKS.get("cls")
print(json.dumps(sorted(failed)))
"""


def test_the_core_imports_without_any_extra(tmp_path):
    """Every module of the package imports with all extras missing, except those that exist to drive one."""
    proc = run_python(f"HIDDEN = {ALL_EXTRA_MODULES!r}\n" + CORE_IMPORTS, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [
        "mona_dist.engine.fairscale_engine", "mona_dist.tasks.coco", "mona_dist.tasks.mmseg_registry",
        "mona_dist.tasks.seg"]


def test_all_is_every_extra_and_make_installs_it():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11's standard library")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) <= set(extras)
    assert sorted(extras["all"]) == sorted({req for name in EXTRAS for req in extras[name]})
    assert '-e ".[dev,all]"' in (ROOT / "Makefile").read_text()


BENCH_CASE = r"""
import contextlib, io, json, sys
sys.modules["mmdet"] = None
from mona_dist.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(["bench", "--task", "voc", "--backbone", "swin_nano_patch4_window7", "--methods", "fixed",
                 "--img-size", "64", "--steps", "0", "--warmup", "0", "--no-inference"])
print(json.dumps([code, err.getvalue().strip().splitlines()]))
"""


def test_the_bench_without_the_detectors_extra_refuses_in_one_line(tmp_path):
    proc = run_python(BENCH_CASE, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code, lines = json.loads(proc.stdout.strip().splitlines()[-1])
    assert code == 2 and lines[-1] == "mona-dist bench: error: bench --task voc needs mmdet: pip install -e '.[det]'", \
        lines
