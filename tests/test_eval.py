"""evaluate.py and data/evalsets.py: the BBH and HumanEval loaders on the real files, answer reading
on real BBH targets, HumanEval execution, the teacher loss against transformers on SmolLM2, the
sweep's report and figure, the chunk colours and multi-byte streaming of decode.py, bad input."""
import io
import itertools
import json
import re
import struct
import sys
import time

import pytest
import torch

from data.evalsets import (humaneval_program, load_eval_tasks, load_prompts_jsonl, read_answer,
                           read_bbh_file, read_humaneval_file)
from decode import generate
from support.stream import TextStream
from distill import teacher_nll
from evaluate import load_reference, merge_reports, run_program
from support.tokenizer import Tokenizer

ANSI = re.compile(r"\x1b\[[0-9;]*m")


# -----------------------------------------------------------------------------
# loaders

def test_bbh_loads_every_task_with_its_chain_of_thought_prompt(fixtures):
    tasks = load_eval_tasks("bbh")
    assert len(tasks) == 27 and sum(len(p) for p in tasks.values()) == 6511
    ex = read_bbh_file(fixtures / "bbh" / "navigate.json")[0]
    first = tasks["bbh:navigate"][0]
    shots = (fixtures / "bbh" / "cot-prompts" / "navigate.txt").read_text()
    assert first.prompt.startswith("Given a series of navigation instructions")  # not the canary header
    assert "canary" not in first.prompt and shots.split("-----\n")[1].strip() in first.prompt
    assert first.prompt.endswith(f"\n\nQ: {ex['input']}\nA: Let's think step by step.")
    assert first.answer == ex["target"].lower() and first.domain == "bbh"
    # --limit and --offset hold per task
    some = load_eval_tasks("bbh:snarks,bbh:navigate", limit=3, offset=175)
    assert [len(p) for p in some.values()] == [3, 3] and list(some) == ["bbh:snarks", "bbh:navigate"]
    assert len(load_eval_tasks("bbh:snarks", offset=176)["bbh:snarks"]) == 2  # 178 examples


def test_humaneval_loads_164_problems(fixtures):
    problems = load_eval_tasks("humaneval")["humaneval"]
    assert len(problems) == 164
    assert all(p.entry_point in p.prompt and not p.chat and p.answer is None for p in problems)
    assert problems[0].prompt.rstrip().endswith('"""') and "def has_close_elements" in problems[0].prompt


def test_gsm8k_and_several_sets_at_once(fixtures):
    tasks = load_eval_tasks("gsm8k, bbh:word_sorting,humaneval", limit=2)
    assert list(tasks) == ["gsm8k", "bbh:word_sorting", "humaneval"]
    assert tasks["gsm8k"][0].answer == "18"  # Janet's ducks: 16 - 3 - 4 = 9 eggs at $2


@pytest.mark.parametrize("content,message", [
    ('{"examples": [{"input": "x", "target": "(A)"}, {"input": "y"}]}', "example 1 has no 'target' field"),
    ('{"examples": [{"input": "x", "target": 3}]}', "example 0: 'target' must be a string, not int"),
    ('{"examples": ["just text"]}', "example 0 is not a JSON object"),
    ('[{"input": "x", "target": "(A)"}]', "expected a JSON object with an 'examples' list"),
    ('{"examples": [', "is not valid JSON"),
])
def test_bbh_file_rejects_malformed_rows(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        read_bbh_file(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("rows,message", [
    (['{"task_id": "a", "prompt": "def f():\\n", "test": "", "entry_point": "f"}', '{"task_id": "b"}'],
     ":2 has no 'prompt' field"),
    (['{"task_id": "a", "prompt": 5, "test": "", "entry_point": "f"}'], ":1: 'prompt' must be a string, not int"),
    (['[1, 2]'], ":1 is not a JSON object"),
    (['{"task_id": "a",'], ":1 is not valid JSON"),
])
def test_humaneval_file_rejects_malformed_rows(tmp_path, rows, message):
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        read_humaneval_file(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("rows,message", [
    (['{"prompt": "hi"}', '{"answer": "4"}'], ":2 has neither a 'prompt' nor a 'question' field"),
    (['{"question": "2+2?", "answer": 4}'], ":1: 'answer' must be a string, not int"),
    (['"just a string"'], ":1 is not a JSON object"),
])
def test_prompt_jsonl_rejects_malformed_rows(script, tmp_path, rows, message):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_prompts_jsonl(path)
    r = script("evaluate.py", "--tasks", path)  # the command line: one line, no traceback, before any model loads
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {path}{message}"]


def test_prompt_jsonl_rows(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "Name a colour.", "answer": "Red"}\n{"question": "What is 2+3?", "answer": "5"}\n'
                    '{"prompt": "Tell a story."}\n')
    a, b, c = load_prompts_jsonl(path)
    assert (a.task, a.prompt, a.answer, a.kind) == ("mine", "Name a colour.", "red", "text")
    assert b.prompt.startswith("What is 2+3?\n") and (b.answer, b.kind) == ("5", "number")
    assert c.answer is None


@pytest.mark.parametrize("args,message", [
    (["--tasks", "gsm8k", "--limit", "0"], "gsm8k: no problems selected"),
    (["--tasks", "bbh:navigate", "--offset", "250"], "bbh:navigate: no problems selected (250 in all"),
    (["--tasks", "bbh:no_such_task"], "unknown BBH task 'no_such_task'"),
    (["--tasks", "nothing.jsonl"], "is none of gsm8k, bbh, bbh:<task>, humaneval or a JSONL file"),
    (["--tasks", "gsm8k,,bbh"], "has an empty entry"),
])
def test_cli_empty_or_unknown_selection(script, fixtures, args, message):
    r = script("evaluate.py", *args)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr


# -----------------------------------------------------------------------------
# reading answers: real targets from the BBH files, model outputs written by hand

@pytest.mark.parametrize("task,n,target,output,right", [
    ("date_understanding", 0, "(B)", "Yesterday was 12/31/1929. So the answer is (B).", True),
    ("date_understanding", 0, "(B)", "So the answer is **(B) 12/31/1929**.", True),
    ("date_understanding", 0, "(B)", "So the answer is (C).", False),
    ("date_understanding", 0, "(B)", "So the answer is B.", True),
    ("boolean_expressions", 0, "False", "not True is False. So the answer is False.", True),
    ("boolean_expressions", 0, "False", "So the answer is True.", False),
    ("causal_judgement", 0, "No", "So the answer is No.", True),
    ("sports_understanding", 0, "no", "So the answer is No.", True),
    ("sports_understanding", 0, "no", "So the answer is yes.", False),
    ("formal_fallacies", 0, "invalid", "So the answer is invalid.", True),
    ("formal_fallacies", 0, "invalid", "So the answer is valid.", False),
    ("multistep_arithmetic_two", 0, "24", "-3 + 27 = 24. So the answer is 24.", True),
    ("multistep_arithmetic_two", 3, "-11520", "So the answer is -11,520.", True),
    ("multistep_arithmetic_two", 3, "-11520", "So the answer is 11520.", False),
    ("object_counting", 0, "8", "We have 8 things. So the answer is 8.", True),
    ("word_sorting", 0, "syndrome therefrom", "So the answer is syndrome therefrom.", True),
    ("word_sorting", 0, "syndrome therefrom", "So the answer is: syndrome, therefrom", True),
    ("word_sorting", 0, "syndrome therefrom", "So the answer is therefrom syndrome.", False),
    ("dyck_languages", 0, "] ]", 'So, we need "]", "]". So the answer is ] ].', True),
    ("dyck_languages", 0, "] ]", "So the answer is ] ) ].", False),
    ("dyck_languages", 3, ") >", "So the answer is ) >.", True),
    ("movie_recommendation", None, "Monsters, Inc", "So the answer is Monsters, Inc.", True),
])
def test_bbh_answers(fixtures, task, n, target, output, right):
    examples = read_bbh_file(fixtures / "bbh" / f"{task}.json")
    n = n if n is not None else [e["target"] for e in examples].index(target)
    assert examples[n]["target"] == target  # the target written above is the file's
    problem = load_eval_tasks(f"bbh:{task}")[f"bbh:{task}"][n]
    assert (read_answer(problem.kind, output) == problem.answer) is right


def test_bbh_answer_is_read_from_the_first_answer_not_an_invented_next_question():
    text = "So the answer is (A).\n\nQ: Which is right?\nA: Let's think step by step. So the answer is (C)."
    assert read_answer("bbh:choice", text) == "(A)"
    assert read_answer("bbh:yes/no", "Step 1.\nStep 2.\nYes") == "yes"  # no 'answer is': the last line
    assert read_answer("bbh:true/false", "I cannot tell.") is None


def test_every_bbh_target_reads_back_from_a_stated_answer(fixtures):
    for task, problems in load_eval_tasks("bbh").items():
        targets = read_bbh_file(fixtures / "bbh" / f"{task[4:]}.json")
        for problem, ex in zip(problems, targets):
            assert problem.answer is not None
            assert read_answer(problem.kind, f"Let's think.\nSo the answer is {ex['target']}.") == problem.answer


# -----------------------------------------------------------------------------
# HumanEval: running generated code

def test_humaneval_execution(fixtures):
    problems = load_eval_tasks("humaneval", limit=3)["humaneval"]
    for p in problems:
        assert run_program(humaneval_program(p, p.solution), timeout=20)
        assert not run_program(humaneval_program(p, "    return None\n"), timeout=20)
    # what follows the function (another top-level block) is cut, as the stop sequences say
    tail = "\n\nif __name__ == '__main__':\n    raise SystemExit(1)\n"
    assert run_program(humaneval_program(problems[0], problems[0].solution + tail), timeout=20)
    t0 = time.time()
    assert not run_program(humaneval_program(problems[0], "    while True:\n        pass\n"), timeout=2)
    assert time.time() - t0 < 10


# -----------------------------------------------------------------------------
# the teacher loss: the reference model's NLL of the generated tokens, against transformers

def test_teacher_loss_equals_transformers(smollm2, smollm2_gguf, smollm2_hf):
    tok = smollm2.tokenizer
    reference = load_reference(str(smollm2_gguf), "cpu", None)
    assert reference.cfg.vocab_size == smollm2_hf.config.vocab_size == 49152  # no <MTP> row: the original
    prompt = tok.encode_chat([{"role": "user", "content": "What is 12 times 7?"}])
    for k in (1, 3):  # its own greedy text, and a static k=3 text it would not have written
        new = generate(smollm2, prompt, 12, k=k, stop_ids=tok.stop_ids).tokens
        with torch.no_grad():
            logits = smollm2_hf(torch.tensor([prompt + new])).logits[0, len(prompt) - 1:-1].float()
        expected = -logits.log_softmax(-1).gather(1, torch.tensor(new)[:, None]).mean().item()
        assert teacher_nll(reference, prompt, new) / len(new) == pytest.approx(expected, abs=1e-4)


# -----------------------------------------------------------------------------
# the sweep on tiny random models: report and figure

@pytest.fixture(scope="module")
def tiny_pair(make_tiny, tmp_path_factory):
    """Two random 2-layer Qwen3 with the cut Qwen3 tokenizer (conftest.cut_qwen3_tokenizer): an original, and a "tuned" one whose
    train_args.json names the original as its --init."""
    root = tmp_path_factory.mktemp("tiny")
    shape = dict(tokenizer=True, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=16, tie_word_embeddings=False, max_position_embeddings=2048, initializer_range=0.02)
    _, original = make_tiny(root / "original", seed=0, **shape)
    _, tuned = make_tiny(root / "tuned", seed=1, **shape)
    (tuned / "train_args.json").write_text(json.dumps({"init": str(original)}))
    return original, tuned


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_sweep_writes_report_and_figure(script, fixtures, tiny_pair, tmp_path):
    original, tuned = tiny_pair
    out = tmp_path / "sweep" / "report.json"
    r = script("evaluate.py", "--init", original, tuned, "--tasks", "gsm8k", "--limit", "2", "--max-new-tokens", "4",
               "--sweep", "--out-json", out)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert png_size(out.with_suffix(".png")) == (1200, 500)
    assert [m["model"] for m in report["models"]] == [str(original), str(tuned)]
    assert [m["reference"] for m in report["models"]] == [str(original), str(original)]  # train_args.json
    names = ["k=1", "k=2", "k=3", "k=4"] + [f"ConfAdapt({t})" for t in (0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5)]
    for m in report["models"]:
        rows = m["domains"]["gsm8k"]
        assert list(rows) == names + ["verify", "reference k=1"] and list(m["tasks"]) == ["gsm8k"]
        assert rows["k=1"]["text_agreement_with_k1"] == 1.0 and rows["k=1"]["acceleration"] == 1.0
        assert rows["verify"]["text_agreement_with_k1"] == 1.0  # lossless
        for k in (2, 3, 4):  # 4 new tokens in passes of k, unless a stop token ends one early
            assert 1.0 < rows[f"k={k}"]["acceleration"] <= k
        assert all(s["problems"] == 2 and s["teacher_loss"] > 0 for s in rows.values())
    first, second = (m["domains"]["gsm8k"] for m in report["models"])
    # the original is its own reference; the tuned model's reference row is the original's k=1 text
    assert first["reference k=1"]["teacher_loss"] == pytest.approx(first["k=1"]["teacher_loss"])
    assert second["reference k=1"]["teacher_loss"] == pytest.approx(first["k=1"]["teacher_loss"])
    assert second["k=1"]["teacher_loss"] != pytest.approx(first["k=1"]["teacher_loss"])


def assert_same_sums(table, expected):
    """Strategy tables equal but for times (and float sums added in another order)."""
    assert table.keys() == expected.keys()
    for name, s in table.items():
        for key, value in s.items():
            if key in ("tokens_per_s", "sums"):
                continue
            assert value == (expected[name][key] if value is None else pytest.approx(expected[name][key])), key
        for key, value in s["sums"].items():
            assert key == "seconds" or value == pytest.approx(expected[name]["sums"][key]), key


def test_chunks_merge_into_the_report_of_one_run(script, fixtures, tiny_pair, tmp_path):
    """python evaluate.py on --offset chunks: the sums of one run over all problems (but the times)."""
    _, tuned = tiny_pair
    base = ["--init", str(tuned), "--tasks", "gsm8k,bbh:boolean_expressions", "--max-new-tokens", "6", "--eval-k", "2",
            "--eval-threshold", "0.5", "--json"]
    files = []
    for offset, limit in ((0, 3), (0, 1), (1, 2)):
        r = script("evaluate.py", *base, "--limit", limit, "--offset", offset)
        assert r.returncode == 0, r.stderr
        files.append(tmp_path / f"eval-{offset}-{limit}.json")
        files[-1].write_text(r.stdout)
    whole = json.loads(files[0].read_text())["models"][0]
    merged = merge_reports([json.loads(f.read_text()) for f in files[1:]])
    assert merged["problems"] == {"gsm8k": 3, "bbh:boolean_expressions": 3}
    for part in ("tasks", "domains"):
        assert merged["models"][0][part].keys() == whole[part].keys()
        for key in whole[part]:
            assert_same_sums(merged["models"][0][part][key], whole[part][key])
    assert_same_sums(merged["models"][0]["all"], whole["all"])
    # a chunk without static k=2: its row sums the chunks that have it
    r = script("evaluate.py", *[a for a in base if a not in ("--eval-k", "2")], "--limit", "1", "--offset", "3")
    assert r.returncode == 0, r.stderr
    (tmp_path / "eval-3-1.json").write_text(r.stdout)
    files.append(tmp_path / "eval-3-1.json")
    merged = merge_reports([json.loads(f.read_text()) for f in files[1:]])["models"][0]["all"]
    assert merged["k=2"]["problems"] == 6 and merged["k=1"]["problems"] == merged["ConfAdapt(0.5)"]["problems"] == 8
    r = script("evaluate.py", "--merge", *files[1:])
    assert r.returncode == 0 and "ConfAdapt(0.5)" in r.stderr, r.stderr
    r = script("evaluate.py", "--merge", *files[1:], "--out-json", tmp_path / "merged.json")  # and its figure
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "merged.json").read_text())["models"][0]["all"]["k=1"]["problems"] == 8
    assert (tmp_path / "merged.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = script("evaluate.py", "--merge", tmp_path / "none.json")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "none.json" in r.stderr
    # a report cut short at any byte, or with its structure broken: one line, exit 1
    text = files[1].read_text()
    report = json.loads(text)
    broken = [text[:cut] for cut in range(0, len(text.rstrip()), max(1, len(text) // 12))] + [json.dumps(x) for x in (
        [], {**report, "problems": 5}, {**report, "models": "x"}, {**report, "models": [{"model": "m"}]})]
    for content in broken:
        (tmp_path / "bad.json").write_text(content)
        r = script("evaluate.py", "--merge", tmp_path / "bad.json", files[2])
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr


def test_figure_without_matplotlib_is_one_line(monkeypatch):
    import evaluate
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"^the figure needs matplotlib: pip install matplotlib$"):
        evaluate.require_matplotlib()


def test_humaneval_runs_code_only_when_asked(script, fixtures, tiny_pair):
    original, _ = tiny_pair
    base = ["--init", original, "--tasks", "humaneval", "--limit", "1", "--max-new-tokens", "4", "--json"]
    quiet = json.loads(script("evaluate.py", *base).stdout)["models"][0]["tasks"]["humaneval"]
    assert all(s["accuracy"] is None for s in quiet.values())
    ran = json.loads(script("evaluate.py", *base, "--exec-code", "--exec-timeout", "5").stdout)["models"][0]["tasks"]["humaneval"]
    assert all(s["accuracy"] == 0.0 for s in ran.values())  # 4 random tokens do not solve it


# -----------------------------------------------------------------------------
# decode.py: chunk colours and multi-byte characters while streaming

def test_streaming_prints_characters_split_across_tokens(fixtures):
    tok = Tokenizer.from_dir(fixtures / "tokenizers" / "qwen3")
    text = "A parrot 🦜, a dragon 龘 and a clef 𝄞 — fine."
    ids = tok.encode(text)
    assert any(tok.decode([i]) == "\ufffd" for i in ids)  # some characters are split across tokens
    for show_chunks, sizes in ((False, [1]), (False, [1, 2, 3]), (True, [1, 2, 3])):
        out = io.StringIO()
        stream = TextStream(tok, show_chunks, out)
        pos, size = 0, itertools.cycle(sizes)
        while pos < len(ids):
            n = next(size)
            stream(ids[pos:pos + n])
            pos += n
            assert "\ufffd" not in out.getvalue()  # a half character is held back, never printed
        stream.finish()
        assert ANSI.sub("", out.getvalue()) == text
        assert ("\x1b[" in out.getvalue()) is show_chunks


def test_show_chunks_on_the_command_line(script, fixtures, tiny_pair):
    original, _ = tiny_pair
    base = ["--init", str(original), "--prompt", "Count to ten.", "--k", "3", "--max-new-tokens", "9"]
    plain, coloured, as_json = (script("decode.py", *base, *extra) for extra in ([], ["--show-chunks"], ["--json"]))
    assert plain.returncode == coloured.returncode == as_json.returncode == 0, coloured.stderr
    assert "\x1b[" in coloured.stdout and "\x1b[" not in plain.stdout
    assert ANSI.sub("", coloured.stdout) == plain.stdout == json.loads(as_json.stdout)["text"]
    assert "tokens accepted per pass" in coloured.stderr
