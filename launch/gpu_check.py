#!/usr/bin/env python
"""`make gpu-check`: one prepared run that proves the CUDA, NCCL and bf16 paths on one GPU within 8 minutes.

Steps, each a subprocess with its own time limit (a failure or a timeout never stops the next step):
  tests             pytest -m gpu (MONA_DIST_TEST_GPU=1): CUDA train steps under DeepSpeed ZeRO-2/3 bf16, DDP bf16
                    autocast, the device-side preprocessing
  shards-<cfg>      synthetic shards for each configs/cpu task (under OUT/data, reused when present)
  train-<cfg>       each configs/cpu/*.yaml task for --steps steps under the deepspeed launcher, world size 1
                    (NCCL and bf16 on cuda, gloo and the config's fp32 on cpu)
  train-fp16        the cls task under DeepSpeed ZeRO-2 fp16 (loss scaler; cpu: fp32, the CPU accelerator has
                    none), checkpointed; resume-fp16 resumes it for 2 more steps (the scaler's state loaded)
  bench-voc/-coco   `mona-dist bench` for the detection tasks, batch 1, every method: Swin-L 600x1000 (VOC) and
                    Swin-B 800x1333 (COCO) (H x W) in bf16 on cuda; --tiny: Swin-nano at 64x96 / 96x128
  bench-data-<cfg>  `mona-dist bench-data --device DEV` on the task's shards
Writes OUT/<step>.json (status, exit code, wall time, budget, command, log, parsed results), OUT/summary.json and
prints one table; exits 1 if any step failed or timed out. OUT: --out, else $OUT, else runs/gpu-check.

Step limits on one GPU (seconds, x CPU_FACTOR on --device cpu): `limit`, from what each step does (LIMIT_S, and
BENCH_BUILD_S x methods x 2 builds for bench). Their sum for the default run is asserted <= MAX_TOTAL_S (one
10-minute command on the GPU machine) by tests/launch/test_gpu_check.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

TRAIN_CONFIGS = ("ade20k", "cls", "coco", "voc")  # configs/cpu/<name>.yaml; base.yaml holds no task
FP16_CONFIG = "cls"  # DeepSpeed ZeRO-2 fp16 (what the cls, coco and voc recipes ship): trained, then resumed
# Step limits on one GPU, in seconds, from what each step does (`limit`). They are estimates from reading, not
# measurements: no GPU has run this yet; every step's JSON records its wall time, from which the first GPU run
# should set them. Start-up (imports, the CUDA context, the deepspeed launcher, NCCL) is most of each short step.
LIMIT_S = {
    "tests": 80,             # pytest -m gpu: a dozen tests, each a few CUDA steps; one starts 2 processes
    "shards": 6,             # a few dozen 64-px images
    "train_start": 22,       # deepspeed launcher + NCCL + model build + final eval and checkpoint
    "train_step": 0.5,       # one step of a configs/cpu task (64 px, batch 8)
    "bench_start": 12,       # imports, CUDA context
    "bench_data": 6,
}
# bench builds every method twice (memory, then time) and runs warm-up + steps on each build: seconds per build,
# the random init of the backbone on the host included (Swin-L: 197M parameters).
BENCH_BUILD_S = {"voc": 6.0, "coco": 5.0}
MAX_TOTAL_S = 570  # the default run fits one 10-minute command on the GPU machine, with its start-up
CPU_FACTOR = 15  # a loaded 2-core CPU runs even the tiny sizes (and every start-up, DeepSpeed's above all) much slower
# bench's detectors by the data set they come from: the task name bench offers for it, backbone and size
# (H x W, as `bench --img-size` reads it) at paper scale and with --tiny.
BENCH = {
    "voc": {"tasks": ("voc",), "backbone": "swin_large_patch4_window7_224", "size": "600x1000",
            "tiny_size": "64x96"},
    "coco": {"tasks": ("coco",), "backbone": "swin_base_patch4_window7_224", "size": "800x1333",
             "tiny_size": "96x128"},
}
TINY_BACKBONE = "swin_nano_patch4_window7"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny backbone and sizes (the CPU/CI run)")
    p.add_argument("--steps", type=int, default=None, help="train steps per task (default 20; --tiny 2)")
    p.add_argument("--methods", default=None, help="bench methods (default: every method bench knows)")
    p.add_argument("--only", default=None,
                   help="comma-separated step names or prefixes (e.g. tests,train-cls,bench-voc); default: all")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu-check"))
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    args.steps = args.steps or (2 if args.tiny else 20)
    return args


def step_names() -> list[str]:
    return ["tests", *(f"shards-{c}" for c in TRAIN_CONFIGS), *(f"train-{c}" for c in TRAIN_CONFIGS),
            "train-fp16", "resume-fp16", *(f"bench-{b}" for b in BENCH), *(f"bench-data-{c}" for c in TRAIN_CONFIGS)]


def limit(name: str, args: argparse.Namespace) -> float:
    """Seconds `name` may run with these arguments (on one GPU; x CPU_FACTOR on cpu)."""
    if name.startswith("bench-data-"):
        seconds = LIMIT_S["bench_data"]
    elif name.startswith("bench-"):
        methods = len((args.methods or default_methods()).split(","))
        seconds = LIMIT_S["bench_start"] + BENCH_BUILD_S[name[len("bench-"):]] * 2 * methods
    elif name.startswith(("train-", "resume-")):
        steps = 2 if name == "resume-fp16" else args.steps
        seconds = LIMIT_S["train_start"] + LIMIT_S["train_step"] * steps
    elif name.startswith("shards-"):
        seconds = LIMIT_S["shards"]
    else:
        seconds = LIMIT_S[name]
    return round(seconds * (1 if args.device == "cuda" else CPU_FACTOR), 1)


def default_methods() -> str:
    from mona_dist.bench.cli import DEFAULT_METHODS

    return DEFAULT_METHODS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(device: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1", PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if device == "cpu":  # DeepSpeed on its CPU accelerator (gloo), CUDA hidden even on a GPU host
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    else:
        env["DS_ACCELERATOR"] = "cuda"
        if env.get("CUDA_VISIBLE_DEVICES") == "":  # an inherited "hide CUDA" (the CPU test suite's) would hide it
            del env["CUDA_VISIBLE_DEVICES"]
    return env


def run_step(name: str, cmd: list[str], timeout_s: float, out: Path, env: dict[str, str]) -> dict:
    """Run `cmd` with its output in OUT/logs/<name>.log; killed with its whole process group at `timeout_s`."""
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        # own session: the deepspeed launcher's ranks and DataLoader workers die with it at the time limit
        try:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                    start_new_session=True)
        except OSError as err:  # recorded like any failed step; the next step still runs
            f.write(f"could not start: {err}\n")
            return {"step": name, "status": "failed", "rc": None, "wall_s": round(time.monotonic() - t0, 1),
                    "budget_s": timeout_s, "command": cmd, "log": str(log), "note": f"could not start: {err}"}
        try:
            rc, status = proc.wait(timeout=timeout_s), None
        except subprocess.TimeoutExpired:
            stop_group(proc, grace_s=10)
            rc, status = proc.wait(), "timeout"
        except BaseException:  # Ctrl-C or SIGTERM to the check: the step's own session would outlive it
            stop_group(proc, grace_s=2)
            raise
    return {"step": name, "status": status or ("passed" if rc == 0 else "failed"), "rc": rc,
            "wall_s": round(time.monotonic() - t0, 1), "budget_s": timeout_s, "command": cmd, "log": str(log)}


def stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the step's process group, SIGKILL to what is left of it after `grace_s`: the deepspeed runner
    exits on SIGTERM, but `deepspeed.launcher.launch` and the ranks may not (a rank waiting on a lock never reaches
    the step boundary where it would stop), so the group is watched, not only its leader."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reaps the leader, which would otherwise keep the group alive as a zombie
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def log_tail(result: dict, lines: int = 3) -> str:
    text = Path(result["log"]).read_text(errors="replace").strip().splitlines()
    return " | ".join(line.strip() for line in text[-lines:])[-300:]


# ---- the steps ------------------------------------------------------------------------------------------------


def test_step(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    junit = args.out / "tests" / "junit.xml"
    junit.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "tests"]
    env = child_env(args.device)
    if args.device == "cuda":
        env["MONA_DIST_TEST_GPU"] = "1"  # tests/conftest.py: otherwise the suite hides CUDA and skips `gpu` tests
    else:
        env.pop("MONA_DIST_TEST_GPU", None)
    return cmd, env


def test_details(args: argparse.Namespace, result: dict) -> None:
    """Counts from the JUnit XML; on cuda a skipped `gpu` test is a failure (it was meant to run here)."""
    junit = args.out / "tests" / "junit.xml"
    if not junit.exists():
        return
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    result["details"] = counts
    result["note"] = (f"{counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']} passed, "
                      f"{counts['skipped']} skipped, {counts['failures'] + counts['errors']} failed")
    if args.device == "cuda" and result["status"] == "passed" and (counts["skipped"] or not counts["tests"]):
        result["status"] = "failed"
        result["note"] += " (a gpu test skipped on the GPU run)"


def shards_cmd(args: argparse.Namespace, name: str) -> list[str] | None:
    if (args.out / "data" / name / "shards" / "val.index.json").exists():
        return None  # built by an earlier run into the same OUT
    return [sys.executable, "-m", "mona_dist.cli", "shards", "synthetic", "--task", name,
            "--out", str(args.out / "data" / name), "--num-train", "32", "--num-val", "8", "--size", "64",
            "--per-shard", "16", "--workers", "1", "--no-progress"]


def train_cmd(args: argparse.Namespace, name: str, run_name: str | None = None, precision: str = "bf16",
              steps: int | None = None, extra: dict | None = None, resume: bool = False) -> list[str]:
    data, run = args.out / "data" / name / "shards", args.out / "train" / (run_name or name)
    steps = steps or args.steps
    sets = {"output_dir": run, "train.max_steps": steps, "train.ckpt_interval": steps,
            "train.log_interval": 1, "monitor.progress_bar": "false", "data.train_shards": data / "train.index.json",
            "data.val_shards": data / "val.index.json", **(extra or {})}
    if args.device == "cuda":
        sets.update({"engine.precision": precision, "data.pin_memory": "true"})
    # The launcher as a module of this interpreter: where deepspeed is installed with `pip --target` and PYTHONPATH
    # (the GPU machine, REFERENCE.md) there is no `deepspeed` script beside the interpreter.
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
            "launch/train.py", "--config", f"configs/cpu/{name}.yaml",
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], *(["--resume", "latest"] if resume else [])]


def fp16_cmds(args: argparse.Namespace) -> dict[str, list[str]]:
    """ZeRO-2 fp16: train and checkpoint, then resume from the checkpoint for 2 more steps."""
    extra = {"engine.name": "deepspeed", "engine.zero_stage": 2, "train.eval_at_end": "false"}
    return {"train-fp16": train_cmd(args, FP16_CONFIG, "fp16", "fp16", extra=extra),
            "resume-fp16": train_cmd(args, FP16_CONFIG, "fp16", "fp16", steps=args.steps + 2, extra=extra,
                                     resume=True)}


def train_details(args: argparse.Namespace, name: str, result: dict) -> None:
    metrics = args.out / "train" / name / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        result["details"] = {"metrics_first": rows[0] if rows else None, "metrics_last": rows[-1] if rows else None,
                             "metrics": str(metrics)}
        skipped = [r["skipped_steps"] for r in rows if "skipped_steps" in r]
        if skipped:  # fp16: steps the loss scaler skipped on overflow
            result["details"]["skipped_steps"] = skipped[-1]


def bench_task(which: str) -> str | None:
    """The name `mona-dist bench --task` offers for this detector, read from the CLI itself; None if it has none."""
    from mona_dist.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    choices = next(a.choices for a in commands.choices["bench"]._actions if a.dest == "task")
    return next((t for t in BENCH[which]["tasks"] if t in choices), None)


def bench_cmd(args: argparse.Namespace, which: str, task: str) -> list[str]:
    from mona_dist.bench.cli import DEFAULT_METHODS

    spec = BENCH[which]
    cmd = [sys.executable, "-m", "mona_dist.cli", "bench", "--task", task,
           "--backbone", TINY_BACKBONE if args.tiny else spec["backbone"],
           "--img-size", spec["tiny_size"] if args.tiny else spec["size"], "--batch-size", "1",
           "--methods", args.methods or DEFAULT_METHODS, "--device", args.device, "--out", str(args.out / f"bench-{which}")]
    cmd += ["--steps", "1", "--warmup", "0"] if args.tiny else ["--steps", "5", "--warmup", "1"]
    cmd += ["--no-inference"]  # the budget was sized for training rows; inference latency builds every model again
    if args.device == "cuda":
        cmd += ["--precision", "bf16"]
    return cmd


def bench_details(args: argparse.Namespace, which: str, result: dict) -> None:
    path = args.out / f"bench-{which}" / "bench.json"
    if path.exists() and result["status"] == "passed":
        result["details"] = json.loads(path.read_text())
        result["note"] = f"{path}"


def bench_data_cmd(args: argparse.Namespace, name: str) -> list[str]:
    task = yaml.safe_load((ROOT / "configs" / "cpu" / f"{name}.yaml").read_text())["task"]
    small = args.tiny or args.device == "cpu"
    return [sys.executable, "-m", "mona_dist.cli", "bench-data", "--task", task,
            "--shards", str(args.out / "data" / name / "shards" / "train.index.json"), "--device", args.device,
            "--workers", "1" if small else "4", "--batches", "3" if small else "10", "--batch-size", "4", "--json"]


def bench_data_details(result: dict) -> None:
    lines = Path(result["log"]).read_text(errors="replace").strip().splitlines()
    try:
        row = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return
    result["details"] = row
    result["note"] = (f"pipeline {row['pipeline_images_per_s']:.1f} img/s, device preprocessing "
                      f"{row['device_preprocess_images_per_s']:.1f} img/s on {row['device']}")


# ---- driver ---------------------------------------------------------------------------------------------------


def selected(args: argparse.Namespace, name: str) -> bool:
    if not args.only:
        return True
    return any(name == s or name.startswith(s + "-") for s in args.only.split(","))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through run_step, which stops its step
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: --device cuda, but no CUDA device is visible (use --device cpu --tiny on a CPU host)",
                  file=sys.stderr)
            return 2
    env = child_env(args.device)
    results: list[dict] = []

    def record(result: dict) -> dict:
        if result["status"] != "passed" and not result.get("note"):
            result["note"] = log_tail(result)
        (args.out / f"{result['step']}.json").write_text(json.dumps(result, indent=1, default=str))
        results.append(result)
        print(f"[gpu-check] {result['step']:<20} {result['status']:<8} {result['wall_s']:7.1f} s "
              f"(limit {result['budget_s']} s)  {result.get('note', '')}", flush=True)
        return result

    def skip(name: str, why: str) -> None:
        record({"step": name, "status": "skipped", "rc": None, "wall_s": 0.0, "budget_s": limit(name, args),
                "command": None, "note": why})

    if selected(args, "tests"):
        cmd, test_env = test_step(args)
        result = run_step("tests", cmd, limit("tests", args), args.out, test_env)
        test_details(args, result)
        record(result)

    for name in TRAIN_CONFIGS:  # the data every later step of this task reads
        wanted = [s for s in (f"train-{name}", f"bench-data-{name}", *(("train-fp16", "resume-fp16")
                                                                       if name == FP16_CONFIG else ()))
                  if selected(args, s)]
        if wanted or selected(args, f"shards-{name}"):
            cmd = shards_cmd(args, name)
            if cmd is None:
                skip(f"shards-{name}", f"reused {args.out / 'data' / name}")
            else:
                record(run_step(f"shards-{name}", cmd, limit(f"shards-{name}", args), args.out, env))

    for name in TRAIN_CONFIGS:
        if selected(args, f"train-{name}"):
            result = run_step(f"train-{name}", train_cmd(args, name), limit(f"train-{name}", args), args.out, env)
            train_details(args, name, result)
            record(result)

    for step, cmd in fp16_cmds(args).items():
        if selected(args, step):
            result = run_step(step, cmd, limit(step, args), args.out, env)
            train_details(args, "fp16", result)
            record(result)

    for which in BENCH:
        step = f"bench-{which}"
        if not selected(args, step):
            continue
        task = bench_task(which)
        if task is None:
            skip(step, f"`mona-dist bench --task` offers no {which} detector yet (choices tried: "
                       f"{', '.join(BENCH[which]['tasks'])})")
            continue
        result = run_step(step, bench_cmd(args, which, task), limit(step, args), args.out, env)
        bench_details(args, which, result)
        record(result)

    for name in TRAIN_CONFIGS:
        step = f"bench-data-{name}"
        if selected(args, step):
            result = run_step(step, bench_data_cmd(args, name), limit(step, args), args.out, env)
            bench_data_details(result)
            record(result)

    failed = [r["step"] for r in results if r["status"] in ("failed", "timeout")]
    total = sum(r["wall_s"] for r in results)
    summary = {"device": args.device, "tiny": args.tiny, "steps": args.steps, "wall_s": round(total, 1),
               "failed": failed, "results": [{k: r[k] for k in ("step", "status", "rc", "wall_s", "budget_s")}
                                             for r in results]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'step':<20} {'status':<8} {'wall s':>8} {'limit s':>8}  note")
    for r in results:
        print(f"{r['step']:<20} {r['status']:<8} {r['wall_s']:8.1f} {r['budget_s']:8}  {r.get('note', '')[:90]}")
    print(f"{'total':<20} {'FAILED' if failed else 'ok':<8} {total:8.1f}  -> {args.out}/summary.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
