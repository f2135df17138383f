"""train.py end to end on a tiny Qwen3-shaped model with the cut Qwen3 tokenizer: output loads in
decode.py and transformers, --resume is exact, 2 data-parallel processes equal 1, bad input."""
import json
import math
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file

from decode import generate
from conftest import TINY_MASK, TINY_VOCAB
from support.weights import load_model


def losses(stdout):
    return [float(x) for x in re.findall(r"^step \d+ \| loss ([0-9.]+)", stdout, re.M)]  # not the evals' teacher loss


def test_train_writes_a_model_decode_and_transformers_load(script, train_tiny, tmp_path):
    r = train_tiny(tmp_path / "out", eval_every=4)
    assert r.returncode == 0, r.stderr
    assert "memory per device" in r.stdout and "eval step 4" in r.stdout
    assert len(losses(r.stdout)) == 4
    model_dir = tmp_path / "out" / "model"
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["mtp_mask_id"] == TINY_MASK and cfg["mtp_k_max"] == 6 and cfg["vocab_size"] == TINY_VOCAB
    assert not list((tmp_path / "out").glob("*.tmp"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ours = load_model(str(model_dir))
    idx = torch.tensor([[1001, 11, TINY_MASK, TINY_MASK]])
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max().item() <= 1e-4
    d = script("decode.py", "--init", model_dir, "--prompt", "What is 3 plus 4?", "--threshold", "0.9",
               "--max-new-tokens", "8", "--json")
    assert d.returncode == 0, d.stderr
    assert json.loads(d.stdout)["passes"] >= 1


def test_self_answers(train_tiny, tiny_qwen, tmp_path):
    """--self-answers N: N of the training questions answered by the model itself (prompt + its
    greedy answer, the same tokens decode.py produces), written once and trained on."""
    r = train_tiny(tmp_path / "out", steps=1, seq_len=48, self_answers=3)
    assert r.returncode == 0, r.stderr
    assert "self-answers: " in r.stdout and "3 examples" in r.stdout
    meta, *rows, end = [json.loads(line) for line in (tmp_path / "out" / "self_answers.jsonl").read_text().splitlines()]
    assert meta["meta"]["n"] == 3 and len(rows) == 3 and end["complete"] == 3 and len(end["sha256"]) == 64
    model = load_model(str(tiny_qwen))
    for row in rows:
        prompt, answer = row["ids"][:row["prompt_len"]], row["ids"][row["prompt_len"]:]
        assert answer == generate(model, prompt, 24, stop_ids=model.tokenizer.stop_ids).tokens


@pytest.mark.parametrize("setting", [{}, {"lora": 4, "lora_layers": 1}, {"dtype": "bfloat16", "amp": "bfloat16"}],
                         ids=["full", "gated-lora-frozen-rows", "bfloat16-master-copy-autocast"])
def test_resume_is_exact(train_tiny, tmp_path, setting):
    """A resumed run is the run never stopped, bit for bit, in each precision a process offers:
    float32, bfloat16 weights with their float32 master copy, autocast; under gated LoRA the frozen
    rows it keeps are made again from the texts, as they were."""
    setting = {"seq_len": 32, **setting}
    straight = train_tiny(tmp_path / "a", **setting)
    first = train_tiny(tmp_path / "b", steps=2, **setting)
    resumed = train_tiny(tmp_path / "b", "--resume", **setting)
    for r in (straight, first, resumed):
        assert r.returncode == 0, r.stderr
    assert "resumed from" in resumed.stdout
    assert "lora" not in setting or "kept between passes over the data" in resumed.stdout
    assert losses(first.stdout) + losses(resumed.stdout) == losses(straight.stdout)
    weights = "adapter.safetensors" if "lora" in setting else "model.safetensors"
    a = load_file(tmp_path / "a" / "model" / weights)
    b = load_file(tmp_path / "b" / "model" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_lr_decays_to_zero_at_the_end_of_the_budget(train_tiny, tmp_path, decay):
    """--decay: after the warm-up the learning rate falls to zero at the end of --steps, linearly or
    as half a cosine; the peak (--decay none) stays where it is."""
    r = train_tiny(tmp_path / "out", "--decay", decay, steps=4, warmup=1)
    assert r.returncode == 0, r.stderr
    logged = [float(x) for x in re.findall(r"^step \d+ \|.*\| lr ([0-9.e+-]+) \|", r.stdout, re.M)]
    shape = {"linear": lambda f: 1 - f, "cosine": lambda f: (1 + math.cos(math.pi * f)) / 2}[decay]
    assert logged == pytest.approx([1e-3 * shape(step / 4) for step in range(4)], rel=1e-2)


def test_lr_decay_follows_the_clock_under_a_time_budget():
    """With --max-minutes the budget is time: half the time to the deadline is half the decay, and
    a resumed run decays the rest of the way in its own budget."""
    import time
    from support.budget import Budget
    budget = Budget(2.0, t0=time.time() - 30)  # 2 minutes, 30 s of them kept for the end: the deadline in 60 s
    budget.start_training(0.0, own_answers=False)
    budget.t_train -= 60  # training started 60 s ago
    assert budget.spent(0, 100_000) == pytest.approx(0.5, abs=0.01)
    budget.progress0 = 0.5  # a resumed run: half was spent before
    assert budget.spent(0, 100_000) == pytest.approx(0.75, abs=0.01)
    assert budget.spent(100_000, 100_000) == 1.0


def test_k_weights_choose_how_often_each_k_is_drawn(train_tiny, tmp_path):
    """--k-weights 1 0 0 0 0 with --k-max 6: every micro-batch has k = 2, so no prediction is ever
    made for offsets 3..6 (the log shows "-" there), while the default draws longer blocks too."""
    only_2 = train_tiny(tmp_path / "a", "--k-weights", "1", "0", "0", "0", "0", steps=3)
    uniform = train_tiny(tmp_path / "b", steps=3)
    for r in (only_2, uniform):
        assert r.returncode == 0, r.stderr
    agree = lambda r: [line.split("agree@1..6 ")[1].split(" |")[0].split() for line in r.stdout.splitlines()  # noqa
                       if line.startswith("step ") and "agree@" in line]
    assert all(a[2:] == ["-"] * 4 and a[1] != "-" for a in agree(only_2))
    assert any(a[2] != "-" for a in agree(uniform))


@pytest.mark.parametrize("sharding", ["data-parallel", "fsdp"])
def test_two_processes_equal_one(train_tiny, tmp_path, sharding):
    """Same global batch (4 rows): 1 process x 2 micro-batches vs 2 processes x 1 (gloo), with gradients
    averaged by all-reduce (support.processes.average_gradients) or with the student (and the teacher)
    sharded by FSDP; sharded, the closing table says what 1 process's says, but for the speeds."""
    one = train_tiny(tmp_path / "one", steps=3, grad_accum=2)
    extra = ["--fsdp"] if sharding == "fsdp" else []
    two = train_tiny(tmp_path / "two", *extra, steps=3, nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    if sharding == "fsdp":  # the closing table: every process decodes, with rank 0's decisions, as 1 process does
        table = lambda r: [(ln.split()[0], ln.split("|", 1)[1]) for ln in r.stdout.splitlines() if "x the original's" in ln]  # noqa: E731
        assert table(two) == table(one) and len(table(one)) == 4, two.stdout
        held, whole = map(float, re.search(r"teacher weights sharded: ([\d.]+) MiB on this process of ([\d.]+) MiB",
                                           two.stdout).groups())  # a frozen copy, sharded like the student
        assert held == pytest.approx(whole / 2, abs=0.02), two.stdout
    assert "2 process(es)" in two.stdout
    assert losses(one.stdout) == pytest.approx(losses(two.stdout), rel=1e-4)
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


@pytest.mark.parametrize("args,message", [
    (["--init", "/no/such/dir"], "not a preset"),
    (["--data", "/no/such.jsonl"], "neither gsm8k"),
    (["--resume"], "no checkpoint"),
    (["--dtype", "int8"], "--dtype must be"),
    (["--k-max", "1"], "--k-max must be at least 2"),
    (["--recipe", "gpu"], "argument --recipe: invalid choice"),
    (["--k-weights", "1", "1"], "--k-weights needs 5 weights"),
    (["--lora", "4", "--lora-layers", "3"], "--lora-layers 3 is more than the model's 2 blocks"),
])
def test_bad_input(script, train_tiny, tmp_path, args, message):
    base = train_tiny.args(tmp_path / "out")
    for flag in args[::2] if len(args) > 1 else args:  # let the bad value replace the good one
        if flag in base:
            i = base.index(flag)
            del base[i:i + 2]
    r = script("train.py", *base, *args)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "model").exists()


def test_cpu_defaults_are_the_hour_recipe(tmp_path):
    """No flags on a CPU: the cpu-hour recipe, gated LoRA rank 128 in the top 4 blocks at lr 1e-3 on the model's own
    answers, in a 60-minute budget (docs/RESULTS.md); --lora 0 is full fine-tuning at lr 1e-4; with
    --fsdp it stays full; --recipe paper-gpu is the paper's; a flag overrides its setting."""
    from train import RECIPES, get_args
    a = get_args(["--device", "cpu", "--out", str(tmp_path / "a")])
    assert (a.recipe, a.lora, a.lora_layers, a.lr, a.self_answers, a.k_max, a.max_minutes) == \
        ("cpu-hour", 128, 4, 1e-3, 512, 4, 60.0)
    a = get_args(["--device", "cpu", "--out", str(tmp_path / "b"), "--lora", "0"])
    assert (a.lora, a.lr) == (0, 1e-4)
    a = get_args(["--device", "cpu", "--out", str(tmp_path / "c"), "--fsdp"])
    assert a.lora == 0
    a = get_args(["--device", "cpu", "--out", str(tmp_path / "d"), "--recipe", "paper-gpu", "--seq-len", "96"])
    want = {k: v for k, v in RECIPES["paper-gpu"].items() if k not in ("lora_lr", "seq_len")}
    assert {k: getattr(a, k) for k in want} == want and a.seq_len == 96


def test_help_shows_the_recipes_that_run(script):
    """--help prints the recipes table from the RECIPES dict itself, so it cannot drift."""
    from train import RECIPES
    r = script("train.py", "--help")
    assert r.returncode == 0
    for name, recipe in RECIPES.items():
        assert name in r.stdout
    for key in RECIPES["cpu-hour"]:
        line = [line for line in r.stdout.splitlines() if line.split()[:1] == [key]][-1]  # the table is last
        assert line.split()[1:] == [str(recipe[key]) for recipe in RECIPES.values()], line


def test_one_gpu_defaults_to_the_paper_recipe_in_a_time_budget(tmp_path, monkeypatch):
    """On one GPU no flags give the paper's settings, stopped after 8 hours (about 10,700 steps at the
    step time measured on an H200, docs/GPU.md); several processes get the paper's recipe as it is."""
    import torch
    from train import RECIPES, get_args
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    a = get_args(["--device", "cuda", "--out", str(tmp_path / "a")])
    assert a.recipe == "one-gpu" and a.max_minutes == 480
    want = {k: v for k, v in RECIPES["paper-gpu"].items() if k not in ("lora_lr", "max_minutes")}
    assert {k: getattr(a, k) for k in want} == want
    monkeypatch.setenv("WORLD_SIZE", "2")
    a = get_args(["--device", "cuda", "--out", str(tmp_path / "b")])
    assert a.recipe == "paper-gpu" and a.max_minutes is None


def test_a_process_without_its_gpu_says_so(monkeypatch):
    """torchrun with more processes than the machine has GPUs: the second process of a one-GPU machine
    would ask for cuda:1; it stops with one line before any process group starts."""
    import torch
    from support.processes import start_processes
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="process 1 of this machine needs GPU 1, and it has 1"):
        start_processes("cuda")


def test_a_killed_process_stops_the_others_in_one_line_and_resume_is_exact(train_tiny, tmp_path):
    """kill -9 of rank 1 mid-run (2 processes, gloo): rank 0 stops within the grace period with one line
    that says which checkpoint holds what and how to continue, and --resume at the same world size gives
    the weights of a run that was never stopped."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    settings = dict(steps=12, save_every=4, seq_len=32)
    straight = train_tiny(tmp_path / "straight", nproc=2, **settings)
    assert straight.returncode == 0, straight.stderr
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "train.py"),
               *train_tiny.args(tmp_path / "cut", **settings)]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    for line in run.stdout:
        if line.startswith("step 6 "):
            break
    workers = subprocess.run(["pgrep", "-f", str(tmp_path / "cut")], capture_output=True, text=True).stdout.split()
    rank1 = [p for p in workers if b"LOCAL_RANK=1\0" in open(f"/proc/{p}/environ", "rb").read()]
    assert len(rank1) == 1, workers
    t0 = time.time()
    os.kill(int(rank1[0]), signal.SIGKILL)
    _, stderr = run.communicate(timeout=120)
    assert time.time() - t0 < 60 and run.returncode != 0
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: process 0 of 2")]
    assert len(lines) == 1 and "another process of the run stopped" in lines[0], stderr[-3000:]
    assert re.search(r"ckpt.pt holds step (4|8); to continue: torchrun --nproc_per_node 2 train.py", lines[0]), lines[0]
    resumed = train_tiny(tmp_path / "cut", "--resume", nproc=2, **settings)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_on_another_number_of_processes(train_tiny, tmp_path):
    """A sharded run (--fsdp) of 2 processes x 1 micro-batch resumes on 1 process x 2, and a run of 1 x 2
    resumes on 2 x 1: the same rows a step, the same k draws, so the weights are those of the run never
    stopped (to the rounding by which 2 processes' gradients differ from 1's, as above)."""
    two, one = dict(nproc=2, grad_accum=1), dict(nproc=1, grad_accum=2)
    straight = train_tiny(tmp_path / "straight", "--fsdp", steps=6, **two)
    assert straight.returncode == 0, straight.stderr
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    for first, then, name in ((two, one, "2-to-1"), (one, two, "1-to-2")):
        out = tmp_path / name
        r = train_tiny(out, "--fsdp", steps=3, **first)
        assert r.returncode == 0, r.stderr
        r = train_tiny(out, "--fsdp", "--resume", steps=6, **then)
        assert r.returncode == 0, r.stderr
        assert "resumed from" in r.stdout and "the same rows a step; the k draws continue exactly" in r.stdout, r.stdout
        assert losses(straight.stdout)[3:] == pytest.approx(losses(r.stdout), rel=1e-4)
        b = load_file(out / "model" / "model.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4, name
