"""Datasets: GSM8K (training on CPU, evaluation), MetaMathQA (the paper's training set), any JSONL.

Every loader returns a list of {"question": str, "answer": str}. Files are looked for in the
fixtures folder (MTP_FIXTURES, default ../shared/fixtures), then in the cache (MTP_CACHE, default
~/.cache/mtp), and only then downloaded from their public homes.
"""
import json
import os
import re
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("MTP_FIXTURES", ROOT.parent / "shared" / "fixtures"))
CACHE_DIR = Path(os.environ.get("MTP_CACHE", Path.home() / ".cache" / "mtp"))
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{}.jsonl"
METAMATHQA = ("meta-math/MetaMathQA", "MetaMathQA-395K.json")  # hub dataset repo, file


def read_jsonl(path) -> list[dict]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise ValueError(f"cannot read {path} ({e.strerror})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n} is not valid JSON") from None
    return rows


def load_gsm8k(split: str = "train") -> list[dict]:
    if split not in ("train", "test"):
        raise ValueError(f"GSM8K has splits train and test, not {split!r}")
    for path in (FIXTURES / "gsm8k" / f"{split}.jsonl", CACHE_DIR / "gsm8k" / f"{split}.jsonl"):
        if path.exists():
            return read_jsonl(path)
    path = CACHE_DIR / "gsm8k" / f"{split}.jsonl"
    print(f"downloading GSM8K {split} from {GSM8K_URL.format(split)}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        urllib.request.urlretrieve(GSM8K_URL.format(split), path.with_suffix(".tmp"))
    except OSError as e:
        raise ValueError(f"could not download GSM8K ({e}); set MTP_FIXTURES to a folder with gsm8k/") from None
    path.with_suffix(".tmp").rename(path)
    return read_jsonl(path)


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
