"""The training checkpoint, OUT/ckpt.pt: written only from a model that works, read back by --resume,
and put in place as the model when a run diverges. Every function takes train.py's Run.

Model and optimizer state go through torch.distributed.checkpoint's full state dicts, so that one
file serves one process, data parallel ones and FSDP alike.
"""
import json
import math
import shutil
from pathlib import Path

import torch

from model import Transformer, rope_frequencies
from support.files import hold_folder, recover_dir, tensors_sha256, write_file_atomically
from support.optim import return_freed_memory
from support.weights import save_model

# settings that shape a run: --resume refuses a checkpoint written with other values
SHAPING = ("init", "data", "format", "k_max", "batch_size", "grad_accum", "seq_len", "branch_every",
           "branch_from", "self_answers", "loss", "k_weights", "seed", "dtype", "lora", "lora_alpha",
           "lora_layers")


def prepare_out(out: Path, start_afresh: bool):
    """The output folder before a run: a save that a kill interrupted leaves the last complete model;
    start_afresh (--overwrite) removes an earlier run's checkpoint and model. The run holds the folder
    from here on: another run that is still going stops this one before it touches a file."""
    hold_folder(out)
    recover_dir(out / "model")
    if start_afresh:
        (out / "ckpt.pt").unlink(missing_ok=True)
        shutil.rmtree(out / "model", ignore_errors=True)


def gather_state(student, optimizer, sharded: bool):
    """Model and optimizer state as whole tensors keyed by name. Unsharded, the tensors themselves, where
    they live: torch.save copies them to host memory one storage at a time, so writing the state of a
    full fine-tune on a GPU never holds all of it in host memory. Sharded with FSDP, collected from every
    process (every process must call this) into host memory on the first."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=sharded))


def tensor_bytes(state, seen=None) -> int:
    """The bytes of every tensor in a nested state (model and optimizer), a storage that two names
    share (tied embeddings) once: what torch.save writes of it."""
    seen = set() if seen is None else seen
    if isinstance(state, torch.Tensor):
        storage = state.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    values = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else ()
    return sum(tensor_bytes(v, seen) for v in values)


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_floating_point(t))


class Diverged(ValueError):
    """Training went where nothing should be saved: non-finite steps in a row, or weights that give
    non-finite logits. main() puts the last good checkpoint in place as the model."""

    def __init__(self, step: int, why: str):
        super().__init__(why)
        self.step, self.why = step, why


# A checkpoint must come from a model that still does its job, not merely one that is finite: its loss
# on a fixed probe batch may not jump far above that of the last good checkpoint. Loss spikes are what
# large runs watch for (PaLM, Chowdhery et al. 2022, section 5.1, restarts from a checkpoint before
# one). The bound allows 1.5x plus 0.1 nats: on a fixed batch a healthy run's probe loss falls or
# drifts by a few percent between checkpoints (docs/LOG.md, "Loss spikes"), while one diverging
# step multiplies it.
SPIKE_FACTOR, SPIKE_MARGIN = 1.5, 0.1


def spike(now: dict, good: dict) -> str | None:
    """What jumped, if a probe result is past the bound set by the last good checkpoint's."""
    for key, what in (("loss", "probe loss"), ("teacher", "teacher loss at the cut")):
        if now[key] > SPIKE_FACTOR * good[key] + SPIKE_MARGIN:
            return f"the {what} jumped from {good[key]:.3f} to {now[key]:.3f}"
    return None


def save_checkpoint(run, step, now: dict):
    """OUT/ckpt.pt, replaced atomically, and only from a model that still works: now, its loss on the
    fixed probe batch (train.probe), finite and within the bound of the last good checkpoint's (spike)."""
    if not all(map(math.isfinite, now.values())):
        raise Diverged(step, "the model gives non-finite logits")
    jumped = spike(now, run.good_probe)
    if jumped:
        raise Diverged(step, f"{jumped} since step {run.last_good_step or 0}")
    model_state, optim_state = gather_state(run.student, run.optimizer, run.args.fsdp)
    if run.master:
        if not all_finite(model_state.values()):
            raise Diverged(step, "the weights are not finite")
        state = {"model": model_state, "optimizer": optim_state, "step": step, "progress": run.progress,
                 "args": vars(run.args), "world": run.world}
        state["sha256"] = tensors_sha256(state)  # a byte that changes on disk later is caught by --resume
        nbytes = tensor_bytes(state)  # and 1% and 64 KiB for the archive's own records
        write_file_atomically(run.ckpt_path, lambda tmp: torch.save(state, tmp), nbytes + nbytes // 100 + (64 << 10))
    run.log(f"checkpoint step {step} | probe loss {now['loss']:.3f}, teacher loss {now['teacher']:.3f} "
            f"(last good, step {run.last_good_step or 0}: {run.good_probe['loss']:.3f}, {run.good_probe['teacher']:.3f})")
    run.last_good_step, run.good_probe = step, now
    return_freed_memory()  # a step's freed buffers, kept by the C heap otherwise
    return model_state


def restore_last_good(run, diverged: Diverged) -> str:
    """After a run diverged: OUT/model from the last checkpoint that passed the probe (this run's or the
    one it resumed), if there is one. Returns the one-line error that says which step it holds."""
    what = f"{diverged.why} at step {diverged.step}"
    if run.last_good_step is None:
        return f"{what}; nothing was saved from this run (try a lower --lr)"
    run.step = load_checkpoint(run)
    model_state = gather_state(run.student, run.optimizer, run.args.fsdp)[0]
    if run.master:
        save_final_model(run, run.step, model_state)
    return f"{what}; {run.out / 'model'} holds step {run.step}, the last good checkpoint (try a lower --lr)"


def load_checkpoint(run):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    path = run.ckpt_path
    if not path.exists():
        raise ValueError(f"--resume: no checkpoint at {path}")
    try:
        # our own file, tensors only; mapped, so that its tensors reach the model without a whole copy in memory
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        saved, digest = state["args"], state.pop("sha256", None)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}); remove it or "
                         f"use --overwrite to start afresh") from None
    if digest is not None and digest != tensors_sha256(state):
        raise ValueError(f"{path} does not match its sha256: it changed after it was written; remove it or "
                         f"use --overwrite to start afresh")
    moved = regrouped(saved, state.get("world", 1), run)
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {getattr(run.args, k)}" for k in SHAPING
               if saved.get(k) != getattr(run.args, k) and not (moved and k in ("batch_size", "grad_accum"))]
    if changed:
        raise ValueError(f"--resume: {path} was written with other settings ({'; '.join(changed)}); "
                         f"use the same ones, or --overwrite to start afresh")
    if moved:
        run.log(moved)
    if run.args.amp == "auto":  # a resumed run computes in the precision it started in
        run.args.amp = saved.get("amp", "none")
    set_state_dict(run.student, run.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    run.progress = state.get("progress", 0.0)  # where the learning-rate decay continues from
    return state["step"]


def regrouped(saved: dict, world: int, run) -> str | None:
    """A resume whose steps take the same rows as the checkpoint's (written with `saved` args on `world`
    processes), in other micro-batches or on another number of processes: the line that says so."""
    a = run.args
    before, now = (world, saved.get("batch_size"), saved.get("grad_accum")), (run.world, a.batch_size, a.grad_accum)
    if before == now or before[0] * before[1] * before[2] != now[0] * now[1] * now[2]:
        return None
    # the k of a micro-batch is drawn by its index in the whole step: the same micro-batches draw the same k
    draws = "the k draws continue exactly" if before[1] == now[1] else "the k drawn per micro-batch no longer continue"
    return (f"--resume on {now[0]} process(es) x micro-batch {now[1]} x {now[2]} a step (was {before[0]} x {before[1]} "
            f"x {before[2]}): the same rows a step; {draws}")


def save_final_model(run, step, model_state):
    """The final Hugging Face folder (model.safetensors, config.json, tokenizer, train_args.json),
    from model_state: what save_checkpoint gathered and checked to be finite just before."""
    final = run.student
    if run.args.fsdp:  # a plain copy of the gathered weights to write out
        with torch.device("meta"):
            final = Transformer(run.student.cfg)
        final.load_state_dict(model_state, assign=True)
        if final.cfg.tie_embeddings:
            final.lm_head.weight = final.embed_tokens.weight
        final.inv_freq = rope_frequencies(final.cfg)
        final.tokenizer = run.tok
    final.cfg.k_max = run.args.k_max  # decode.py uses as many masks as the model was trained for
    save_model(final, run.out / "model", {"train_args.json": json.dumps(vars(run.args), indent=2) + "\n"})
    run.log(f"saved {run.out / 'model'} (step {step})")
