"""README's main job, run exactly as README writes it (read from README itself, so it cannot drift),
on a tiny model for a few steps: decode.py, evaluate.py and bench.py must use the model train.py wrote,
whether an adapter (the CPU default) or a full model, and after a save that a kill interrupted."""
import json
import os
import re
import shlex

import pytest

from decode import generate
from support.tokenizer import encode_prompt
from support.weights import load_model

SIZE = ["--self-answers", "4", "--steps", "3", "--eval-prompts", "2", "--max-minutes", "5",  # + --init: the tiny model
        "--batch-size", "1", "--seq-len", "160", "--branch-every", "4", "--eval-tokens", "16"]


def main_job(readme: str) -> list[list[str]]:
    """The command lines of the first bash block under '## The main job'."""
    section = readme.split("\n## The main job\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("python ")]


@pytest.mark.parametrize("lora", ["8", "0"], ids=["gated-lora", "full-fine-tuning"])  # the tiny model is 32 wide
def test_readme_main_job(script, root, tiny_qwen, tmp_path, lora):
    readme = (root / "README.md").read_text()
    (python, train_py, *train_args), (_, decode_py, *decode_args) = main_job(readme)
    assert (python, train_py, decode_py) == ("python", "train.py", "decode.py")
    extra = SIZE + ["--init", str(tiny_qwen)] + (["--lora", lora] if lora else [])
    t = script(train_py, *train_args, *extra, cwd=tmp_path)
    assert t.returncode == 0, t.stderr
    # the end of the run says what to do next, in README's words, and what it should show
    decode_line = next(line for line in readme.splitlines() if line.startswith("python decode.py"))
    assert f"next: {decode_line}" in t.stdout
    # and what it bought: tokens/s against the original model's k=1, on held-out prompts
    assert re.search(r"done in [0-9.]+ min \| on 2 held-out prompts, interleaved, against the original "
                     r"model's k=1:", t.stdout), t.stdout
    names = ["original k=1", *(["k=1"] if lora == "0" else []), "ConfAdapt(0.9)", "--verify"]
    for name in names:
        line = re.search(rf"^  {re.escape(name)} +[0-9.]+ tokens/s +([0-9.]+)x the original's k=1 \| ([0-9.]+) tokens "
                         rf"per pass \| final answer = the original's \d+%, text (\d+)%$", t.stdout, re.M)
        assert line, (name, t.stdout)
        if name == "original k=1":
            assert float(line.group(1)) == 1.0 and float(line.group(2)) == 1.0 and line.group(3) == "100"
        if name == "--verify" and lora != "0":  # gated LoRA: --verify is the original's text
            assert line.group(3) == "100"
    saved = tmp_path / "out" / "model"
    assert (saved / ("adapter_config.json" if lora != "0" else "config.json")).is_file()

    def decode():
        d = script(decode_py, *decode_args, "--max-new-tokens", "16", cwd=tmp_path)
        assert d.returncode == 0, d.stderr
        assert "no --init given: using out/model" in d.stderr, d.stderr
        assert ("gated-LoRA adapter" in d.stderr) == (lora != "0")
        return d
    d = decode()
    # what it printed is what the saved model decodes with ConfAdapt(0.9)
    model = load_model(str(saved))
    prompt = encode_prompt(model.tokenizer, decode_args[decode_args.index("--prompt") + 1], True)
    want = generate(model, prompt, 16, threshold=0.9, k_max=model.cfg.k_max, stop_ids=model.tokenizer.stop_ids)
    assert f"] {len(want.tokens)} new tokens in {want.passes} passes" in d.stderr, d.stderr
    assert d.stdout.startswith(model.tokenizer.decode([t for t in want.tokens if t not in model.tokenizer.stop_ids]))
    # a save interrupted between its two renames leaves model.old: it is still found, and used
    os.replace(saved, saved.with_name("model.old"))
    assert decode().stdout == d.stdout
    # evaluation looks for the same model
    e = script("evaluate.py", "--tasks", "gsm8k", "--limit", "1", "--max-new-tokens", "4", "--json", cwd=tmp_path)
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["models"][0]["model"] == "out/model"
    b = script("bench.py", "--prompts", "1", "--max-new-tokens", "4", "--json", cwd=tmp_path)  # and so does bench.py
    assert b.returncode == 0, b.stderr
    assert "no --init given: using out/model" in b.stderr, b.stderr
