"""Where a training step's time goes: torch.profiler over a few steps of a train.py job, once the
frozen rows of their texts are kept (their first pass builds them, as the first pass over the data does).

    python -m scripts.profile_step                   # the cpu-hour recipe, reusing out/'s own answers
    python -m scripts.profile_step --steps 6 -- --recipe cpu-hour --amp none

Everything after `--` is train.py's command line; nothing is written.
"""
import argparse
import time

from torch.profiler import ProfilerActivity, profile

import train
from support.step_timing import step_without_update


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="steps profiled (from step --first on)")
    p.add_argument("--first", type=int, default=300)
    p.add_argument("train_args", nargs="*", help="train.py's arguments (after --)")
    a = p.parse_args(argv)
    args = train.get_args(a.train_args + ["--max-minutes", "600"], fresh_out=False)  # own answers in --out are reused
    run = train.setup(args)
    steps = range(a.first, a.first + a.steps)

    def step(s):  # a step's loss and backward, as train_step computes them; no update
        step_without_update(run, s, train.micro_batches, lambda b: train.batch_loss(run, b)[0].backward(), run.student)

    for s in steps:
        step(s)  # builds the frozen rows of these texts
    t0 = time.perf_counter()
    for s in steps:
        step(s)
    t1 = time.perf_counter()
    for s in steps:
        train.train_step(run, s)  # the same, with clipping and AdamW: the loop's step
    print(f"a step alone: {(t1 - t0) / len(steps):.3f} s; with clipping and AdamW (train_step) "
          f"{(time.perf_counter() - t1) / len(steps):.3f} s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for s in steps:
            step(s)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
