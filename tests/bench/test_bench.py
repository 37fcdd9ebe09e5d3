"""`mona-dist bench` on a small backbone: outputs well-formed, the highway keeps little, ZeRO shards state."""

import gc
import json
import os
import re
import subprocess
import sys
import weakref

import pytest
import torch

from mona_dist.bench import runner
from mona_dist.bench.report import write_outputs
from mona_dist.bench.runner import BenchSpec, make_batch, run_bench
from ports import free_port

REQUIRED = {"method", "trainable", "peak_mem_bytes", "saved_activation_bytes", "step_time_s", "model_state_bytes",
            "images_per_s", "peak_vs_full", "peak_vs_fixed", "time_vs_full"}


@pytest.fixture(scope="module")
def rows():
    spec = BenchSpec(backbone="swin_nano_patch4_window7", methods=["full", "fixed", "mona", "e3va",
                     "e3va:lora_fa=true", "mona_hw:lora_fa=false", "lora"], task="seg", batch_size=2, img_size=96,
                     steps=2, warmup=1)
    return run_bench(spec, torch.device("cpu")), spec


def test_rows_carry_every_field_and_ratios(rows):
    rows, spec = rows
    assert [r["method"] for r in rows] == spec.methods + ["lora (merged)"]
    for r in rows[:-1]:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["peak_mem_bytes"] > r["saved_activation_bytes"] > 0
        assert r["step_time_s"] > 0
    full = rows[0]
    assert full["peak_vs_full"] == 1.0 and full["trainable"] > rows[2]["trainable"] > 0


INFERENCE = {"infer_latency_s", "infer_latency_p10_s", "infer_latency_p90_s", "infer_images_per_s", "infer_vs_full"}


def test_every_method_has_inference_latency_and_merged_lora_equals_unmerged(rows):
    rows, spec = rows
    for r in rows:
        assert INFERENCE <= set(r), (r["method"], INFERENCE - set(r))
        assert 0 < r["infer_latency_p10_s"] <= r["infer_latency_s"] <= r["infer_latency_p90_s"]
        assert r["infer_images_per_s"] == pytest.approx(spec.batch_size / r["infer_latency_s"])
    merged = rows[-1]
    assert merged["inference_only"] and merged.get("peak_mem_bytes") is None
    assert merged["merged_max_abs_diff"] < 1e-5  # fp32 features, LoRA's B drawn non-zero before the merge


def test_merged_lora_is_plain_linear_and_changes_qkv():
    """What the merged row times: no LoRA module left, and the fold moved qkv (B is non-zero there)."""
    from mona_dist.adapters.lora import LoRAQKVLinear
    from mona_dist.bench.inference import MERGED, build_eval_models, merged_difference

    spec = BenchSpec(backbone="swin_nano_patch4_window7", methods=["lora"], task="cls", batch_size=1, img_size=32)
    models = build_eval_models(spec, torch.device("cpu"))
    lora, merged = models["lora"], models["lora" + MERGED]
    assert not any(isinstance(m, LoRAQKVLinear) for m in merged.modules())
    qkv = "backbone.trunk.layers.0.blocks.0.attn.qkv.weight"
    assert not torch.equal(merged.state_dict()[qkv], lora.state_dict()[qkv])
    batch = runner.make_batch(spec, torch.device("cpu"))
    assert merged_difference(models, batch)["lora" + MERGED] < 1e-5


def test_highway_activations_are_a_fraction_of_full_backprop(rows):
    """Same head for every method, so (method - fixed) is what the backbone side keeps for backward."""
    by = {r["method"]: r["saved_activation_bytes"] for r in rows[0] if not r.get("inference_only")}
    backbone_full = by["full"] - by["fixed"]
    assert by["e3va"] - by["fixed"] < 0.5 * backbone_full
    assert by["mona_hw:lora_fa=false"] - by["fixed"] < by["mona"] - by["fixed"]
    assert by["e3va:lora_fa=true"] < by["e3va"]
    # Mona recomputed from its input keeps less than full backprop through the trunk (issue 27; the official
    # ops, mona:recompute=false,fused=false, kept more)
    assert by["mona"] < by["full"]


def test_outputs_are_written_and_well_formed(rows, tmp_path):
    rows, spec = rows
    meta = {**vars(spec), "device": "cpu", "world_size": 1, "device_name": "test CPU", "command": "mona-dist bench"}
    table = write_outputs(rows, meta, tmp_path)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["method"] for r in data] == [r["method"] for r in rows]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "bench.md").read_text()
    train_part, infer_part = md.split("Inference (eval mode")
    assert md == table and train_part.count("\n| ") == len(rows)  # header + one row per trained method
    assert infer_part.count("\n| ") == len(rows) + 1 and "| lora (merged) | " in infer_part
    assert "E3VA paper: peak memory 0.45x full" in md
    # the goals are Swin-B/L figures at >= 224 px: on swin_nano at 96 px they are not judged
    assert "e3va peak <= 0.40x full: measured" in md and "MISSED" not in md and " -> met" not in md
    assert "-> not comparable: goal set for Swin-B/L" in md and "measured on swin_nano_patch4_window7 at 96" in md
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))


# Each rank runs the real `mona-dist` entry point, then reports whether it is still in a process group.
RANK_DRIVER = """
import sys
import torch.distributed as dist
from mona_dist.cli import main
rank = next(a.split("=")[1] for a in sys.argv if a.startswith("--local_rank="))
code = main([a for a in sys.argv[1:] if not a.startswith("--local_rank=")])
print(f"RANK {rank} exit {code} still_in_group {dist.is_initialized()}", flush=True)
sys.exit(code)
"""


@pytest.mark.slow
def test_two_rank_zero3_holds_less_model_state_per_rank_than_zero0(tmp_path):
    driver = tmp_path / "rank_driver.py"
    driver.write_text(RANK_DRIVER)

    def run(zero: int) -> dict:
        out = tmp_path / f"z{zero}"
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(driver), "bench",
               "--backbone", "swin_nano_patch4_window7", "--methods", "full,e3va", "--engine", "deepspeed",
               "--zero", str(zero), "--batch-size", "1", "--img-size", "64", "--steps", "1", "--warmup", "1",
               "--no-inference", "--device", "cpu", "--out", str(out)]  # inference: the fsdp test's 2 ranks
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "PATH": os.path.dirname(sys.executable) + ":" + os.environ["PATH"]}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        # Both ranks left the gloo group before their interpreter shut down (distributed.finish): a rank that exits
        # inside it can abort in gloo's teardown ("terminate called without an active exception", issue 19).
        left = sorted(re.findall(r"RANK (\d) exit (\d+) still_in_group (\w+)", proc.stdout))  # lines may interleave
        assert left == [("0", "0", "False"), ("1", "0", "False")], proc.stdout[-2000:]
        return {r["method"]: r for r in json.loads((out / "bench.json").read_text())}

    z0, z3 = run(0), run(3)
    for method in ("full", "e3va"):
        assert z3[method]["model_state_bytes"] < z0[method]["model_state_bytes"]
        assert z3[method]["model_state_estimate_bytes"] < z0[method]["model_state_estimate_bytes"]
    # What each rank holds is the 1/world estimate, as for FSDP (within 2 %; fp32, so 4 bytes an element). AdamW's
    # moments are sharded exactly. The weights too, but for what DeepSpeed keeps whole on every rank: ZeRO-3
    # leaves each parameter of at most stage3_param_persistence_threshold elements (1e5, DeepSpeed's default; we
    # do not set it) unpartitioned, so up to 4 bytes per element of those come on top. Gradients are freed by the
    # step before the reading (measured 0; the estimate counts them).
    spec = runner.BenchSpec(backbone="swin_nano_patch4_window7", methods=["full", "e3va"], img_size=64,
                            num_classes=runner.TASK_DEFAULTS["cls"][2])  # the bench's model, built here to count
    for method in ("full", "e3va"):
        r = z3[method]
        measured, estimate = r["model_state_breakdown"], r["model_state_estimate_breakdown"]
        assert estimate["optimizer"] <= measured["optimizer"] <= 1.02 * estimate["optimizer"], (method, measured)
        model = runner.build_model(spec, method, {})
        assert sum(p.numel() for p in model.backbone.parameters()) == r["total_params"]
        persistent = sum(p.numel() for p in model.parameters() if p.numel() <= 100_000)
        assert estimate["params"] <= measured["params"] <= 1.02 * (estimate["params"] + 4 * persistent), \
            (method, measured, estimate, persistent)


@pytest.mark.parametrize("task, detector", [("voc", "RetinaNet"), ("coco", "CascadeRCNN")])
def test_coco_and_voc_benchmark_the_tasks_own_mmdet_detectors(task, detector, tmp_path):
    from mona_dist.bench.runner import build_model

    spec = BenchSpec(backbone="swin_nano_patch4_window7", methods=["full", "fixed", "e3va:lora_fa=true"], task=task,
                     batch_size=1, img_size=(64, 96), steps=0, warmup=0, num_classes=20)
    model = build_model(spec, "fixed", {})
    import mmdet.models

    assert type(model.net) is getattr(mmdet.models, detector)
    rows = run_bench(spec, torch.device("cpu"))
    full, fixed, e3va = rows
    assert e3va["trainable"] > 0 == fixed["trainable"]
    assert fixed["saved_activation_bytes"] > 0  # the detector's heads train under every method
    assert full["peak_vs_full"] == 1.0 and e3va["model_state_bytes"] > fixed["model_state_bytes"]
    assert full["peak_mem_bytes"] > max(fixed["peak_mem_bytes"], e3va["peak_mem_bytes"])
    assert all(r["step_time_s"] is None for r in rows)  # steps 0: memory only
    for r in rows:  # at the end of the forward every saved activation is alive beside the parameters
        params = r["model_state_breakdown"]["params"]
        assert r["live_peak_bytes"] >= params + r["saved_activation_bytes"] > 0
    assert full["live_vs_full"] == 1.0 > fixed["live_vs_full"]
    meta = {**vars(spec), "device": "cpu", "world_size": 1, "device_name": "test CPU", "command": "mona-dist bench"}
    md = write_outputs(rows, meta, tmp_path)
    assert "64x96 px (HxW)" in md and "Next to V-PETL's table" in md
    paper_full = {"coco": 17061, "voc": 15679}[task]
    vpetl = md.split("Next to V-PETL's table")[1]
    fixed_row = next(line for line in vpetl.splitlines() if line.startswith("| fixed | "))
    assert f"| {({'coco': 7137, 'voc': 3967}[task] / paper_full):.2f} |" in fixed_row
    assert f"| {fixed['live_vs_full']:.2f} |" in fixed_row and "live x full" in vpetl


def test_detection_batches_hold_the_objects_asked_for():
    spec = BenchSpec(backbone="swin_nano_patch4_window7", methods=[], task="coco", batch_size=2, img_size=(32, 48),
                     objects=7, num_classes=80)
    batch = make_batch(spec, torch.device("cpu"))
    for t in batch["targets"]:
        assert t["boxes"].shape == (7, 4) and t["labels"].shape == (7,) and t["masks"].shape == (7, 32, 48)
        x1, y1, x2, y2 = t["boxes"].unbind(1)
        assert bool((x2 > x1).all() and (y2 > y1).all() and (x2 <= 48).all() and (y2 <= 32).all())


def test_image_sizes_read_as_height_x_width():
    import argparse

    from mona_dist.bench.cli import image_size
    from mona_dist.bench.report import _size

    assert image_size("224") == 224 and image_size("800x1333") == (800, 1333)
    assert _size(image_size("800x1333")) == "800x1333"  # printed as written
    for bad in ("big", "0", "12x", "1x2x3"):
        with pytest.raises(argparse.ArgumentTypeError, match="HxW"):
            image_size(bad)


def test_goals_are_judged_only_for_the_paper_backbones_at_paper_sizes():
    from mona_dist.bench.report import goal_lines, goals_comparable

    rows = [{"method": "e3va", "peak_vs_full": 0.5}]
    paper = {"backbone": "swin_large_patch4_window7_224", "img_size": (600, 1000)}
    assert goals_comparable(paper) is None
    assert goal_lines(rows, False, goals_comparable(paper)) == ["e3va peak <= 0.40x full: measured 0.50x -> MISSED"]
    for other in ({**paper, "backbone": "swin_nano_patch4_window7"}, {**paper, "img_size": 128}):
        assert goal_lines(rows, False, goals_comparable(other))[0].endswith(
            f"-> not comparable: goal set for Swin-B/L at >= 224 px, measured on {other['backbone']} at {other['img_size'] if other['img_size'] == 128 else '600x1000'}")


def test_each_method_is_measured_alone_on_the_device_asked_for(monkeypatch):
    """When a method's memory is measured, no model of an earlier method is alive (CPU and CUDA tables compare);
    the engine is built on the bench's device, never on `pick_device()`'s (`--device cpu` on a GPU host)."""
    import mona_dist.engine as engine_pkg

    def no_pick():
        raise AssertionError("the bench asked pick_device() instead of using its --device")

    monkeypatch.setattr(engine_pkg, "pick_device", no_pick)
    built, alive_at_build = [], []
    real_build = runner.build_model

    def tracked(spec, method, opts):
        gc.collect()
        alive_at_build.append(sum(ref() is not None for ref in built))
        model = real_build(spec, method, opts)
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(runner, "build_model", tracked)
    spec = BenchSpec(backbone="swin_nano_patch4_window7", methods=["fixed", "mona", "e3va"], task="cls",
                     batch_size=1, img_size=32, steps=1, warmup=0)
    rows = run_bench(spec, torch.device("cpu"))
    assert [r["method"] for r in rows] == spec.methods
    # three memory builds, each with nothing else alive; then the three timing builds, held together
    assert alive_at_build == [0, 0, 0, 0, 1, 2]
    gc.collect()
    assert all(ref() is None for ref in built)  # and all released at the end


@pytest.mark.slow
def test_two_rank_fsdp_holds_half_the_model_state_per_rank(tmp_path):
    """`mona-dist bench --engine fsdp` under torchrun: what each rank holds is the 1/world estimate (fp32 shards of
    every weight, AdamW moments of the trainable ones). Gradients are freed by the step before the reading."""
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "mona_dist.cli", "bench", "--backbone", "swin_nano_patch4_window7", "--methods", "full,e3va",
           "--engine", "fsdp", "--batch-size", "1", "--img-size", "64", "--steps", "1", "--warmup", "1",
           "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["method"]: r for r in json.loads((out / "bench.json").read_text())}
    for method, r in rows.items():
        measured, estimate = r["model_state_breakdown"], r["model_state_estimate_breakdown"]
        for part in ("params", "optimizer"):  # shards are padded to a multiple of the world size: a little more
            assert estimate[part] <= measured[part] <= 1.02 * estimate[part], (method, part, measured, estimate)
    assert rows["e3va"]["model_state_bytes"] < rows["full"]["model_state_bytes"]
    assert "1/world estimate MiB/rank" in (out / "bench.md").read_text()
    assert all(r["infer_latency_s"] > 0 for r in rows.values())  # timed on both ranks, MAX over them


def test_methods_split_on_commas_and_keep_several_options_together():
    from mona_dist.bench.runner import parse_method, split_methods

    labels = split_methods("full,mona:recompute=false,fused=false,e3va:lora_fa=true,rank=4,lora")
    assert labels == ["full", "mona:recompute=false,fused=false", "e3va:lora_fa=true,rank=4", "lora"]
    assert parse_method(labels[1]) == ("mona", {"recompute": False, "fused": False})
