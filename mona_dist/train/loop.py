"""The training loop: build everything from the config, then step, log, evaluate and checkpoint.

One all-reduce per optimizer step carries [loss, non-finite flag, pre-emption flag], so every rank takes the same
decision (skip, stop, save-and-exit) at the same step. Reading its result is the one time per step the host waits
for the GPU (`host_sync.py`); everything else that needs the device's numbers (grad norms, timings, memory) waits
for a log step, and the step records that carry them reach metrics.jsonl then, or at a checkpoint, an evaluation
or the end, whichever comes first.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as tdist

from mona_dist.adapters.io import adapter_metadata
from mona_dist.config import Config, dump_config
from mona_dist.config.resolve import resolve_batch, resolve_length
from mona_dist.config.schema import EngineConfig
from mona_dist.data import is_padding
from mona_dist.distributed import DistState, all_reduce_max, init_distributed, process_group_backend
from mona_dist.engine import Engine, LRSchedule, build_engine
from mona_dist.host_sync import host_values, to_host
from mona_dist.models import count_parameters
from mona_dist.models.pretrained import loading_policy
from mona_dist.monitor import Monitor, StepMeter, resolve_grad_norms
from mona_dist.tasks import TASKS, Task
from mona_dist.teardown import keep_tracebacks_in
from mona_dist.train.checkpoint import checkpoint_root, frozen_fingerprint, load_checkpoint, save_checkpoint
from mona_dist.train.rundir import prepare, trim_metrics
from mona_dist.train.signals import EX_TEMPFAIL, PreemptionFlag

EX_NONFINITE = 3  # the run stopped on a NaN/inf loss (after saving a checkpoint)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def join_group(dist: DistState, cfg: Config) -> None:
    """DeepSpeed and fairscale need a process group even for one rank: a private in-memory one does."""
    if cfg.engine.name != "ddp" and not tdist.is_initialized():
        backend = process_group_backend(torch.cuda.is_available(), host_collectives(cfg.engine))
        tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)


def host_collectives(engine: EngineConfig) -> bool:
    """Whether the run reduces host tensors: FSDP2 with CPU offload (its shards and gradients live on the host)."""
    return engine.name == "fsdp" and engine.offload_params


def endless(loader: Any) -> Iterator[Any]:
    """Batches forever; the loader moves to its next epoch by itself and keeps its position for checkpoints.

    One empty pass is normal (a checkpoint taken right after an epoch's last batch resumes at that epoch's end);
    two in a row mean the data set yields nothing.
    """
    empty_passes = 0
    while empty_passes < 2:
        empty_passes += 1
        for batch in loader:
            empty_passes = 0
            yield batch
    raise ValueError("the training loader yielded no batch (data.train_shards empty or batch too large?)")


def epoch_batches(loader: Any) -> int | None:
    """Batches this rank's loader yields per epoch; None when the shards carry no sample counts."""
    try:
        return len(loader)
    except TypeError:
        return None


def agree(loss: torch.Tensor, preempt: bool) -> tuple[float, bool, bool]:
    """Collective: (mean loss over ranks, any rank non-finite, any rank pre-empted); one host wait."""
    finite = torch.isfinite(loss)
    # Built on the loss's device from Python numbers by fill kernels: no host-to-device copy.
    t = torch.stack([torch.where(finite, loss, 0.0).double(), (~finite).double(),
                     loss.new_full((), float(preempt), dtype=torch.float64)])
    world = 1
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        world = tdist.get_world_size()
        if tdist.get_backend() == "nccl":
            tdist.all_reduce(t)
            t = to_host(t, "agree")
        else:  # gloo reduces host tensors
            t = to_host(t, "agree")
            tdist.all_reduce(t)
    else:
        t = to_host(t, "agree")
    loss_sum, nonfinite, stop = host_values(t)
    return (loss_sum / world if not nonfinite else math.nan), nonfinite > 0, stop > 0


class EmptyValidation(ValueError):
    """The validation set yielded no sample on any rank: there is no metric (a 0 would be a lie)."""


class _Counted:
    """The loader, counting the samples it yields to be scored (padding batches aside)."""

    def __init__(self, loader: Any, task: Task):
        self.loader, self.task, self.samples = loader, task, 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if not is_padding(batch):
                self.samples += self.task.batch_size(batch)
            yield batch

    def __getattr__(self, name: str) -> Any:  # shards, skipped, ... of the loader itself
        return getattr(self.loader, name)


def evaluate(task: Task, engine: Engine, loader: Any, dist: DistState) -> dict[str, float]:
    """Collective: the task's metrics on `loader`; EmptyValidation when no rank had a sample to score."""
    engine.train(False)
    counted = _Counted(loader, task)
    try:
        metrics = task.evaluate(engine, counted, dist)
    finally:
        engine.train(True)
    if all_reduce_max(counted.samples) == 0:
        skipped = getattr(loader, "skipped", 0)
        raise EmptyValidation(f"the validation set ({getattr(getattr(loader, 'shards', None), 'spec', 'val')}) "
                              f"yielded no sample to score" + (f" ({skipped} corrupt samples or unreadable shards "
                                                               f"skipped)" if skipped else ""))
    return metrics


def start(cfg: Config) -> tuple[DistState, Config, Any, Task]:
    """Collective. The start-up every command that runs a task model shares (train, eval, predict): ranks, the
    resolved batch, the task's and DeepSpeed's config checks, the process group."""
    dist = init_distributed(cpu_collectives=host_collectives(cfg.engine))
    cfg, batch_plan = resolve_batch(cfg, dist.world_size)  # micro-batch and accumulation from the global batch
    task = TASKS.get(cfg.task)
    task.check(cfg)
    if cfg.engine.name == "deepspeed":  # the merged DeepSpeed JSON is checked before anything is built
        from mona_dist.engine.deepspeed_engine import deepspeed_config

        deepspeed_config(cfg.engine, cfg.data.batch_size, dist.world_size)
    join_group(dist, cfg)
    return dist, cfg, batch_plan, task


def build_task_model(cfg: Config, task: Task) -> tuple[torch.nn.Module, list]:
    """(the task's model, its pretrained-load reports), built from `train.seed`: the same frozen weights and initial
    tensors on every rank and in every command that rebuilds a run's model (train, eval, predict, export)."""
    seed_everything(cfg.train.seed)
    with loading_policy(strict=cfg.model.pretrained_strict) as pretrained_reports:
        model = task.build_model(cfg)
    return model, pretrained_reports


def model_meta(cfg: Config) -> dict[str, Any]:
    """What a checkpoint records of the model, so that a resume with another one names the field that differs
    (the frozen-weight fingerprint alone could only say that something did)."""
    return {"backbone": cfg.model.backbone, "method": cfg.model.method,
            "method_options": json.loads(json.dumps(cfg.model.method_options))}  # as meta.json gives it back


def build_model_and_engine(cfg: Config, task: Task, dist: DistState) -> tuple[Engine, dict, list, dict]:
    """(engine, checkpoint meta, pretrained reports, adapter-file metadata). The model is built from `train.seed` on
    every rank, so its frozen weights are the same in train, eval and predict (meta's fingerprint checks it against
    a checkpoint)."""
    model, pretrained_reports = build_task_model(cfg, task)
    meta = {"engine": cfg.engine.name, "zero_stage": cfg.engine.zero_stage, "task": cfg.task,
            **model_meta(cfg), "frozen_fingerprint": frozen_fingerprint(model)}
    # from the plain model, before an engine wraps it: the adapter files describe what they were saved from
    adapter_meta = adapter_metadata(model, task=cfg.task, pretrained=cfg.model.pretrained)
    seed_everything(cfg.train.seed + dist.rank)  # dropout / drop-path differ per rank
    engine = build_engine(model, cfg.engine, cfg.optim, micro_batch_size=cfg.data.batch_size,
                          world_size=dist.world_size, fixed_shape=task.fixed_shape)
    return engine, meta, pretrained_reports, adapter_meta


def train(cfg: Config, resume: str | None = None) -> int:
    """Run (or resume) training; returns the process exit code (0, EX_NONFINITE or EX_TEMPFAIL).

    Pre-emption signals are caught from the start: one that arrives while the run is still being built stops it at
    its first step boundary (checkpoint, exit 75)."""
    with PreemptionFlag() as preemption:
        written = cfg  # what config.yaml records; the resolved numbers go to the log
        dist, cfg, batch_plan, task = start(cfg)
        run = prepare(cfg.output_dir, resume, dist.rank, dist.world_size)  # the lock, the resume, write access
        keep_tracebacks_in(cfg.output_dir)  # a failure's traceback goes there (teardown.report_failure)
        try:
            return _train(cfg, written, batch_plan, task, dist, run, preemption)
        finally:
            run.close()


def _train(cfg: Config, written: Config, batch_plan: Any, task: Task, dist: DistState, run: Any,
           preemption: PreemptionFlag) -> int:
    out = Path(cfg.output_dir)
    # Loaders first: a missing data set fails in a second, not after building a large model.
    loader = task.build_loader(cfg, "train", dist)
    loader.set_step_batches(cfg.engine.grad_accum)  # an epoch is a whole number of steps, equal on every rank
    val_loader = task.build_loader(cfg, "val", dist) if cfg.data.val_shards else None
    cfg, steps_per_epoch = resolve_length(cfg, epoch_batches(loader))  # epochs -> steps
    engine, meta, pretrained_reports, adapter_meta = build_model_and_engine(cfg, task, dist)
    total_params, trainable_params = count_parameters(engine.model)
    schedule = LRSchedule(cfg.schedule, cfg.optim.lr, cfg.train.max_steps, steps_per_epoch)

    step, skipped_steps, notes = 0, 0, list(run.notes)
    ckpt = run.checkpoint
    if ckpt is not None:
        resumed = load_checkpoint(ckpt, engine, loader, dist, seed=cfg.train.seed,
                                  expect=meta)
        step, skipped_steps, loader = resumed.step, resumed.counters.get("skipped_steps", 0), resumed.loader
        notes += resumed.notes
    if dist.is_main:  # the run is valid: only now does the directory record it
        dump_config(written, out / "config.yaml")
        trim_metrics(out / "metrics.jsonl", step)  # replayed steps replace the interrupted run's records

    def save(at: int) -> Path:
        return save_checkpoint(out, at, engine, loader, dist, meta, cfg.train.keep_last,
                               counters={"skipped_steps": skipped_steps}, adapter_meta=adapter_meta)

    monitor = Monitor(out, cfg.monitor, dist.is_main, cfg.train.max_steps, step, cfg.train.log_interval)
    monitor.message(f"{batch_plan.describe()}; {cfg.train.max_steps} steps"
                    + (f" ({steps_per_epoch} per epoch)" if steps_per_epoch else ""))
    for note in notes + [f"pretrained {path}: {report.details()}" for path, report in pretrained_reports]:
        monitor.message(note)
    if ckpt is not None:
        monitor.message(f"resumed from {ckpt} at step {step}")
    monitor.log_static(step, {"params_total": total_params, "params_trainable": trainable_params})
    meter, batches, accum = StepMeter(engine.device), endless(loader), cfg.engine.grad_accum
    pending: list[dict] = []  # step records waiting for a sync point (their grad norms are device tensors)

    def flush(stats: dict | None = None) -> None:
        if monitor.enabled:
            resolve_grad_norms(pending)
            if stats is not None:
                pending[-1].update(stats)
            for record in pending:
                monitor.log_step(record)
        pending.clear()

    engine.train(True)
    meter.begin()
    at = step + 1  # the step being run, saved or evaluated: what a failure's message names
    try:
        while step < cfg.train.max_steps:
            at = step + 1
            engine.set_lr(schedule(step))
            loss_sum = None
            for micro in range(accum):
                meter.data_start()
                # the loader leaves the global torch RNG alone (its own generator, RNG restored around
                # in-process augmentation), so dropout masks do not depend on when its iterators start
                batch = next(batches)
                meter.data_end(task.batch_size(batch))
                last = micro == accum - 1
                with engine.accumulating(last=last):
                    loss = engine(batch)["loss"]
                    detached = loss.detach().float()
                    loss_sum = detached if loss_sum is None else loss_sum + detached
                    if last:  # decided before the last backward: DeepSpeed reduces gradients inside it
                        mean, bad, stop = agree(loss_sum / accum, preemption.requested)
                    if not last or not bad:
                        # a non-finite earlier micro-batch leaves non-finite gradients: dropped below
                        engine.backward(loss)
            if bad and cfg.train.nan_policy == "stop":
                flush()
                where = save(step)
                monitor.message(f"error: non-finite loss at step {step + 1}; stopped. The state before that step "
                                f"is saved in {where} (train.nan_policy=skip skips such steps)", error=True)
                return EX_NONFINITE
            if bad:
                engine.discard_step()
                skipped_steps += 1
            else:
                engine.step()
            step += 1
            meter.step_done()
            norm = None if bad else engine.grad_norm
            pending.append({"step": step, "loss": math.nan if bad else mean, "lr": engine.lr,
                            "grad_norm": norm.detach().clone() if torch.is_tensor(norm) else norm,
                            "skipped_steps": skipped_steps})
            t = cfg.train
            last = step == t.max_steps
            log = step % t.log_interval == 0 or step == 1 or last or stop
            save_due = bool(t.ckpt_interval) and (step % t.ckpt_interval == 0 or last)
            eval_due = val_loader is not None and bool((t.eval_interval and step % t.eval_interval == 0)
                                                       or (last and t.eval_at_end))
            if log or save_due or eval_due:
                flush(meter.finish(skipped_samples=getattr(loader, "skipped", 0)) if log else None)
            if stop:
                where = save(step)
                monitor.message(f"pre-empted: checkpoint {where} saved at step {step}; exiting {EX_TEMPFAIL}")
                if not dist.is_main:  # every rank says it, so a task's own log shows it ended on the signal
                    print(f"rank {dist.rank}: pre-empted at step {step}; exiting {EX_TEMPFAIL}", file=sys.stderr,
                          flush=True)
                return EX_TEMPFAIL
            if save_due:
                save(step)
            if eval_due:
                try:
                    monitor.log_eval(step, evaluate(task, engine, val_loader, dist))
                except EmptyValidation as err:  # no metric rather than a 0; the run goes on
                    monitor.message(f"warning: step {step}: {err}: no eval metric logged", error=True)
            if log or save_due or eval_due:
                meter.begin()  # the next interval's time and peak memory leave out this one's save and eval
        monitor.message(f"done: {step} steps; outputs in {out} (checkpoints: {checkpoint_root(out)})")
        return 0
    except BaseException as err:  # where it happened, for the one line the command prints (teardown.report_failure)
        latest = checkpoint_root(out) / "latest"
        err.add_note(f"at step {at}; last checkpoint: "
                     f"{latest.resolve() if (latest / 'meta.json').is_file() else 'none'}")
        raise
    finally:
        with contextlib.suppress(Exception):  # best effort on the way out of an error: keep what was measured
            flush()
        monitor.close()
