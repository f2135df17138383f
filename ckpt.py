"""The training checkpoint, OUT/ckpt.pt: written only from a model that works, read back by --resume,
and put in place as the model when a run diverges. Every function takes train.py's Run.

Model and optimizer state go through torch.distributed.checkpoint's full state dicts, so that one
file serves one process, DDP and FSDP alike.
"""
import json

import torch

from model import Transformer, rope_frequencies
from optim import autocast
from weights import save_model, write_file_atomically

# settings that shape a run: --resume refuses a checkpoint written with other values
SHAPING = ("init", "data", "format", "k_max", "batch_size", "grad_accum", "seq_len", "branch_every",
           "branch_from", "self_answers", "loss", "k_weights", "seed", "dtype", "lora", "lora_alpha")


def gather_state(student, optimizer):
    """Model and optimizer state as whole tensors keyed by name (collected from every process when
    the student is sharded with FSDP, so every process must call this)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_floating_point(t))


class Diverged(ValueError):
    """Training went where nothing should be saved: non-finite steps in a row, or weights that give
    non-finite logits. main() puts the last good checkpoint in place as the model."""

    def __init__(self, step: int, why: str):
        super().__init__(why)
        self.step, self.why = step, why


@torch.no_grad()
def model_works(run) -> bool:
    """Does a probe forward (the start of the first training text, then k_max - 1 masks) give
    finite logits? Finite weights are not enough: enormous ones overflow in the forward pass."""
    ids = run.examples[0][0][:64] + [run.student.cfg.mask_id] * (run.args.k_max - 1)
    training = run.student.training
    run.student.eval()
    with autocast(run.args):  # every process calls it: an FSDP-sharded student needs them all
        logits = run.student(torch.tensor([ids], device=run.args.device))
    run.student.train(training)
    return bool(torch.isfinite(logits).all())


def save_checkpoint(run, step):
    """OUT/ckpt.pt, replaced atomically, and only from a model that works (model_works)."""
    if not model_works(run):
        raise Diverged(step, "the model gives non-finite logits")
    model_state, optim_state = gather_state(run.student, run.optimizer)
    if run.master:
        if not all_finite(model_state.values()):
            raise Diverged(step, "the weights are not finite")
        state = {"model": model_state, "optimizer": optim_state, "step": step, "progress": run.progress,
                 "args": vars(run.args)}
        nbytes = 2 * sum(t.numel() * t.element_size() for t in model_state.values())
        write_file_atomically(run.ckpt_path, lambda tmp: torch.save(state, tmp), nbytes)
    run.last_good_step = step
    return model_state


def restore_last_good(run, diverged: Diverged):
    """After a run diverged: OUT/model from the last checkpoint that passed model_works (this run's
    or the one it resumed), then the one-line error that says which step it holds."""
    what = f"{diverged.why} at step {diverged.step}"
    if run.last_good_step is None:
        raise ValueError(f"{what}; nothing was saved from this run (try a lower --lr)")
    run.step = load_checkpoint(run)
    model_state = gather_state(run.student, run.optimizer)[0]
    if run.master:
        save_final_model(run, run.step, model_state)
    raise ValueError(f"{what}; {run.out / 'model'} holds step {run.step}, the last good checkpoint "
                     f"(try a lower --lr)")


def load_checkpoint(run):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    path = run.ckpt_path
    if not path.exists():
        raise ValueError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # our own file, tensors only
        saved = state["args"]
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}); remove it or "
                         f"use --overwrite to start afresh") from None
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {getattr(run.args, k)}" for k in SHAPING
               if saved.get(k) != getattr(run.args, k)]
    if changed:
        raise ValueError(f"--resume: {path} was written with other settings ({'; '.join(changed)}); "
                         f"use the same ones, or --overwrite to start afresh")
    if run.args.amp == "auto":  # a resumed run computes in the precision it started in
        run.args.amp = saved.get("amp", "none")
    set_state_dict(run.student, run.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    run.progress = state.get("progress", 0.0)  # where the learning-rate decay continues from
    return state["step"]


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
