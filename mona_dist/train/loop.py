"""The training loop: from what `setup.py` builds, run steps; after each, log, evaluate, checkpoint or stop.

One all-reduce per optimizer step carries [loss, non-finite flag, pre-emption flag], so every rank takes the same
decision (skip, stop, save-and-exit) at the same step. Reading its result is the one time per step the host waits
for the GPU (`host_sync.py`); everything else that needs the device's numbers (grad norms, timings, memory) waits
for a log step, and the step records that carry them reach metrics.jsonl then, or at a checkpoint, an evaluation
or the end, whichever comes first.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as tdist

from mona_dist.config import Config, TrainConfig, dump_config
from mona_dist.config.resolve import resolve_length
from mona_dist.distributed import DistState
from mona_dist.engine import Engine, LRSchedule
from mona_dist.host_sync import host_values, to_host
from mona_dist.models import count_parameters
from mona_dist.monitor import Monitor, StepMeter, resolve_grad_norms
from mona_dist.tasks import Task
from mona_dist.teardown import keep_tracebacks_in
from mona_dist.train.checkpoint import checkpoint_root, load_checkpoint, save_checkpoint
from mona_dist.train.evaluation import EmptyValidation, evaluate
from mona_dist.train.rundir import prepare, trim_metrics
from mona_dist.train.setup import build_model_and_engine, start
from mona_dist.train.signals import EX_TEMPFAIL, PreemptionFlag

EX_NONFINITE = 3  # the run stopped on a NaN/inf loss (after saving a checkpoint)


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
    training, schedule = _set_up(cfg, written, batch_plan, task, dist, run)
    resolved = training.cfg  # with the run's length in steps (train.epochs resolved)
    engine, batches, accum = training.engine, endless(training.loader), resolved.engine.grad_accum
    engine.train(True)
    training.meter.begin()
    at = training.step + 1  # the step being run, saved or evaluated: what a failure's message names
    try:
        while training.step < resolved.train.max_steps:
            at = training.step + 1
            engine.set_lr(schedule(training.step))
            result = run_step(engine, batches, accum, training.meter, task, preemption)
            if result.nonfinite and resolved.train.nan_policy == "stop":
                return training.stop_nonfinite()
            training.apply(result)
            exit_code = training.after_step(result.preempted)
            if exit_code is not None:
                return exit_code
        training.monitor.message(f"done: {training.step} steps; outputs in {training.out} "
                                 f"(checkpoints: {checkpoint_root(training.out)})")
        return 0
    except BaseException as err:  # where it happened, for the one line the command prints (teardown.report_failure)
        latest = checkpoint_root(training.out) / "latest"
        err.add_note(f"at step {at}; last checkpoint: "
                     f"{latest.resolve() if (latest / 'meta.json').is_file() else 'none'}")
        raise
    finally:
        with contextlib.suppress(Exception):  # best effort on the way out of an error: keep what was measured
            training.flush()
        training.monitor.close()


def _set_up(cfg: Config, written: Config, batch_plan: Any, task: Task, dist: DistState,
            run: Any) -> tuple[Training, LRSchedule]:
    """The loaders, the model and engine, the resume, the run's config.yaml and the monitor's first lines."""
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

    monitor = Monitor(out, cfg.monitor, dist.is_main, cfg.train.max_steps, step, cfg.train.log_interval)
    monitor.message(f"{batch_plan.describe()}; {cfg.train.max_steps} steps"
                    + (f" ({steps_per_epoch} per epoch)" if steps_per_epoch else ""))
    for note in notes + [f"pretrained {path}: {report.details()}" for path, report in pretrained_reports]:
        monitor.message(note)
    if ckpt is not None:
        monitor.message(f"resumed from {ckpt} at step {step}")
    monitor.log_static(step, {"params_total": total_params, "params_trainable": trainable_params})
    training = Training(cfg, task, dist, engine, loader, val_loader, monitor, meta, adapter_meta, step,
                        skipped_steps)
    return training, schedule


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


# -- a step --------------------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    """What every rank agreed on before the step's last backward (`agree`)."""

    loss: float  # the mean over ranks; NaN when any rank's was not finite
    nonfinite: bool  # on any rank: the step's gradients are dropped
    preempted: bool  # on any rank: checkpoint after this step and exit


def run_step(engine: Engine, batches: Iterator[Any], accum: int, meter: StepMeter, task: Task,
             preemption: PreemptionFlag) -> StepResult:
    """Collective: the forward and backward of one optimizer step's `accum` micro-batches (the update is `apply`'s).
    A non-finite loss skips the last backward; earlier micro-batches' gradients are dropped with the step."""
    loss_sum = None
    for micro in range(accum):
        meter.data_start()
        # the loader leaves the global torch RNG alone (its own generator, RNG restored around
        # in-process augmentation), so dropout masks do not depend on when its iterators start
        batch = next(batches)
        meter.data_end(task.batch_size(batch))
        final_micro = micro == accum - 1
        with engine.accumulating(last=final_micro):
            loss = engine(batch)["loss"]
            detached = loss.detach().float()
            loss_sum = detached if loss_sum is None else loss_sum + detached
            if final_micro:  # decided before the last backward: DeepSpeed reduces gradients inside it
                result = StepResult(*agree(loss_sum / accum, preemption.requested))
            if not final_micro or not result.nonfinite:
                # a non-finite earlier micro-batch leaves non-finite gradients: dropped with the step
                engine.backward(loss)
    return result


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


# -- what follows a step -------------------------------------------------------------------------------------------
@dataclass
class Due:
    """What the step just done asks for."""

    log: bool
    save: bool
    eval: bool

    @property
    def sync(self) -> bool:
        """The device's numbers are read (pending records logged) and the next interval's meter starts anew."""
        return self.log or self.save or self.eval


def due_after(step: int, t: TrainConfig, has_val: bool, preempted: bool) -> Due:
    final_step = step == t.max_steps
    return Due(log=step % t.log_interval == 0 or step == 1 or final_step or preempted,
               save=bool(t.ckpt_interval) and (step % t.ckpt_interval == 0 or final_step),
               eval=has_val and bool((t.eval_interval and step % t.eval_interval == 0)
                                     or (final_step and t.eval_at_end)))


class Training:
    """A run between its steps: what the steps use, the step count, and the step records waiting for a sync point
    (their grad norms are device tensors)."""

    def __init__(self, cfg: Config, task: Task, dist: DistState, engine: Engine, loader: Any, val_loader: Any,
                 monitor: Monitor, meta: dict, adapter_meta: dict, step: int, skipped_steps: int):
        self.cfg, self.task, self.dist, self.engine, self.monitor = cfg, task, dist, engine, monitor
        self.loader, self.val_loader = loader, val_loader  # `loader`: the resumed one (a relayout.CarryOver, say)
        self.meta, self.adapter_meta = meta, adapter_meta
        self.step, self.skipped_steps = step, skipped_steps
        self.out = Path(cfg.output_dir)
        self.meter = StepMeter(engine.device)
        self.pending: list[dict] = []

    def apply(self, result: StepResult) -> None:
        """The optimizer update, or its skip on a non-finite loss; the step's record waits for the next sync."""
        if result.nonfinite:
            self.engine.discard_step()
            self.skipped_steps += 1
        else:
            self.engine.step()
        self.step += 1
        self.meter.step_done()
        norm = None if result.nonfinite else self.engine.grad_norm
        self.pending.append({"step": self.step, "loss": math.nan if result.nonfinite else result.loss,
                             "lr": self.engine.lr,
                             "grad_norm": norm.detach().clone() if torch.is_tensor(norm) else norm,
                             "skipped_steps": self.skipped_steps})

    def after_step(self, preempted: bool) -> int | None:
        """Collective: log, checkpoint and evaluate as the step asks; the exit code when the run stops here."""
        due = due_after(self.step, self.cfg.train, self.val_loader is not None, preempted)
        if due.sync:
            self.flush(self.meter.finish(skipped_samples=getattr(self.loader, "skipped", 0)) if due.log else None)
        if preempted:
            return self.stop_preempted()
        if due.save:
            self.save()
        if due.eval:
            try:
                self.monitor.log_eval(self.step, evaluate(self.task, self.engine, self.val_loader, self.dist))
            except EmptyValidation as err:  # no metric rather than a 0; the run goes on
                self.monitor.message(f"warning: step {self.step}: {err}: no eval metric logged", error=True)
        if due.sync:
            self.meter.begin()  # the next interval's time and peak memory leave out this one's save and eval
        return None

    def save(self) -> Path:
        return save_checkpoint(self.out, self.step, self.engine, self.loader, self.dist, self.meta,
                               self.cfg.train.keep_last, counters={"skipped_steps": self.skipped_steps},
                               adapter_meta=self.adapter_meta)

    def flush(self, stats: dict | None = None) -> None:
        if self.monitor.enabled:
            resolve_grad_norms(self.pending)
            if stats is not None:
                self.pending[-1].update(stats)
            for record in self.pending:
                self.monitor.log_step(record)
        self.pending.clear()

    def stop_nonfinite(self) -> int:
        """train.nan_policy=stop: the state before the step that went non-finite is saved, and the run ends."""
        self.flush()
        where = self.save()
        self.monitor.message(f"error: non-finite loss at step {self.step + 1}; stopped. The state before that step "
                             f"is saved in {where} (train.nan_policy=skip skips such steps)", error=True)
        return EX_NONFINITE

    def stop_preempted(self) -> int:
        where = self.save()
        self.monitor.message(f"pre-empted: checkpoint {where} saved at step {self.step}; exiting {EX_TEMPFAIL}")
        if not self.dist.is_main:  # every rank says it, so a task's own log shows it ended on the signal
            print(f"rank {self.dist.rank}: pre-empted at step {self.step}; exiting {EX_TEMPFAIL}", file=sys.stderr,
                  flush=True)
        return EX_TEMPFAIL
