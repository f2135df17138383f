"""Every file the project reads, cut short at any byte or with its structure broken, stops the reader
with one line that names the file (a ValueError here; `error: ...` and exit 1 from a command): never a
traceback and never a model that loads half-filled. What the project writes itself (the checkpoint,
the own answers, the saved model or adapter) carries a sha256, so one changed byte is caught too.

Line-by-line files (JSONL, tokenizer.model) cut exactly at a line's end are a shorter file of the
same kind and cannot be told from one: for them a cut either fails in one line or reads a prefix of
the whole file's rows."""
import gzip
import json
import shutil
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import need
from support.files import CHECKSUMS
from support.weights import load_model, save_model


def cut_points(size: int, count: int = 16) -> list[int]:
    """0, the first bytes (magic, header length), and offsets spread over the whole file."""
    return sorted({0, 1, 4, 7, 8, 9, 15, size - 1, *(size * i // count for i in range(1, count))} - {size})


def fails_in_one_line(read, name: str):
    """read() raises a one-line ValueError naming `name`; any other exception fails the test."""
    with pytest.raises(ValueError) as e:
        read()
    assert name in str(e.value) and "\n" not in str(e.value), str(e.value)


def check_cuts(src, dst, read, name, count=16, prefix_ok=None):
    data = src.read_bytes()
    for cut in cut_points(len(data), count):
        if not data[cut:].strip():  # only the final newline gone: the content is whole
            continue
        dst.write_bytes(data[:cut])
        if prefix_ok is None:
            fails_in_one_line(read, name)
            continue
        try:
            result = read()
        except ValueError as e:
            assert name in str(e) and "\n" not in str(e), (cut, str(e))
        else:
            assert prefix_ok(result), cut


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# -----------------------------------------------------------------------------
# weights: safetensors (a Hugging Face folder, an adapter), GGUF

def test_safetensors_cut_or_broken(tiny_qwen, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_qwen, folder)
    check_cuts(tiny_qwen / "model.safetensors", folder / "model.safetensors", lambda: load_model(str(folder)),
               "model.safetensors")
    data = (tiny_qwen / "model.safetensors").read_bytes()
    length = struct.unpack("<Q", data[:8])[0]  # the file: header length, JSON header, tensor bytes
    header, body = json.loads(data[8:8 + length]), data[8 + length:]
    name = next(k for k in header if k != "__metadata__")

    def with_header(text: bytes) -> bytes:
        return struct.pack("<Q", len(text)) + text + body
    broken = [struct.pack("<Q", 1 << 40) + data[8:],  # the header's length, its JSON, a dtype, a tensor's place
              with_header(b"{not json"),
              with_header(json.dumps({**header, name: {**header[name], "dtype": "F99"}}).encode()),
              with_header(json.dumps({**header, name: {**header[name], "data_offsets": [0, 1 << 30]}}).encode())]
    for raw in broken:
        (folder / "model.safetensors").write_bytes(raw)
        fails_in_one_line(lambda: load_model(str(folder)), "model.safetensors")


def test_what_we_save_carries_checksums(tiny_qwen, tmp_path):
    """A saved model and a saved adapter list each file's sha256: a flipped byte in the weights, in
    config.json or in the list itself stops the load in one line; every cut of the adapter too."""
    from lora import add_lora
    model = load_model(str(tiny_qwen))
    save_model(model, tmp_path / "full")
    add_lora(model, 4, base=str(tiny_qwen))
    save_model(model, tmp_path / "adapter", {"train_args.json": json.dumps({"init": str(tiny_qwen)})})
    assert load_model(str(tmp_path / "adapter")).lora["rank"] == 4  # as written, it loads
    for folder, name in (("full", "model.safetensors"), ("full", "config.json"), ("adapter", "adapter.safetensors"),
                         ("adapter", "train_args.json")):
        path = tmp_path / folder / name
        good = path.read_bytes()
        flip_byte(path, len(good) - 3)
        fails_in_one_line(lambda: load_model(str(tmp_path / folder)), name)
        path.write_bytes(good)
    (tmp_path / "full" / CHECKSUMS).write_text("abc  model.safetensors\n")
    fails_in_one_line(lambda: load_model(str(tmp_path / "full")), CHECKSUMS)
    (tmp_path / "adapter" / CHECKSUMS).unlink()  # the format's own checks, without the list
    src = tmp_path / "adapter_config.json"
    shutil.copy(tmp_path / "adapter" / "adapter_config.json", src)
    check_cuts(src, tmp_path / "adapter" / "adapter_config.json", lambda: load_model(str(tmp_path / "adapter")),
               "adapter_config.json")
    shutil.copy(src, tmp_path / "adapter" / "adapter_config.json")
    src = tmp_path / "adapter.safetensors"
    shutil.copy(tmp_path / "adapter" / "adapter.safetensors", src)
    check_cuts(src, tmp_path / "adapter" / "adapter.safetensors", lambda: load_model(str(tmp_path / "adapter")),
               "adapter.safetensors")


def tiny_gguf(path):
    """A 1-block llama GGUF with a byte-level tokenizer: 256 bytes, one merge and an end token."""
    import gguf
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's stand-ins for the bytes
    others = [b for b in range(256) if b not in printable]
    tokens = [chr(b) if b in printable else chr(256 + others.index(b)) for b in range(256)] + ["ab", "<|end|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_context_length, 64), (w.add_embedding_length, 16), (w.add_block_count, 1),
                       (w.add_feed_forward_length, 32), (w.add_head_count, 2), (w.add_head_count_kv, 1),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_tokenizer_model, "gpt2"),
                       (w.add_tokenizer_pre, "smollm"), (w.add_token_list, tokens),
                       (w.add_token_types, [6] * 256 + [1, 3]), (w.add_token_merges, ["a b"]), (w.add_eos_token_id, 257)):
        add(value)
    g = torch.Generator().manual_seed(0)
    shapes = {"token_embd.weight": (259, 16), "output_norm.weight": (16,), "blk.0.attn_norm.weight": (16,),
              "blk.0.ffn_norm.weight": (16,), "blk.0.attn_q.weight": (16, 16), "blk.0.attn_k.weight": (8, 16),
              "blk.0.attn_v.weight": (8, 16), "blk.0.attn_output.weight": (16, 16),
              "blk.0.ffn_gate.weight": (32, 16), "blk.0.ffn_up.weight": (32, 16), "blk.0.ffn_down.weight": (16, 32)}
    for name, shape in shapes.items():
        w.add_tensor(name, (torch.randn(shape, generator=g) * 0.1).numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_cut_or_broken(tmp_path):
    src = tiny_gguf(tmp_path / "tiny.gguf")
    assert load_model(str(src)).embed_tokens.weight.shape[1] == 16  # whole, it loads
    dst = tmp_path / "cut.gguf"
    check_cuts(src, dst, lambda: load_model(str(dst)), "cut.gguf", count=24)
    data = src.read_bytes()
    for offset, value in ((0, b"GGUX"), (4, struct.pack("<I", 99)), (8, struct.pack("<Q", 1 << 40)),
                          (16, struct.pack("<Q", 1 << 40))):  # magic, version, tensor count, metadata count
        dst.write_bytes(data[:offset] + value + data[offset + len(value):])
        fails_in_one_line(lambda: load_model(str(dst)), "cut.gguf")


# -----------------------------------------------------------------------------
# the JSON beside the weights, and the tokenizer files

@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "tokenizer.json",
                                  "tokenizer_config.json"])
def test_model_folder_json_cut(tiny_qwen, tmp_path, name):
    from safetensors import safe_open
    from support.tokenizer import Tokenizer
    folder, whole = tmp_path / "model", tmp_path / name
    shutil.copytree(tiny_qwen, folder)
    if name == "model.safetensors.index.json":  # the index of a model saved in shards
        with safe_open(folder / "model.safetensors", "pt") as f:
            whole.write_text(json.dumps({"weight_map": {k: "model.safetensors" for k in f.keys()}}, indent=2))
    else:
        shutil.copy(folder / name, whole)
    read = (lambda: Tokenizer.from_dir(folder)) if name.startswith("tokenizer") else (lambda: load_model(str(folder)))
    check_cuts(whole, folder / name, read, name, count=8 if name == "tokenizer.json" else 16)


def test_train_args_and_tiktoken_file_cut(tiny_qwen, fixtures, tmp_path):
    from support.tokenizer import Tokenizer
    from support.weights import default_reference
    folder = tmp_path / "tuned"
    folder.mkdir()
    (tmp_path / "train_args.json").write_text(json.dumps({"init": str(tiny_qwen), "lr": 1e-3}, indent=2))
    plain = SimpleNamespace(lora=None)
    check_cuts(tmp_path / "train_args.json", folder / "train_args.json", lambda: default_reference(str(folder), plain),
               "train_args.json")
    llama = need(fixtures / "tokenizers" / "llama3")
    (tmp_path / "llama").mkdir()
    shutil.copy(llama / "tokenizer_config.json", tmp_path / "llama")
    whole = Tokenizer.from_dir(llama)
    check_cuts(llama / "tokenizer.model", tmp_path / "llama" / "tokenizer.model",
               lambda: Tokenizer.from_dir(tmp_path / "llama"), "tokenizer.model", count=8,
               prefix_ok=lambda tok: tok.n_vocab <= whole.n_vocab)


# -----------------------------------------------------------------------------
# data: datasets, evaluation sets, the own answers

def test_datasets_cut(fixtures, tmp_path):
    from data import read_jsonl
    from data.evalsets import read_bbh_cot_prompt, read_bbh_file, read_humaneval_file
    gsm8k = need(fixtures / "gsm8k")
    src = next(iter(sorted(gsm8k.glob("*.jsonl*"))))
    small = tmp_path / "small.jsonl"
    opener = gzip.open if src.name.endswith(".gz") else open
    with opener(src, "rt") as f:
        small.write_text("".join(next(f) for _ in range(20)))
    whole = read_jsonl(small)
    dst = tmp_path / "cut.jsonl"
    check_cuts(small, dst, lambda: read_jsonl(dst), "cut.jsonl", count=24,
               prefix_ok=lambda rows: rows == whole[:len(rows)])
    humaneval = need(fixtures / "humaneval" / "HumanEval.jsonl.gz")
    whole = read_humaneval_file(humaneval)
    dst = tmp_path / "cut.jsonl.gz"
    check_cuts(humaneval, dst, lambda: read_humaneval_file(dst), "cut.jsonl.gz", count=12,
               prefix_ok=lambda rows: rows == whole[:len(rows)])
    flipped = tmp_path / "flip.jsonl.gz"
    flipped.write_bytes(humaneval.read_bytes())
    flip_byte(flipped, len(humaneval.read_bytes()) // 2)  # the gzip's CRC catches it
    fails_in_one_line(lambda: read_humaneval_file(flipped), "flip.jsonl.gz")
    bbh = next(iter(sorted(need(fixtures / "bbh").glob("*.json"))))
    dst = tmp_path / "cut.json"
    check_cuts(bbh, dst, lambda: read_bbh_file(dst), "cut.json", count=12)
    prompt = next(iter(sorted(need(fixtures / "bbh" / "cot-prompts").glob("*.txt"))))
    dst = tmp_path / "cut.txt"  # a few-shot text cut short is text, so it must still hold a Q: and an A:
    check_cuts(prompt, dst, lambda: read_bbh_cot_prompt(dst), "cut.txt", count=12,
               prefix_ok=lambda text: "Q:" in text and "A:" in text)


def test_own_answers_cut_or_changed(tiny_qwen, tmp_path):
    """A cut file is not complete: a run that may write answers goes on after its whole batches
    (test_robust), and one that may not stops in one line; a changed byte in a complete file is
    caught by its sha256."""
    from data.own_answers import own_answer_examples, write_own_answers
    model = load_model(str(tiny_qwen))
    rows = [{"question": "What is " + "very " * i + "big?"} for i in range(3)]
    args = SimpleNamespace(init="tiny", self_answers=3, seq_len=16, data="qa")
    header = json.dumps({"meta": {"init": "tiny", "n": 3, "max_new": 8}})
    src = tmp_path / "answers.jsonl"
    write_own_answers(model, model.tokenizer, rows, 3, 8, lambda q: q, src, print, header)

    def read(path):
        return own_answer_examples(args, model, model.tokenizer, rows, path, print, write=False)
    whole = read(src)
    assert len(whole) == 3
    dst = tmp_path / "cut.jsonl"
    check_cuts(src, dst, lambda: read(dst), "cut.jsonl", count=24, prefix_ok=lambda got: got == whole)
    text = src.read_text()
    first = json.loads(text.splitlines()[1])
    changed = text.replace(json.dumps(first), json.dumps({**first, "prompt_len": first["prompt_len"] - 1}), 1)
    dst.write_text(changed)
    fails_in_one_line(lambda: read(dst), "cut.jsonl")


# -----------------------------------------------------------------------------
# the checkpoint

def test_checkpoint_cut_or_changed(train_tiny, tmp_path):
    from support.checkpoint import load_checkpoint
    out = tmp_path / "out"
    r = train_tiny(out, steps=2, save_every=2)
    assert r.returncode == 0, r.stderr
    ckpt = out / "ckpt.pt"
    src = tmp_path / "whole.pt"
    shutil.copy(ckpt, src)
    saved = torch.load(src, weights_only=True)
    run = SimpleNamespace(ckpt_path=ckpt, args=SimpleNamespace(**saved["args"]))
    check_cuts(src, ckpt, lambda: load_checkpoint(run), "ckpt.pt", count=24)
    # one changed byte inside a tensor: find a weight's bytes in the file and flip one
    data = src.read_bytes()
    weight = saved["model"]["lm_head.weight"] if "lm_head.weight" in saved["model"] else \
        next(t for t in saved["model"].values() if t.numel() > 64)
    at = data.find(weight.contiguous().reshape(-1)[:16].numpy().tobytes())
    assert at > 0
    ckpt.write_bytes(data)
    flip_byte(ckpt, at + 5)
    fails_in_one_line(lambda: load_checkpoint(run), "ckpt.pt")
    r = train_tiny(out, "--resume", steps=3, save_every=2)  # and from the command: one line, exit 1
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: ") and \
        "sha256" in r.stderr and "Traceback" not in r.stderr, r.stderr
