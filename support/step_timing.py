"""The two timings of a training step: which precision runs this very job faster (train.py's --amp
auto), and what an MTP step costs against a plain fine-tuning step (bench.py --train-step)."""
import torch.nn.functional as F

from support.optim import autocast, drop_frozen_copies
from support.processes import rank0_values
from support.timing import interleaved_seconds


def faster_precision(micro_batch, args, allowed_s: float, log, several: bool = False, model=None):
    """--amp auto on a CPU with fast bfloat16: time micro_batch() (a real one of the job: student,
    teacher, backward) in float32 and under bfloat16 autocast, after an untimed round of each, and set
    args.amp to the faster. A fast small product is not enough: autocast casts the frozen base again on
    every pass. The timing stops after allowed_s and decides by what it measured; with several
    processes, rank 0's timing decides for all."""
    def under(amp):
        def call(_round):
            args.amp = amp
            with autocast(args, model):
                micro_batch()
        return call
    seconds, cut = interleaved_seconds({"none": under("none"), "bfloat16": under("bfloat16")}, allowed_s=allowed_s)
    faster = min(seconds, key=seconds.get) if len(seconds) == 2 else "none"
    if several:
        faster = "bfloat16" if rank0_values(args.device, faster == "bfloat16")[0] else "none"
    args.amp = faster
    if faster == "none" and model is not None:
        drop_frozen_copies(model)
    log(describe_amp_choice(seconds, cut))


def describe_amp_choice(seconds: dict, cut: bool) -> str:
    """The log line of --amp auto's choice, from the seconds of a micro-batch per precision it timed."""
    matmuls = "bfloat16" if len(seconds) == 2 and seconds["bfloat16"] < seconds["none"] else "float32"
    if len(seconds) < 2:
        return f"precision: no time in the budget to time both: matmuls in {matmuls} (--amp auto)"
    return (f"precision: a micro-batch of this job took {1e3 * seconds['none']:.1f} ms in float32, "
            f"{1e3 * seconds['bfloat16']:.1f} ms under bfloat16 autocast: matmuls in {matmuls} (--amp auto"
            f"{', cut short by the time budget' if cut else ''})")


def mtp_step_cost(run, n_steps: int, micro_batches, batch_loss) -> float:
    """Seconds of an MTP step over seconds of a plain fine-tuning step (student forward + backward,
    next-token loss, every weight trained) on the same ground-truth rows, after a step of warm-up:
    the paper reports about 4/3 (docs/METHOD.md, "Training"). Nothing is updated. run: train.py's Run;
    micro_batches(run, step) and batch_loss(run, batch) are train.py's."""
    frozen = [p for p in run.student.parameters() if not p.requires_grad]

    def plain(b):
        tokens = b.idx[:, :b.idx.size(1) - b.fill.size(1)]
        for p in frozen:
            p.requires_grad_(True)
        logits = run.student(tokens)[:, :-1].float()
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        for p in frozen:
            p.requires_grad_(False), setattr(p, "grad", None)

    def mtp(b):
        batch_loss(run, b)[0].backward()

    steps = {"mtp": lambda step: step_without_update(run, step, micro_batches, mtp, run.student),
             "plain": lambda step: step_without_update(run, step, micro_batches, plain)}  # no frozen weights to cast
    seconds, _ = interleaved_seconds(steps, n_steps, device=run.args.device)
    ratio = seconds["mtp"] / seconds["plain"]
    run.log(f"bench: {n_steps} steps | mtp {seconds['mtp']:.3f} s/step | plain {seconds['plain']:.3f} s/step | "
            f"ratio {ratio:.2f} (the paper: about 1.33)")
    return ratio


def step_without_update(run, step, micro_batches, backward, model=None):
    """A training step's work without its update: backward(b) on each micro-batch of the step under the
    run's autocast (given the model, with its frozen weights cast once), then the gradients dropped."""
    with autocast(run.args, model):
        for b in micro_batches(run, step):
            backward(b)
    run.optimizer.zero_grad(set_to_none=True)
