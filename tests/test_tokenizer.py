"""support/tokenizer.py against references we did not write: HF `tokenizers` for ids, `transformers` for chat templates.

Covers Qwen3 (tokenizer.json), Llama-3 (tokenizer.json and tokenizer.model) and SmolLM2 (GGUF).
Note on SmolLM2: transformers' GGUF conversion gives it a plain ByteLevel pre-tokenizer, without the
Digits(individual_digits) step of the real SmolLM2 tokenizer.json ("a  1" -> 'a','Ġ','Ġ','1' instead of
'a','ĠĠ','1'). So the id reference for SmolLM2 is a HF `tokenizers` object built here from the GGUF vocab/merges
with the real Digits+ByteLevel pre-tokenizer; transformers' converted tokenizer is compared on digit-free text.
"""
import json
import re
import unicodedata

import pytest

from support.tokenizer import LLAMA3_PAT, QWEN2_PAT, Tokenizer

HARD = [
    "", " ", "\n", "   leading", "trailing   ", "\r\n\r\nwindows\r\n", "a\tb\t\tc \t d",
    "Hello, world! It's 2024 and we're testing... don't, I'LL, YOU'VE, they'd",
    "multiple   spaces\n\n\nnewlines \n \n\t tabs\t\t end", "a  1", "x \n 12", "ab12cd 34  ", "1 a", " \t1",
    "digits 1 12 123 1234 12345 3.14159 1,000,000 0x1F 2^32=4294967296", "²³ ٣٤ Ⅻ ½ ① x ² y",
    "Café naïve résumé Straße Ελληνικά русский 中文 日本語 한국어 العربية हिन्दी",
    "NFD: Cafe\u0301 e\u0301 A\u030a \u1100\u1161 \u212b \ufb01 \u2126 n\u0303",
    "emoji 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖🤖",
    "def f(x):\n    return x**2  # square\n\tif x != 0: print(f'{x!r}')\n\n\n}",
    "specials <|im_end|> <|endoftext|> <|begin_of_text|> <|eot_id|><|start_header_id|> <think>x</think>",
    "<tool_call>{}</tool_call><|fim_prefix|><|im_start|>",
    "\u00a0nbsp\u2003em\u3000ideo\u2028ls \u0085nel", "$1,234.56 (approx. 45%) — “quotes” ‘single’ … end",
    "a\x04b \U00050000 x",  # bytes SmolLM2's vocab lacks: HF drops them
]
CONVS = [[{"role": "system", "content": "You are a careful math tutor. "},
          {"role": "user", "content": " Natalia sold clips to forty-eight of her friends in April.\n"}],
         [{"role": "user", "content": "Hi there! How are you doing today?"}]]  # digit-free: see the SmolLM2 note
LLAMA3 = ["llama3_json", "llama3_model", "llama3_model_cfg"]
NAMES = ["qwen3", "qwen3_cut", *LLAMA3, "smollm2"]  # qwen3_cut: the tiny models' (conftest.py)


@pytest.fixture(scope="module")
def texts(fixtures):
    rows = [json.loads(line) for line in (fixtures / "gsm8k" / "test.jsonl").read_text().splitlines()[:150]]
    return [r[k] for r in rows for k in ("question", "answer")] + HARD


def hf_file(path):
    from tokenizers import Tokenizer as HF
    tok = HF.from_file(str(path))
    tok.encode_special_tokens = True  # special-token text is plain text, as in our encode()
    return tok


def hf_from_gguf(path):
    """A HF tokenizers BPE from the GGUF vocab/merges, with SmolLM2's real pre-tokenizer (Digits + ByteLevel)."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer as HF, decoders, models, pre_tokenizers
    f = GGUFReader(path).fields
    tokens, types = f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in f["tokenizer.ggml.merges"].contents()]
    tok = HF(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    tok.encode_special_tokens = True
    return tok


@pytest.fixture(scope="module")
def hf_dirs(fixtures, tiny_tokenizer, tmp_path_factory):
    """name -> (ours, HF tokenizers reference) for the Hugging Face folders."""
    q, l3 = fixtures / "tokenizers" / "qwen3", fixtures / "tokenizers" / "llama3"
    bare = tmp_path_factory.mktemp("llama3_model")  # tokenizer.model alone: Llama-3.1 special names, no template
    (bare / "tokenizer.model").symlink_to((l3 / "tokenizer.model").resolve())
    cfg = tmp_path_factory.mktemp("llama3_model_cfg")  # tokenizer.model + the fixture's tokenizer_config.json
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (cfg / name).symlink_to((l3 / name).resolve())
    ref_l3 = hf_file(l3 / "tokenizer.json")
    return {"qwen3": (Tokenizer.from_dir(q), hf_file(q / "tokenizer.json")),
            "qwen3_cut": (Tokenizer.from_dir(tiny_tokenizer), hf_file(tiny_tokenizer / "tokenizer.json")),
            "llama3_json": (Tokenizer.from_dir(l3), ref_l3), "llama3_model": (Tokenizer.from_dir(bare), ref_l3),
            "llama3_model_cfg": (Tokenizer.from_dir(cfg), ref_l3)}


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return Tokenizer.from_gguf(smollm2_gguf), hf_from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def smol_transformers(smollm2_gguf):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def get(request, name):
    """(ours, reference) by name; SmolLM2 only when its GGUF is available, so the others never wait on it."""
    return request.getfixturevalue("smol") if name == "smollm2" else request.getfixturevalue("hf_dirs")[name]


@pytest.mark.parametrize("name", NAMES)
def test_ids_match_hf(request, texts, name):
    ours, ref = get(request, name)
    for t in texts:
        assert ours.encode(t) == ref.encode(t, add_special_tokens=False).ids, t


@pytest.mark.parametrize("name", NAMES)
def test_decode(request, texts, name):
    ours, ref = get(request, name)
    for t in texts:
        if name == "smollm2" and t == HARD[-1]:
            continue  # bytes missing from the vocab are dropped, so this one cannot round-trip
        assert ours.decode(ours.encode(t)) == (unicodedata.normalize("NFC", t) if ours.nfc else t)
    specials = sorted(ours.added.values())[:12]
    if name == "llama3_model":  # Llama-3.1 names; the reference is Llama-3, where only these names agree
        specials = [128000, 128001, 128006, 128007, 128009]
    ids = ours.encode("héllo 👍 wörld") + specials + [ours.ranks[b"\xc3"], ours.ranks[b"\xf0"], ours.n_vocab + 5]
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False)  # specials as text, bad utf-8 -> U+FFFD


def test_smollm2_transformers_gguf_on_digit_free_text(smol, texts, smol_transformers):
    for t in texts:
        t = "".join(c for c in t if not unicodedata.category(c).startswith("N"))
        assert smol[0].encode(t) == smol_transformers.encode(t, add_special_tokens=False, split_special_tokens=True), t


@pytest.mark.parametrize("name", ["qwen3", "smollm2"])
def test_vocab_tokens_reachable_by_merges(request, name):
    """tiktoken takes a whole pre-token piece if it is in the vocab; HF only gets there through merges.
    Equivalent when every token's own text merges back to that token under HF's BPE (see support/tokenizer.py)."""
    from tokenizers import pre_tokenizers
    ours, ref = get(request, name)
    pre, norm = ref.pre_tokenizer, ref.normalizer
    ref.pre_tokenizer, ref.normalizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), None
    try:
        items = [(t.decode(), i) for t, i in ours.ranks.items() if len(t) > 1 and valid_utf8(t)]
        assert [e.ids for e in ref.encode_batch([t for t, _ in items], add_special_tokens=False)] == \
               [[i] for _, i in items]
    finally:
        ref.pre_tokenizer, ref.normalizer = pre, norm


def valid_utf8(b):
    try:
        return bool(b.decode())
    except UnicodeDecodeError:
        return False


def test_patterns_are_the_shipped_ones(fixtures):
    pre = {m: json.loads((fixtures / "tokenizers" / m / "tokenizer.json").read_text())["pre_tokenizer"]
           for m in ("qwen3", "llama3")}
    assert pre["qwen3"]["pretokenizers"][0]["pattern"]["Regex"] == QWEN2_PAT
    assert pre["llama3"]["pretokenizers"][0]["pattern"]["Regex"] == LLAMA3_PAT


def test_special_text_bos_and_stop_ids(hf_dirs):
    qwen, llama, llama31 = hf_dirs["qwen3"][0], hf_dirs["llama3_json"][0], hf_dirs["llama3_model"][0]
    assert 151645 not in qwen.encode("<|im_end|>") and 128009 not in llama.encode("<|eot_id|>")
    assert qwen.encode("<think>") == [151667]  # a non-special added token: matched like HF does
    assert qwen.bos_id is None and qwen.encode("hi", bos=True) == qwen.encode("hi")
    for name in LLAMA3:
        assert hf_dirs[name][0].encode("hi", bos=True) == hf_dirs[name][1].encode("hi").ids == [128000, 6151]
    assert (qwen.eos_id, qwen.stop_ids, qwen.n_vocab, qwen.chat_format) == (151645, {151645, 151643}, 151669, "chatml")
    assert (llama.eos_id, llama.stop_ids, llama.n_vocab) == (128009, {128001, 128009}, 128256)
    assert llama.chat_format == llama31.chat_format == "llama3"
    assert (llama31.eos_id, llama31.stop_ids) == (128001, {128001, 128008, 128009})  # 3.1 names: <|eom_id|> = 128008


def test_smollm2_specials(smol):
    ours = smol[0]
    assert (ours.bos_id, ours.eos_id, ours.stop_ids, ours.n_vocab) == (None, 2, {0, 2}, 49152)
    assert ours.chat_format == "chatml"
    assert 2 not in ours.encode("<|im_end|>")


def hf_chat(hf, conv, gen):
    out = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def transformers_dirs(fixtures):
    from transformers import AutoTokenizer
    return {m: AutoTokenizer.from_pretrained(fixtures / "tokenizers" / m) for m in ("qwen3", "llama3")}


@pytest.mark.parametrize("name", ["qwen3", "llama3_json", "llama3_model_cfg", "smollm2"])
@pytest.mark.parametrize("gen", [True, False])
def test_chat_matches_transformers(request, name, gen):
    ours = get(request, name)[0]
    tf = request.getfixturevalue("smol_transformers") if name == "smollm2" else \
        request.getfixturevalue("transformers_dirs")[name.split("_")[0]]
    for conv in CONVS:
        assert ours.encode_chat(conv, add_generation_prompt=gen) == hf_chat(tf, conv, gen)


@pytest.mark.parametrize("name", ["qwen3", "smollm2"])
def test_chat_with_digits(request, name):
    """Rendered by transformers, tokenized by the HF reference (specials on), so digits are fine for SmolLM2 too."""
    conv = [{"role": "user", "content": "What is 12 + 30?  Answer: 42\n"}]
    ours, ref = get(request, name)
    tf = request.getfixturevalue("smol_transformers") if name == "smollm2" else \
        request.getfixturevalue("transformers_dirs")["qwen3"]
    text = tf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    ref.encode_special_tokens = False
    try:
        assert ours.encode_chat(conv) == ref.encode(text, add_special_tokens=False).ids
    finally:
        ref.encode_special_tokens = True
    if name == "smollm2":  # the default system prompt, read from the template in the GGUF
        assert ours.decode(ours.encode_chat(conv)).startswith(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n")


def test_chat_llama31_and_injection(hf_dirs):
    llama31 = hf_dirs["llama3_model"][0]  # no template: the Llama-3.1 format
    assert llama31.decode(llama31.encode_chat(CONVS[1])).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>")
    inj = hf_dirs["qwen3"][0].encode_chat([{"role": "user", "content": "<|im_end|>"}])
    assert inj.count(151645) == 1  # special-token text in user content stays text (transformers would emit the id)


@pytest.mark.parametrize("name", ["qwen3", "llama3_model", "smollm2"])
def test_save_round_trip(request, texts, tmp_path, name):
    from transformers import AutoTokenizer
    ours = get(request, name)[0]
    ours.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    again, hf = Tokenizer.from_dir(tmp_path), hf_file(tmp_path / "tokenizer.json")
    for t in texts:
        ids = ours.encode(t)
        assert again.encode(t) == ids == hf.encode(t, add_special_tokens=False).ids, t
    assert all(hf.token_to_id(t) == i for t, i in ours.added.items())
    assert hf.encode("hi").ids == ours.encode("hi", bos=True)  # HF adds BOS exactly when we do
    assert (again.bos_id, again.eos_id, again.stop_ids, again.chat_format) == \
           (ours.bos_id, ours.eos_id, ours.stop_ids, ours.chat_format)
    tf = AutoTokenizer.from_pretrained(tmp_path)
    for conv in CONVS:
        assert again.encode_chat(conv) == ours.encode_chat(conv) == hf_chat(tf, conv, True)


def test_merges_recovered_from_tiktoken_file(hf_dirs, fixtures):
    """The merges save() derives for tokenizer.model are exactly those of Meta's own tokenizer.json."""
    real = json.loads((fixtures / "tokenizers" / "llama3" / "tokenizer.json").read_text())["model"]["merges"]
    ours = hf_dirs["llama3_model"][0]._hf_json()["model"]["merges"]
    assert {tuple(m.split(" ")) for m in real} == {tuple(m) for m in ours}


def test_errors(tmp_path):
    import gguf
    with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\n\x0bsentencepiece\x12\x04<unk>\x15\x00\x00\x80\xbf")
    with pytest.raises(ValueError, match="SentencePiece"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"added_tokens": [], "normalizer": None, "pre_tokenizer": None, "decoder": None,
         "model": {"type": "Unigram", "vocab": [["<unk>", 0.0]]}}))
    with pytest.raises(ValueError, match="not a byte-level BPE"):
        Tokenizer.from_dir(tmp_path)
    for model, pre, msg in (("llama", "default", "only 'gpt2'"), ("gpt2", "mystery", "unknown tokenizer.ggml.pre")):
        path = tmp_path / f"{model}.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_tokenizer_model(model)
        w.add_tokenizer_pre(pre)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(ValueError, match=re.escape(msg)):
            Tokenizer.from_gguf(path)
