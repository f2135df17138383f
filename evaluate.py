"""Evaluate decoding strategies of one or more models on GSM8K, BBH, HumanEval or a JSONL of prompts.

    python evaluate.py --tasks gsm8k,bbh --limit 20 --eval-threshold 0.9 --eval-k 2
    python evaluate.py --init smollm2-135m out/model --tasks gsm8k,bbh,humaneval --limit 10 --sweep
    python evaluate.py --merge eval-0.json eval-20.json ...   # one table from --json reports of --offset chunks

For every task and strategy (k=1, static k, ConfAdapt(t)) it reports: accuracy where an answer can
be checked; acceleration (tokens per forward pass); tokens/s; how often the text, and the final
answer, equal the same model's k=1 output; and the teacher loss, the mean negative log-likelihood
per generated token that the original (reference) model gives the text, which is how the paper
measures what multi-token decoding costs in quality. The reference model's own k=1 output is
reported beside them as the row "reference k=1". --sweep adds a figure (plot() below).
"""
import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data.evalsets import humaneval_program, is_correct, load_eval_tasks, read_answer
from decode import generate
from support.cli import add_cpu_kernels_arg, check_decoding_args
from support.sampling import add_sampling_args, check_sampling_args, sampler_of
from support.stream import strategy_name
from support.tokenizer import encode_prompt
from support.weights import default_init, load
from distill import teacher_nll
from support.cli import ArgumentParser
from support.weights import default_reference, load_model

SWEEP_K = (1, 2, 3, 4)
SWEEP_THRESHOLDS = (0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5)
REFERENCE_ROW = "reference k=1"
FIGURE_SIZE, FIGURE_DPI = (12, 5), 100  # inches, dots per inch: a 1200 x 500 PNG


@dataclass
class Tally:
    """Sums over the problems of one task for one strategy."""
    problems: int = 0
    checked: int = 0        # problems with a checkable answer (HumanEval: only with --exec-code)
    correct: int = 0
    tokens: int = 0         # new tokens, the stop token included
    passes: int = 0
    seconds: float = 0.0
    same_text: int = 0      # problems whose new tokens equal the same model's k=1 tokens
    answers: int = 0        # problems where a final answer can be read (GSM8K, BBH, JSONL)
    same_answer: int = 0
    nll: float = 0.0        # reference model's negative log-likelihood, summed over the new tokens
    drafts_fed: int = 0     # verify: drafts fed as real inputs, and those the model confirmed
    drafts_accepted: int = 0

    def add(self, other: "Tally") -> "Tally":
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)
        return self

    def summary(self) -> dict:
        ratio = lambda a, b: a / b if b else None  # noqa: E731
        return {"problems": self.problems, "accuracy": ratio(self.correct, self.checked),
                "acceleration": ratio(self.tokens, self.passes),  # docs/METHOD.md, "Decoding": tokens / passes
                "tokens_per_s": ratio(self.tokens, self.seconds),
                "text_agreement_with_k1": ratio(self.same_text, self.problems),
                "answer_agreement_with_k1": ratio(self.same_answer, self.answers),
                "teacher_loss": ratio(self.nll, self.tokens), "new_tokens": self.tokens,
                "draft_acceptance": ratio(self.drafts_accepted, self.drafts_fed),
                "sums": asdict(self)}  # what merge_reports adds up


# -----------------------------------------------------------------------------
# running generated code, and the reference model (the teacher loss: distill.teacher_nll)

def run_program(source: str, timeout: float) -> bool:
    """Run Python source in a fresh interpreter in an empty temporary folder: True if it exits
    cleanly within `timeout` seconds. Past that its whole process group is killed: failed."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "program.py"
        path.write_text(source, encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-I", str(path)], cwd=folder, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            return proc.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False


def load_reference(init: str, device: str, dtype: str | None):
    """The original model as it is: no <MTP> row added, so its softmax is over its own vocabulary."""
    return load_model(init, device=device, dtype=getattr(torch, dtype) if dtype else None, add_mask=False)


# -----------------------------------------------------------------------------
# evaluation of one model

def strategies_of(args, k_max: int) -> list[tuple[int, float | None]]:
    """(k, threshold) pairs, k=1 first: every agreement is measured against it."""
    if args.sweep:
        return [(k, None) for k in SWEEP_K if k <= k_max] + [(1, t) for t in SWEEP_THRESHOLDS]
    for k in args.eval_k:
        if not 1 <= k <= k_max:
            raise ValueError(f"--eval-k {k} is outside 1..k_max ({k_max})")
    return [(1, None)] + [(k, None) for k in dict.fromkeys(args.eval_k) if k != 1] + \
        [(1, t) for t in dict.fromkeys(args.eval_threshold)]


def evaluate_model(model, tok, reference, k1_is_reference: bool, tasks, args, k_max: int) -> dict:
    """Tallies per task and strategy, summed per domain and over everything. k1_is_reference: the
    model's k=1 decoding is the reference's (the model itself, or a gated adapter on it), so the
    reference row is not decoded again."""
    strategies = strategies_of(args, k_max)
    sampler = sampler_of(args, model.embed_tokens.weight.device)  # None: greedy
    verify = args.eval_verify or args.sweep  # lossless: its text must equal k=1's (decode.generate_verify)
    names = [strategy_name(k, t) for k, t in strategies] + (["verify"] if verify else []) + [REFERENCE_ROW]
    per_task = {}
    for task, problems in tasks.items():
        tallies = {name: Tally() for name in names}
        for problem in problems:
            prompt = encode_prompt(tok, problem.prompt, args.chat and problem.chat)
            results = {strategy_name(k, t): generate(model, prompt, args.max_new_tokens, k=k, threshold=t,
                                                     k_max=k_max, stop_ids=tok.stop_ids, sampler=sampler)
                       for k, t in strategies}
            if verify:
                results["verify"] = generate(model, prompt, args.max_new_tokens, k_max=k_max, verify=True,
                                             stop_ids=tok.stop_ids, sampler=sampler)
            results[REFERENCE_ROW] = results["k=1"] if k1_is_reference else \
                generate(reference, prompt, args.max_new_tokens, stop_ids=tok.stop_ids, sampler=sampler)
            texts = {name: tok.decode([t for t in r.tokens if t not in tok.stop_ids]) for name, r in results.items()}
            k1_tokens, k1_answer = results["k=1"].tokens, read_answer(problem.kind, texts["k=1"])
            for name, r in results.items():
                text = texts[name]
                answer = read_answer(problem.kind, text)
                correct = is_correct(problem, text)
                if problem.kind == "code" and args.exec_code:
                    correct = run_program(humaneval_program(problem, text), args.exec_timeout)
                tallies[name].add(Tally(
                    problems=1, checked=correct is not None, correct=bool(correct), tokens=len(r.tokens),
                    passes=r.passes, seconds=r.seconds, same_text=r.tokens == k1_tokens,
                    answers=k1_answer is not None, same_answer=k1_answer is not None and answer == k1_answer,
                    nll=teacher_nll(reference, prompt, r.tokens), drafts_fed=r.drafts_fed,
                    drafts_accepted=r.drafts_accepted))
        per_task[task] = tallies
        print(f"{task} ({len(problems)}): " + " | ".join(
            f"{name} {describe(t.summary())}" for name, t in tallies.items()), file=sys.stderr, flush=True)
    per_domain = {}
    for task, tallies in per_task.items():
        into = per_domain.setdefault(task.partition(":")[0], {name: Tally() for name in names})
        for name, t in tallies.items():
            into[name].add(t)
    overall = {name: Tally() for name in names}
    for tallies in per_task.values():
        for name, t in tallies.items():
            overall[name].add(t)
    summarise = lambda table: {name: t.summary() for name, t in table.items()}  # noqa: E731
    return {"tasks": {task: summarise(t) for task, t in per_task.items()},
            "domains": {d: summarise(t) for d, t in per_domain.items()}, "all": summarise(overall)}


def describe(s: dict) -> str:
    acc = "" if s["accuracy"] is None else f"acc {s['accuracy']:.3f} "
    return f"{acc}accel {s['acceleration']:.2f} loss {s['teacher_loss'] or 0:.3f}"


# -----------------------------------------------------------------------------
# the command: every model, a report, a figure

def run_eval(args) -> dict:
    """Evaluate each --init model on --eval; print the report (and write it and its figure)."""
    out_json = Path(args.out_json) if args.out_json else Path("eval.json") if args.sweep else None
    if out_json:
        require_matplotlib()
        out_json.parent.mkdir(parents=True, exist_ok=True)
    tasks = load_eval_tasks(args.tasks, args.limit, args.offset)
    references = {}  # name -> model: tuned models that share an original load it once
    report = {"eval": args.tasks, "limit": args.limit, "offset": args.offset, "max_new_tokens": args.max_new_tokens,
              "exec_code": args.exec_code, "problems": {task: len(p) for task, p in tasks.items()}, "models": []}
    for init in args.init or [default_init()]:
        model, tok = load(init, args.device, args.dtype, args.cpu_kernels)
        k_max = args.k_max or model.cfg.k_max or 16
        ref_name = args.reference or default_reference(init, model)
        if ref_name not in references:
            references[ref_name] = load_reference(ref_name, args.device, args.dtype)
        # a gated adapter leaves real tokens to its base (model.add_lora), so k=1 is the base's k=1
        k1_is_reference = ref_name == init or (getattr(model, "lora", None) or {}).get("base") == ref_name
        result = evaluate_model(model, tok, references[ref_name], k1_is_reference, tasks, args, k_max)
        report["models"].append({"model": init, "reference": ref_name, "k_max": k_max, **result})
        del model
    if args.json or not out_json:
        print(json.dumps(report, indent=None if args.json else 2))
    if not args.json:
        print_table(report)
    if out_json:
        write_report(report, out_json)
    return report


def write_report(report: dict, out_json: Path):
    """The report as JSON, and its figure beside it (.png)."""
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out_json.with_suffix(".png"))
    print(f"wrote {out_json} and {out_json.with_suffix('.png')}", file=sys.stderr)


def print_table(report: dict):
    cols = ("problems", "accuracy", "acceleration", "tokens_per_s", "text_agreement_with_k1",
            "answer_agreement_with_k1", "teacher_loss", "draft_acceptance")
    heads = ("problems", "accuracy", "acceleration", "tokens/s", "same text", "same answer", "teacher loss",
             "drafts kept")
    print(f"{'model':<32} {'strategy':<16} " + " ".join(f"{h:>12}" for h in heads), file=sys.stderr)
    for m in report["models"]:
        for name, s in m["all"].items():
            cells = " ".join(f"{'-' if s[c] is None else s[c] if c == 'problems' else format(s[c], '.3f'):>12}"
                             for c in cols)
            print(f"{short_name(m['model'])[-32:]:<32} {name:<16} {cells}", file=sys.stderr)


def merge_reports(reports: list[dict]) -> dict:
    """One report from several on disjoint problems (--offset chunks run side by side): the sums of
    their tallies, model by model, strategy by strategy (over the reports that have the strategy:
    its "problems" says how many)."""
    merged = {**reports[0], "offset": min(r["offset"] for r in reports), "limit": None, "problems": {}}
    for r in reports:
        for task, n in r["problems"].items():
            merged["problems"][task] = merged["problems"].get(task, 0) + n
    merged["models"] = []
    for models in zip(*(r["models"] for r in reports)):
        if len({m["model"] for m in models}) > 1:
            raise ValueError(f"the reports evaluate different models: {sorted({m['model'] for m in models})}")
        model = {**models[0]}
        for part in ("tasks", "domains"):  # tables keyed by task or domain, then by strategy
            keys = dict.fromkeys(key for m in models for key in m[part])
            model[part] = {key: sum_tables([m[part][key] for m in models if key in m[part]]) for key in keys}
        model["all"] = sum_tables([m["all"] for m in models])
        merged["models"].append(model)
    return merged


def sum_tables(tables: list[dict]) -> dict:
    """Strategy -> summary tables summed, strategy by strategy, in their first order."""
    totals = {}
    for table in tables:
        for name, s in table.items():
            totals.setdefault(name, Tally()).add(Tally(**s["sums"]))
    return {name: t.summary() for name, t in totals.items()}


# -----------------------------------------------------------------------------
# the figure: quality against acceleration, and acceleration per domain

def require_matplotlib():  # the one package only the figure needs
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("the figure needs matplotlib: pip install matplotlib")


def short_name(init: str) -> str:
    """A model's name for a legend: a preset or hub id as is, a file's name, a folder's last two parts."""
    path = Path(init)
    return init if not path.exists() else path.name if path.is_file() else "/".join(path.parts[-2:])


MIN_PROBLEMS_FOR_ACCURACY = 50  # below this, one problem more or less solved is noise


def quality_measure(report: dict) -> tuple[str, str]:
    """Accuracy if every model has it, over enough problems, and it is not the same everywhere
    (all zero says nothing), else the teacher loss."""
    accs = [s["accuracy"] for m in report["models"] for s in m["all"].values()]
    enough = all(s["problems"] >= MIN_PROBLEMS_FOR_ACCURACY for m in report["models"] for s in m["all"].values())
    if None not in accs and len(set(accs)) > 1 and enough:
        return "accuracy", "accuracy (checkable problems)"
    return "teacher_loss", "teacher loss: reference NLL per token (lower is better)"


def plot(report: dict, path: Path):
    require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    measure, label = quality_measure(report)
    fig, (quality, domains) = plt.subplots(1, 2, figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    drawn_references = set()
    for i, m in enumerate(report["models"]):
        rows, colour = m["all"], f"C{i}"
        static = sorted((n for n in rows if n.startswith("k=")), key=lambda n: int(n[2:]))
        adaptive = ["k=1"] + sorted((n for n in rows if n.startswith("ConfAdapt")),
                                    key=lambda n: -float(n[10:-1]))
        for family, names, style in (("static k", static, "-o"), ("ConfAdapt", adaptive, "--^")):
            if len(names) < 2:
                continue
            xs, ys = [rows[n]["acceleration"] for n in names], [rows[n][measure] for n in names]
            quality.plot(xs, ys, style, color=colour, label=f"{short_name(m['model'])}: {family}")
            for n, x, y in zip(names[1:], xs[1:], ys[1:]):
                quality.annotate(n[10:-1] if n.startswith("ConfAdapt") else n, (x, y), textcoords="offset points",
                                 xytext=(4, 4), fontsize=7, color=colour)
        if "verify" in rows:  # lossless: the quality of k=1 at its own acceleration
            v = rows["verify"]
            quality.plot([v["acceleration"]], [v[measure]], "D", color=colour, markersize=8,
                         label=f"{short_name(m['model'])}: verify (lossless)")
        ref = rows[REFERENCE_ROW]
        if m["reference"] not in drawn_references:
            drawn_references.add(m["reference"])
            quality.plot([ref["acceleration"]], [ref[measure]], "*", color="black", markersize=12,
                         label=f"original k=1 ({short_name(m['reference'])})")
    quality.set_xlabel("acceleration (tokens per forward pass)")
    quality.set_ylabel(label)
    quality.set_title("quality against acceleration")
    quality.legend(fontsize=7)
    quality.grid(alpha=0.3)
    # panel 2: acceleration per domain at one ConfAdapt threshold, a bar per model
    pick = "ConfAdapt(0.9)"
    names = list(report["models"][0]["all"])
    if pick not in names:
        pick = next((n for n in names if n.startswith("ConfAdapt")), names[-1])
    all_domains = list(dict.fromkeys(d for m in report["models"] for d in m["domains"]))
    width = 0.8 / len(report["models"])
    for i, m in enumerate(report["models"]):
        heights = [m["domains"][d][pick]["acceleration"] if d in m["domains"] else 0 for d in all_domains]
        domains.bar([j + (i - (len(report["models"]) - 1) / 2) * width for j in range(len(all_domains))], heights,
                    width, color=f"C{i}", label=short_name(m["model"]))
    domains.set_xticks(range(len(all_domains)), all_domains)
    domains.axhline(1.0, color="gray", linewidth=0.8)
    domains.set_ylabel(f"acceleration at {pick}")
    domains.set_title("acceleration per domain")
    domains.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)


# -----------------------------------------------------------------------------
# the command line

def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="gsm8k", help="comma-separated gsm8k, bbh, bbh:<task>, humaneval, or JSONL "
                   "files of prompt (or question) rows with an optional answer (default gsm8k)")
    p.add_argument("--init", nargs="+", default=None, help="the models to compare: presets, hub repo ids, HF "
                   "directories, .gguf files or adapter folders (default: out/model if train.py wrote one, "
                   "else smollm2-135m)")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each task (each BBH task)")
    p.add_argument("--offset", type=int, default=0, help="skip the first N problems of each task (to split a run)")
    p.add_argument("--eval-k", type=int, nargs="*", default=[], help="static k values to evaluate besides k=1")
    p.add_argument("--eval-threshold", type=float, nargs="*", default=[0.9], help="ConfAdapt thresholds to evaluate")
    p.add_argument("--eval-verify", action="store_true", help="add a --verify row (always with --sweep)")
    p.add_argument("--sweep", action="store_true", help="k=1, static k=2..4, ConfAdapt 0.99..0.5 and --verify; "
                   "writes the report and a figure")
    p.add_argument("--k-max", type=int, default=None, help="ConfAdapt block size and --verify drafts + 1 "
                   "(default: the model's, else 16)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--no-chat", dest="chat", action="store_false", help="raw text, no chat template")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    p.add_argument("--out-json", default=None, help="write the report here and its figure beside it (.png; "
                   "default with --sweep: eval.json)")
    p.add_argument("--reference", default=None, help="the original model whose loss on the generated text is "
                   "the teacher loss (default: an adapter's base, train_args.json's init, else the model itself)")
    p.add_argument("--exec-code", action="store_true", help="HumanEval: RUN the generated code (in a subprocess "
                   "with a time limit, but unsandboxed) to check it")
    p.add_argument("--exec-timeout", type=float, default=10.0, help="seconds per HumanEval program")
    p.add_argument("--merge", nargs="+", default=None, metavar="REPORT", help="print one table from --json "
                   "reports of --offset chunks (with --out-json: write it and its figure), and evaluate nothing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the checkpoint's)")
    add_sampling_args(p)
    add_cpu_kernels_arg(p)
    a = p.parse_args(argv)
    if (a.limit is not None and a.limit < 0) or a.offset < 0:
        p.error("--limit and --offset must not be negative")
    for t in a.eval_threshold:
        if not 0 < t <= 1:
            p.error(f"threshold {t} is outside (0, 1]")
    check_decoding_args(a, p)
    check_sampling_args(a, p)
    return a


def main(argv=None):
    args = get_args(argv)
    if args.merge:
        reports = []
        for f in args.merge:
            try:
                reports.append(json.loads(Path(f).read_text()))
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{f} is not a readable --json report ({type(e).__name__})") from None
        try:
            merged = merge_reports(reports)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"a report is not one of evaluate.py ... --json ({type(e).__name__}: {e})") from None
        print_table(merged)
        if args.out_json:
            require_matplotlib()
            write_report(merged, Path(args.out_json))
        return
    run_eval(args)


def cli(argv=None):
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    cli()
