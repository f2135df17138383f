"""Datasets: GSM8K (training on CPU, evaluation), MetaMathQA (the paper's training set), any JSONL.
The evaluation sets (BBH, HumanEval, JSONL of prompts) and their answer checks are in data/evalsets.py.

Every loader here returns a list of {"question": str, "answer": str}. Files are looked for in the
fixtures folder (MTP_FIXTURES, default ../shared/fixtures), then in the cache (MTP_CACHE, default
~/.cache/mtp), and only then downloaded from their public homes.
"""
import functools
import gzip
import json
import re
import zlib
from pathlib import Path

import torch

from support.files import find_or_download

GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{}.jsonl"
METAMATHQA = ("meta-math/MetaMathQA", "MetaMathQA-395K.json")  # hub dataset repo, file


def numbered_jsonl(path):
    """(line number, parsed row) for every non-blank line of a JSONL file (gzipped if it ends in .gz)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, zlib.error):
        raise ValueError(f"{path} is not UTF-8 text (or not a readable .gz)") from None
    except OSError as e:
        raise ValueError(f"cannot read {path} ({e.strerror or e})") from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n} is not valid JSON") from None


def read_jsonl(path) -> list[dict]:
    return [row for _, row in numbered_jsonl(path)]


def load_gsm8k(split: str = "train") -> list[dict]:
    if split not in ("train", "test"):
        raise ValueError(f"GSM8K has splits train and test, not {split!r}")
    return read_jsonl(find_or_download(f"gsm8k/{split}.jsonl", GSM8K_URL.format(split), f"GSM8K {split}"))


def load_metamathqa() -> list[dict]:
    from huggingface_hub import hf_hub_download
    try:
        path = hf_hub_download(METAMATHQA[0], METAMATHQA[1], repo_type="dataset")
    except Exception as e:
        raise ValueError(f"could not download {METAMATHQA[0]} from the hub ({type(e).__name__}); "
                         f"use --data gsm8k or a local JSONL file") from None
    return [{"question": r["query"], "answer": r["response"]} for r in json.loads(Path(path).read_text())]


def load_dataset(name: str) -> list[dict]:
    """'gsm8k' / 'gsm8k:test' / 'metamathqa', or a path to a JSONL of question/answer (or text) rows."""
    if name.startswith("gsm8k"):
        return load_gsm8k(name.partition(":")[2] or "train")
    if name == "metamathqa":
        return load_metamathqa()
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"dataset {name!r} is neither gsm8k, gsm8k:test, metamathqa nor a JSONL file")
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} has no rows")
    for n, r in enumerate(rows, 1):
        qa = isinstance(r, dict) and isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)
        if not (qa or (isinstance(r, dict) and isinstance(r.get("text"), str))):
            raise ValueError(f"{path}: row {n} needs string fields 'question' and 'answer' (or 'text')")
    return rows


# -----------------------------------------------------------------------------
# formatting

def load_rows(data: str, n_held_out: int) -> tuple[list[dict], list[dict]]:
    """The training rows, and the held-out ones of train.py's quick eval (GSM8K test, else the last rows)."""
    rows = load_dataset(data)
    if data.startswith("gsm8k"):
        return rows, load_gsm8k("test")[:n_held_out]
    if len(rows) <= n_held_out:
        raise ValueError(f"{data} has {len(rows)} rows; it needs more than --eval-prompts "
                         f"({n_held_out}), which are held out for the quick eval")
    return rows[:len(rows) - n_held_out], rows[len(rows) - n_held_out:]


def clean_gsm8k_answer(answer: str) -> str:
    """Drop GSM8K's calculator annotations <<...>> and spell the final '#### N' as a sentence."""
    answer = re.sub(r"<<[^>]*>>", "", answer)
    return re.sub(r"\n?#### *(.+)$", r"\nThe answer is \1.", answer.strip())


def format_example(tok, row: dict, style: str = "chat") -> list[int]:
    """Token ids of one training text. 'chat': the model's chat template, user = question,
    assistant = answer (the paper's Llama recipe). 'plain': BOS + question + "\\n\\n" + answer + EOS
    (the paper's Qwen recipe). Rows with a 'text' field are used as they are."""
    if "text" in row:
        return tok.encode(row["text"], bos=tok.bos_id is not None) + [tok.eos_id]
    answer = clean_gsm8k_answer(row["answer"])
    if style == "chat" and tok.chat_format:
        return tok.encode_chat([{"role": "user", "content": row["question"]},
                                {"role": "assistant", "content": answer}], add_generation_prompt=False)
    ids = tok.encode(row["question"] + "\n\n" + answer, bos=tok.bos_id is not None)
    return ids + [tok.eos_id]


def gsm8k_prompt(question: str) -> str:
    return question.strip() + "\nSolve step by step and end with 'The answer is N.'"


def extract_number(text: str) -> str | None:
    """The final answer of a GSM8K-style solution: what follows '####' or 'The answer is', else the
    last number in the text; commas and a trailing '.0' dropped."""
    m = re.search(r"####\s*(-?[\d,]*\.?\d+)", text) or re.search(r"answer is\s*\$?(-?[\d,]*\.?\d+)", text)
    nums = [m.group(1)] if m else re.findall(r"-?\d[\d,]*\.?\d*", text)
    if not nums:
        return None
    n = nums[-1].replace(",", "").rstrip(".")
    return n[:-2] if n.endswith(".0") else n


# -----------------------------------------------------------------------------
# training rows: tokenized examples, in a fixed order derived from (seed, epoch), so resuming is exact

def tokenize(rows, tok, style, seq_len):
    examples = []
    for row in rows:
        ids = format_example(tok, row, style)[:seq_len]
        prompt_len = 0
        if "question" in row:  # where the answer starts (for --branch-from response)
            prompt_len = len(tok.encode_chat([{"role": "user", "content": row["question"]}])
                             if style == "chat" and tok.chat_format else tok.encode(row["question"] + "\n\n"))
        examples.append((ids, min(prompt_len, len(ids))))
    return examples


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def first_cuts(examples, branch_from: str) -> list[int]:
    """Where each text's first branch may be cut: its last prompt token (--branch-from response) or its start."""
    return [max(p - 1, 0) if branch_from == "response" else 0 for _, p in examples]


def get_rows(examples, first: int, count: int, seed: int, pad_id: int):
    """Rows first .. first+count-1 of the endless stream: epoch e is a permutation seeded by seed+e.
    Returns their tokens (padded), lengths, first cuts (the last prompt token) and example indices."""
    n = len(examples)
    texts = [epoch_order(n, seed + epoch)[j] for epoch, j in (divmod(i, n) for i in range(first, first + count))]
    picked = [examples[t] for t in texts]
    L = max(len(ids) for ids, _ in picked)
    tokens = torch.full((count, L), pad_id, dtype=torch.long)
    for r, (ids, _) in enumerate(picked):
        tokens[r, :len(ids)] = torch.tensor(ids)
    lengths = torch.tensor([len(ids) for ids, _ in picked])
    starts = torch.tensor(first_cuts(picked, "response"))
    return tokens, lengths, starts, texts


def check_branches(examples, args):
    """Fail now, not after an hour, if no training text is long enough to hold one branch."""
    need = 2  # a branch at cut i needs k >= 2 targets x_{i+1}..x_{i+k} before the last token
    starts = first_cuts(examples, args.branch_from)
    if not any(len(ids) - 1 - s >= need for (ids, _), s in zip(examples, starts)):
        raise ValueError(f"no training text leaves room for a branch: with --branch-from {args.branch_from} and "
                         f"--seq-len {args.seq_len}, every answer is shorter than 2 tokens (longer --seq-len, "
                         f"--branch-from all, or other data)")
