"""The learning curve of a run: tokens per pass of ConfAdapt(0.9) and --verify against training minutes.

    python train.py --out out &                                # the main job
    python -m scripts.learning_curve watch out curve/          # beside it: a copy of each checkpoint it writes
    python -m scripts.learning_curve measure curve/            # afterwards: every copy on held-out problems

    python train.py --out out --resume --max-minutes 90 &      # a run continued, minutes counted on from 57.5
    python -m scripts.learning_curve watch out curve2/ --start-minute 57.5
    python -m scripts.learning_curve measure curve/ curve2/    # one curve from both folders

`watch` keeps a copy of OUT/ckpt.pt each time the run writes one (every --save-every steps), named by
its step and the minutes since the run began (plus --start-minute, for a resumed run), and stops when
the run has ended. `measure` rebuilds the model of each copy in its folders and decodes GSM8K test
problems the run never saw (from --offset 200 on) with the whole block of k_max masks in every pass:
tokens per pass then depend on the weights alone, not on the machine's pass costs. It prints a table
and writes curve.json (and curve.png with matplotlib) in the first folder; --own-answers OUT/self_answers.jsonl
measures on the run's own training questions instead (curve_own_answers.json).
"""
import argparse
import fcntl
import importlib.util
import json
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from data import gsm8k_prompt, load_gsm8k
from decode import generate
from support.tokenizer import encode_prompt
from lora import add_lora
from support.weights import load_model

SNAPSHOT = re.compile(r"ckpt_step(\d+)_min([\d.]+)\.pt")


def watch(out: Path, curve: Path, poll_s: float = 10.0, start_minute: float = 0.0):
    curve.mkdir(parents=True, exist_ok=True)
    waited = time.time()
    while not run_going(out):  # the run may still be starting
        if time.time() - waited > 120:
            raise ValueError(f"no train.py is running on {out}")
        time.sleep(1)
    t0, seen = (out / ".lock").stat().st_mtime, None  # written when the run began: minutes count from there
    while True:
        ckpt = out / "ckpt.pt"
        if ckpt.exists() and ckpt.stat().st_mtime != seen:
            seen = ckpt.stat().st_mtime  # the run replaces ckpt.pt whole (a rename): a copy is never torn
            step = torch.load(ckpt, map_location="cpu", weights_only=True)["step"]
            name = f"ckpt_step{step}_min{start_minute + (seen - t0) / 60:.1f}.pt"
            shutil.copy(ckpt, curve / name)
            print(f"kept {curve / name}", flush=True)
        if not run_going(out):
            return
        time.sleep(poll_s)


def run_going(out: Path) -> bool:
    """Whether a train.py still holds OUT (support/files.py, hold_folder: a lock the kernel drops when it ends)."""
    if not (out / ".lock").exists():
        return False
    with open(out / ".lock") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def model_at(snapshot: Path):
    """The student of a checkpoint: its --init, with gated LoRA as the run had it, and the saved weights."""
    state = torch.load(snapshot, map_location="cpu", weights_only=True)
    args = state["args"]
    model = load_model(args["init"], dtype=getattr(torch, args["dtype"]))
    if args["lora"]:
        add_lora(model, args["lora"], args["lora_alpha"], base=args["init"], layers=args["lora_layers"] or None)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if unexpected or any("lora" in name for name in missing):
        raise ValueError(f"{snapshot} does not fit the model its arguments build ({unexpected or missing})")
    model.cfg.k_max = args["k_max"]
    return model.float().eval(), state["step"]


def tokens_per_pass(model, prompts, max_new_tokens: int) -> dict:
    stop, k_max = model.tokenizer.stop_ids, model.cfg.k_max
    totals = {"ConfAdapt(0.9)": [0, 0], "--verify": [0, 0]}
    for prompt in prompts:
        for name, r in (("ConfAdapt(0.9)", generate(model, prompt, max_new_tokens, threshold=0.9, k_max=k_max,
                                                    stop_ids=stop)),
                        ("--verify", generate(model, prompt, max_new_tokens, verify=True, k_max=k_max, stop_ids=stop))):
            totals[name][0] += len(r.tokens)
            totals[name][1] += r.passes
    return {name: tokens / passes for name, (tokens, passes) in totals.items()}


def measure(curves: list[Path], n_prompts: int, offset: int, max_new_tokens: int, own_answers: Path | None = None):
    """own_answers: decode the first questions of this self_answers.jsonl (the run's own training texts)
    instead of held-out problems: how much of what it learned holds on text it has not read."""
    snapshots = sorted((float(m.group(2)), int(m.group(1)), p) for curve in curves for p in curve.iterdir()
                       if (m := SNAPSHOT.fullmatch(p.name)))
    if not snapshots:
        raise ValueError(f"{', '.join(map(str, curves))} hold no ckpt_step*_min*.pt (made by: learning_curve watch)")
    curve = curves[0]
    rows = load_gsm8k("test")[offset:offset + n_prompts]
    what, name = f"GSM8K test {offset}..{offset + len(rows) - 1}", "curve"
    if own_answers:
        answers = [a for a in map(json.loads, own_answers.read_text().splitlines()[1:]) if "ids" in a][:n_prompts]
        what, name = f"the first {len(answers)} training questions of {own_answers}", "curve_own_answers"
    points = []
    print(f"tokens per pass, whole block, on {what}:")
    for minute, step, path in snapshots:
        model, step = model_at(path)
        prompts = ([a["ids"][:a["prompt_len"]] for a in answers] if own_answers else
                   [encode_prompt(model.tokenizer, gsm8k_prompt(r["question"]), True) for r in rows])
        with torch.no_grad():
            point = {"minute": minute, "step": step, **tokens_per_pass(model, prompts, max_new_tokens)}
        points.append(point)
        print(f"  minute {minute:5.1f}  step {step:5d}  ConfAdapt(0.9) {point['ConfAdapt(0.9)']:.2f}  "
              f"--verify {point['--verify']:.2f}", flush=True)
    report = {"prompts": what, "max_new_tokens": max_new_tokens, "points": points}
    (curve / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    if importlib.util.find_spec("matplotlib"):
        plot(points, curve / f"{name}.png")


def plot(points, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in ("--verify", "ConfAdapt(0.9)"):
        ax.plot([p["minute"] for p in points], [p[name] for p in points], marker="o", label=name)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("training minutes (from the start of the run)")
    ax.set_ylabel("tokens per pass")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("watch", help="keep a copy of each checkpoint a running train.py writes")
    w.add_argument("out", type=Path)
    w.add_argument("curve", type=Path)
    w.add_argument("--start-minute", type=float, default=0.0, help="a resumed run: the minutes of the run it continues")
    m = sub.add_parser("measure", help="tokens per pass of every copy")
    m.add_argument("curves", type=Path, nargs="+", help="folders of kept checkpoints (of one run)")
    m.add_argument("--prompts", type=int, default=10)
    m.add_argument("--offset", type=int, default=200, help="the first GSM8K test problem (the run never sees 200..)")
    m.add_argument("--max-new-tokens", type=int, default=128)
    m.add_argument("--own-answers", type=Path, help="a run's self_answers.jsonl: decode its training questions instead")
    args = p.parse_args(argv)
    try:
        if args.command == "watch":
            watch(args.out, args.curve, start_minute=args.start_minute)
        else:
            measure(args.curves, args.prompts, args.offset, args.max_new_tokens, args.own_answers)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
