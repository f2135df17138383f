"""The run's wall-clock budget (--max-minutes) and the signals that stop it, behind one object.

    budget = Budget(args.max_minutes)      # counts from now
    budget.own_answers_deadline            # the own answers stop here (a quarter of the budget)
    with budget.stop_on_signals():         # Ctrl-C / SIGTERM set budget.signalled: the step finishes first
        budget.start_training(progress0, own_answers)  # says so if nothing is left for training
        while not budget.signalled:        # ... one step, then stop if budget.out_of_time()
            budget.spent(step, steps)      # the fraction spent, which --decay follows
"""
import contextlib
import math
import os
import shlex
import signal
import time

import torch

FINISH_RESERVE_S = 150  # kept for the save and the closing measurement (at most a quarter of a short budget)
AMP_TIMING_SHARE = 0.05  # of the training time left at most for --amp auto's timing
OWN_ANSWERS_SHARE = 0.25  # of --max-minutes at most for writing the own answers (about 0.15 on an idle CPU)


class Budget:
    def __init__(self, max_minutes: float | None, t0: float | None = None):
        self.minutes = max_minutes
        self.t0 = time.time() if t0 is None else t0  # when the run started
        self.t_train, self.progress0 = None, 0.0      # when training started, and the share spent before it
        self.signalled = False                        # Ctrl-C or SIGTERM came

    @property
    def reserve(self) -> float:
        """Seconds kept after training for the save and the closing measurement."""
        return min(FINISH_RESERVE_S, 0.25 * self.minutes * 60) if self.minutes else 0.0

    @property
    def end(self) -> float:  # time.time() when --max-minutes is spent
        return self.t0 + self.minutes * 60 if self.minutes else math.inf

    @property
    def deadline(self) -> float:  # when training must stop, to leave time for the end of the run
        return self.end - self.reserve

    @property
    def own_answers_deadline(self) -> float:
        return self.t0 + OWN_ANSWERS_SHARE * self.minutes * 60 if self.minutes else math.inf

    @property
    def amp_timing_seconds(self) -> float:
        """How long --amp auto may time precisions: a share of the training time left."""
        return AMP_TIMING_SHARE * (self.deadline - time.time())

    def minutes_in(self) -> float:
        return (time.time() - self.t0) / 60

    def plan(self, self_answers: int) -> str | None:
        if not self.minutes:
            return None
        answers = f"{self_answers} own answers (until minute {OWN_ANSWERS_SHARE * self.minutes:.1f} at most), then "
        return (f"plan: {self.minutes:g} min in all: {answers if self_answers else ''}training until minute "
                f"{self.minutes - self.reserve / 60:.1f} (now {self.minutes_in():.1f}), then the save and a "
                f"measurement of decoding against the original")

    def start_training(self, progress0: float, own_answers: bool):
        """Training starts now, progress0 of the budget spent by the run it resumes."""
        if time.time() > self.deadline:
            raise ValueError(f"the --max-minutes {self.minutes:g} budget was spent before the first step "
                             f"({self.minutes_in():.1f} min on loading{' and own answers' if own_answers else ''}, "
                             f"{self.reserve / 60:.1f} min kept for the end); nothing was trained or saved")
        self.t_train, self.progress0 = time.time(), progress0

    def spent(self, step: int, steps: int) -> float:
        """How much of the budget is spent: steps done of --steps, or the time since training started of
        the time left until the deadline, after progress0 of an earlier run resumed here."""
        by_time = 0.0
        if self.deadline != math.inf:
            share = min(1.0, (time.time() - self.t_train) / max(self.deadline - self.t_train, 1e-9))
            by_time = self.progress0 + (1 - self.progress0) * share
        return min(1.0, max(step / steps, by_time))

    def eta(self, seconds_per_step: float, steps_left: int) -> float:
        return max(0.0, min(seconds_per_step * steps_left, self.deadline - time.time()))

    def out_of_time(self) -> bool:
        return time.time() > self.deadline

    @contextlib.contextmanager
    def stop_on_signals(self):
        """Ctrl-C and SIGTERM set `signalled` instead of killing: the step in flight finishes first."""
        handlers = {sig: signal.signal(sig, lambda *_: setattr(self, "signalled", True))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def resume_command(argv, **changes) -> str:
    """The command that continues a run of train.py: its own flags, with --resume; changes: flags whose
    value is replaced (batch_size=4: --batch-size 4)."""
    flags = [a for a in argv if a != "--overwrite"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = ["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", str(world))] if world > 1 else ["python"]
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        if flag in flags:
            i = flags.index(flag)
            del flags[i:i + 2]
        flags += [flag, str(value)]
    return shlex.join([*launcher, "train.py", *flags, *([] if "--resume" in flags else ["--resume"])])


def stop_line(run, e: RuntimeError, argv) -> str | None:
    """The one line of a run stopped by out of memory, or by the loss of another process of the run
    (its collectives fail); None for another error."""
    from support.processes import is_peer_loss, lost_peer
    if isinstance(e, torch.OutOfMemoryError):  # the estimate was wrong, or another program took memory
        return out_of_memory(run, argv)
    return lost_peer(run, e, resume_command(argv)) if run.several and is_peer_loss(e) else None


def out_of_memory(run, argv) -> str:
    """The one line of a run that ran out of memory: where, how much was allocated, and what to do: after a
    checkpoint, the command that continues it at half the micro-batch and twice the micro-batches a step
    (the same rows a step; the k draws then no longer continue exactly as they would have)."""
    args = run.args
    held = (f", {torch.cuda.memory_allocated(args.device) / 2**30:.1f} GiB allocated of "
            f"{torch.cuda.get_device_properties(args.device).total_memory / 2**30:.1f}") if args.device.startswith("cuda") else ""
    what = f"out of memory at step {run.step + 1}{held}"
    if args.batch_size == 1:
        return f"{what}; the micro-batch is 1 already: use --checkpoint-activations on, or a device with more memory"
    smaller = dict(batch_size=args.batch_size // 2, grad_accum=args.grad_accum * args.batch_size // (args.batch_size // 2))
    if run.last_good_step is None:
        return (f"{what}; nothing was saved; try --batch-size {smaller['batch_size']} --grad-accum "
                f"{smaller['grad_accum']} (the same rows a step), or --checkpoint-activations on")
    return (f"{what}; {run.ckpt_path} holds step {run.last_good_step}; to continue at a smaller micro-batch (the same "
            f"rows a step): {resume_command(argv, **smaller)}")
