"""Byte-level BPE tokenizer (Llama-3, Qwen3, SmolLM2) on top of tiktoken, built from the files a model ships.

Sources: a Hugging Face folder (tokenizer.json, or Llama-3's tiktoken-format tokenizer.model) or the
tokenizer.ggml.* metadata of a GGUF file. The ids match Hugging Face `tokenizers` (tests/test_tokenizer.py).

Why tiktoken gives Hugging Face's ids: tiktoken repeatedly merges the adjacent pair whose merged token has the
lowest rank (we use the token id as the rank); HF merges the pair that comes first in its merge list. The two
agree when merged-token ids grow with merge order (checked at load by `_check_merge_order`) and every token
can be built from its own bytes by the merges (true for these vocabularies, checked in the tests).
"""
import base64
import json
import re
import time
import unicodedata
from pathlib import Path

import tiktoken

from support.files import write_file_atomically

# pre-tokenizer regexes (tiktoken's regex engine reads these the same way as HF's)
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PAT = LLAMA3_PAT.replace(r"\p{N}{1,3}", r"\p{N}")  # one digit per piece
GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# SmolLM2: HF Digits(individual_digits) isolates every \p{N} char, then the GPT-2 regex runs on the text between
# them. As one regex: a number char is a piece of its own, and a space run just before one counts as "at the end"
# for \s+(?!\S) ("a  1" -> "a", "  ", "1"; "x \n 12" -> "x", " \n ", "1", "2").
DIGITS_GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"

BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
DIGITS_BYTE_LEVEL = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                           {**BYTE_LEVEL, "trim_offsets": True, "use_regex": True}]}


def split_byte_level(pattern: str) -> dict:
    """HF pre-tokenizer json: split on a regex, then map bytes to the byte-level alphabet."""
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}, BYTE_LEVEL]}


GGUF_PRE = {"smollm": DIGITS_BYTE_LEVEL, "llama-bpe": split_byte_level(LLAMA3_PAT),
            "qwen2": split_byte_level(QWEN2_PAT), "gpt-2": {**BYTE_LEVEL, "use_regex": True}}
# Llama-3.1 names of the 256 special tokens from id 128000 (used when no tokenizer_config.json names them)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(LLAMA3_SPECIALS))]
END_OF_TURN = ["<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>"]

# chat templates that save() writes when the source had none (they render what encode_chat encodes)
CHATML_JINJA = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA31_JINJA = (
    "{{ bos_token }}{% set date_string = \"26 Jul 2024\" %}{% set system = '' %}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
    "{% set messages = messages[1:] %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\nToday Date: '"
    " + date_string + '\\n\\n' + system + '<|eot_id|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

# GPT-2's byte-level alphabet: printable latin-1 bytes stand for themselves, the other bytes for chr(256 + i)
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
_OTHER = [b for b in range(256) if b not in _PRINTABLE]
B2U = {**{b: chr(b) for b in _PRINTABLE}, **{b: chr(256 + i) for i, b in enumerate(_OTHER)}}
U2B = {c: b for b, c in B2U.items()}
# str.translate table back to bytes (as latin-1 chars); a char outside the alphabet becomes U+FFFF,
# which latin-1 cannot encode
_UNBYTE = {**{i: 0xFFFF for i in range(256)}, **{ord(c): b for c, b in U2B.items()}}


def byte_level_to_bytes(token: str) -> bytes:
    try:
        return token.translate(_UNBYTE).encode("latin-1")
    except UnicodeEncodeError:
        bad = next(c for c in token if c not in U2B)
        raise ValueError(f"char {bad!r} is not in the byte-level alphabet; only byte-level BPE is supported") from None


def _check_merge_order(vocab: dict[str, int], merges: list) -> None:
    """tiktoken's rank order is HF's merge order only if merged-token ids never decrease along the merge list."""
    last = -1
    for a, b in merges:
        i = vocab.get(a + b, -1)
        if i < last:  # (or the merged token is not in the vocab)
            raise ValueError(f"merge {a!r} + {b!r} is out of id order, so tiktoken cannot reproduce this BPE")
        last = i


def _pattern(pre: dict | None) -> str:
    """The tiktoken regex that splits text like a HF byte-level pre-tokenizer (tokenizer.json's pre_tokenizer)."""
    steps = pre["pretokenizers"] if pre and pre["type"] == "Sequence" else [pre or {}]
    kinds = [s.get("type") for s in steps]
    if steps[-1].get("add_prefix_space"):
        raise ValueError("ByteLevel(add_prefix_space=true) is not supported")
    if kinds == ["Split", "ByteLevel"] and "Regex" in steps[0]["pattern"] and steps[0]["behavior"] == "Isolated" \
            and not steps[0]["invert"] and not steps[1]["use_regex"]:
        return steps[0]["pattern"]["Regex"]
    if kinds == ["ByteLevel"] and steps[0]["use_regex"]:
        return GPT2_PAT
    if kinds == ["Digits", "ByteLevel"] and steps[0]["individual_digits"] and steps[1]["use_regex"]:
        return DIGITS_GPT2_PAT
    raise ValueError(f"unsupported pre-tokenizer {json.dumps(pre)[:200]}; expected Split+ByteLevel, ByteLevel "
                     "or Digits+ByteLevel as in Llama-3, Qwen and SmolLM2")


def _read_json(file: Path):
    try:
        return json.loads(file.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{file} is not valid JSON") from None


def _check_tokenizer_json(file: Path, tj) -> None:
    """The parts of tokenizer.json we read, with the types we read them as: one line if not."""
    model = tj.get("model") if isinstance(tj, dict) else None
    problem = None
    if not isinstance(model, dict):
        problem = "has no 'model' object"
    elif model.get("type") != "BPE":
        return  # another kind of tokenizer: _from_tokenizer_json says which kinds are supported
    elif not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        problem = "has no model.vocab (token -> id) and model.merges (list)"
    elif not all(isinstance(i, int) for i in model["vocab"].values()) or not all(
            isinstance(m, str) and m.count(" ") == 1 or isinstance(m, list) and len(m) == 2 for m in model["merges"]):
        problem = "has a model.vocab id that is not an integer, or a merge that is not a pair"
    elif not isinstance(tj.get("added_tokens", []), list) or not all(
            isinstance(a, dict) and isinstance(a.get("content"), str) and isinstance(a.get("id"), int)
            for a in tj.get("added_tokens", [])):
        problem = "has an added_tokens entry without a string content and an integer id"
    if problem:
        raise ValueError(f"{file} is not a Hugging Face tokenizer.json: it {problem}")


def _check_tokenizer_config(file: Path, cfg) -> None:
    if not isinstance(cfg, dict):
        raise ValueError(f"{file} must hold a JSON object, not {type(cfg).__name__}")
    for key in ("bos_token", "eos_token"):
        value = cfg.get(key)
        if not (value is None or isinstance(value, str) or isinstance(value, dict) and isinstance(value.get("content"), str)):
            raise ValueError(f"{file}: {key} is {value!r}, not a token string")
    if not isinstance(cfg.get("chat_template"), (str, list, type(None))):
        raise ValueError(f"{file}: chat_template is a {type(cfg['chat_template']).__name__}, not a template string")


class Tokenizer:
    def __init__(self, ranks: dict[bytes, int], added: dict[str, int], special: set[str], pre: dict, *,
                 bos: str | None, eos: str, chat_template: str | None = None, nfc: bool = False,
                 merges: list | None = None, source: Path | None = None):
        """ranks: token bytes -> id; added: added-token text -> id (`special` names the control ones, the rest are
        matched in text like HF does); pre: the HF pre-tokenizer json; merges/source: what save() writes back."""
        self.ranks, self.added, self.special, self.pre, self.nfc = ranks, added, special, pre, nfc
        self.merges, self.source, self.chat_template = merges, source, chat_template
        self.n_vocab = 1 + max(max(ranks.values()), max(added.values(), default=-1))
        # bytes the vocab lacks (SmolLM2 has no token for b"\x04"): tiktoken would crash on them, so give them ids
        # past the vocab and drop those from the output, as HF does
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
        self._fill = {b: self.n_vocab + i for i, b in enumerate(missing)}
        self.encoding = tiktoken.Encoding("bpe", pat_str=_pattern(pre), mergeable_ranks={**ranks, **self._fill},
                                          special_tokens=added)
        plain = sorted((t for t in added if t not in special), key=len, reverse=True)
        self._plain_re = re.compile("(" + "|".join(map(re.escape, plain)) + ")") if plain else None
        if eos not in added:
            raise ValueError(f"eos token {eos!r} is not an added token of this tokenizer; check tokenizer_config.json")
        self.bos_id, self.eos_id = added.get(bos) if bos else None, added[eos]
        self.stop_ids = {self.eos_id} | {added[t] for t in END_OF_TURN if t in added}
        self._chat_style(chat_template or "")

    def __deepcopy__(self, memo):
        return self  # read-only once built: a copied model (train.py's teacher) shares it, and copying 150k ids takes seconds

    def _chat_style(self, t: str) -> None:
        """Pick the chat format (and its variant) from the template text, or from the special tokens if none."""
        self.chat_format, self._default_system, self._date = None, None, None
        if "<|im_start|>" in t or (not t and "<|im_start|>" in self.added):
            self.chat_format = "chatml"
            m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"]*?)<\|im_end\|>", t)  # e.g. SmolLM2's default
            self._default_system = m and m.group(1).replace("\\n", "\n")
        elif "<|start_header_id|>" in t or (not t and "<|start_header_id|>" in self.added):
            self.chat_format = "llama3"
            if not t or "Cutting Knowledge Date" in t:  # Llama-3.1: always a system turn, with the date
                m = re.search(r"set date_string = \"([^\"]+)\"", t)
                self._date = "today" if "strftime_now" in t else m.group(1) if m else "26 Jul 2024"

    # ---- encoding
    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Ordinary text -> ids. Special-token text is encoded as plain text; non-special added tokens (Qwen's
        <think>, ...) are matched like HF matches them."""
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        for i, part in enumerate(self._plain_re.split(text) if self._plain_re else [text]):
            if i % 2:
                ids.append(self.added[part])
            elif part:
                ids += self.encoding.encode_ordinary(unicodedata.normalize("NFC", part) if self.nfc else part)
        return [i for i in ids if i < self.n_vocab] if self._fill else ids

    def decode(self, ids: list[int]) -> str:
        """Ids -> text: specials as their text, bad utf-8 as U+FFFD, ids past the vocab skipped (as HF does)."""
        return self.encoding.decode([i for i in ids if 0 <= i < self.n_vocab], errors="replace")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the conversation as the model's chat template renders it; message text is encoded as plain text.
        Assistant turns are plain ChatML: Qwen3's thinking template also adds an empty <think> block to an assistant
        turn that follows the last user turn, which we don't (no effect on prompts that end with a user turn)."""
        s = self.added
        if self.chat_format == "chatml":
            if self._default_system and (not messages or messages[0]["role"] != "system"):
                messages = [{"role": "system", "content": self._default_system}, *messages]
            ids = []
            for m in messages:
                ids += [s["<|im_start|>"], *self.encode(m["role"] + "\n" + m["content"]), s["<|im_end|>"]]
                ids += self.encode("\n")
            return ids + ([s["<|im_start|>"], *self.encode("assistant\n")] if add_generation_prompt else [])
        if self.chat_format == "llama3":
            def turn(role, text):
                return [s["<|start_header_id|>"], *self.encode(role), s["<|end_header_id|>"], *self.encode(text)]
            ids = [s["<|begin_of_text|>"]]
            if self._date:
                date = time.strftime("%d %b %Y") if self._date == "today" else self._date
                system = ""
                if messages and messages[0]["role"] == "system":
                    system, messages = messages[0]["content"].strip(), messages[1:]
                text = f"\n\nCutting Knowledge Date: December 2023\nToday Date: {date}\n\n{system}"
                ids += [*turn("system", text), s["<|eot_id|>"]]
            for m in messages:
                ids += [*turn(m["role"], "\n\n" + m["content"].strip()), s["<|eot_id|>"]]
            return ids + (turn("assistant", "\n\n") if add_generation_prompt else [])
        raise ValueError("unknown chat format: the tokenizer has no ChatML or Llama-3 chat template")

    # ---- saving
    def _hf_json(self) -> dict:
        """A HF tokenizers byte-level BPE file equivalent to this tokenizer."""
        vocab = {"".join(B2U[b] for b in t): i for t, i in self.ranks.items()}
        merges = self.merges
        if merges is None:  # tiktoken file: every split of a token into two tokens is a merge, in token-id order
            merges = [(t[:k], t[k:]) for t, _ in sorted(vocab.items(), key=lambda x: x[1])
                      for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
        vocab |= self.added  # HF renumbers added tokens that are missing from the model vocab
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                  "special": t in self.special} for t, i in sorted(self.added.items(), key=lambda x: x[1])]
        post = None
        if self.bos_id is not None:  # HF's encode(text) adds BOS
            bos = self.decode([self.bos_id])
            seq = [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
            post = {"type": "TemplateProcessing", "single": seq,
                    "pair": seq + [{"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {bos: {"id": bos, "ids": [self.bos_id], "tokens": [bos]}}}
        return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                "normalizer": {"type": "NFC"} if self.nfc else None, "pre_tokenizer": self.pre,
                "post_processor": post, "decoder": BYTE_LEVEL,
                "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                          "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                          "vocab": vocab, "merges": [list(m) for m in merges]}}

    def save(self, out_dir) -> None:
        """Write tokenizer.json (a copy, if we loaded one) and tokenizer_config.json into out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        text = self.source.read_text("utf-8") if self.source else json.dumps(self._hf_json(), ensure_ascii=False)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.bos_id is not None,
                  "bos_token": self.decode([self.bos_id]) if self.bos_id is not None else None,
                  "eos_token": self.decode([self.eos_id]), "clean_up_tokenization_spaces": False,
                  "chat_template": self.chat_template or {"chatml": CHATML_JINJA, "llama3": LLAMA31_JINJA}.get(
                      self.chat_format)}
        write_file_atomically(out / "tokenizer.json", lambda tmp: tmp.write_text(text, encoding="utf-8"), len(text))
        config_text = json.dumps(config, indent=2, ensure_ascii=False)
        write_file_atomically(out / "tokenizer_config.json", lambda tmp: tmp.write_text(config_text, encoding="utf-8"),
                              len(config_text))

    # ---- loading
    @classmethod
    def _from_bpe(cls, vocab: dict[str, int], merges: list, added: dict[str, int], **kw) -> "Tokenizer":
        """From a byte-level vocab (token string -> id) and merges, as in tokenizer.json and GGUF."""
        _check_merge_order(vocab, merges)
        added_ids = set(added.values())
        ranks = {byte_level_to_bytes(t): i for t, i in vocab.items() if i not in added_ids}
        return cls(ranks, added, merges=merges, **kw)

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """A Hugging Face model folder: tokenizer.json, or Llama-3's tokenizer.model (+ tokenizer_config.json)."""
        path = Path(path)
        cfg_file = path / "tokenizer_config.json"
        cfg = _read_json(cfg_file) if cfg_file.exists() else {}
        _check_tokenizer_config(cfg_file, cfg)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (path / "chat_template.jinja").exists():  # newer transformers save it on its own
            template = (path / "chat_template.jinja").read_text("utf-8")
        bos, eos = (t["content"] if isinstance(t, dict) else t for t in (cfg.get("bos_token"), cfg.get("eos_token")))
        if (path / "tokenizer.json").exists():
            return cls._from_tokenizer_json(path / "tokenizer.json", cfg, template, bos, eos)
        if (path / "tokenizer.model").exists():
            return cls._from_tiktoken_file(path / "tokenizer.model", cfg, template, bos, eos)
        raise ValueError(f"no tokenizer.json or tokenizer.model in {path}; point to a Hugging Face model folder "
                         "(or use Tokenizer.from_gguf for a .gguf file)")

    @classmethod
    def _from_tokenizer_json(cls, file: Path, cfg: dict, template, bos, eos) -> "Tokenizer":
        tj = _read_json(file)
        _check_tokenizer_json(file, tj)
        model, norm = tj["model"], tj.get("normalizer")
        decoder = (tj.get("decoder") or {}).get("type")
        if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
            raise ValueError(f"{file} is not a byte-level BPE tokenizer (SentencePiece, Unigram and WordPiece are not "
                             "supported); use a Llama-3, Qwen or SmolLM2 style model")
        if norm not in (None, {"type": "NFC"}):
            raise ValueError(f"unsupported normalizer {norm} in {file} (only NFC is supported)")
        added = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
        special = {a["content"] for a in tj.get("added_tokens", []) if a.get("special")}
        add_bos = cfg.get("add_bos_token")  # unset: whether the post-processor adds it
        if not (add_bos or add_bos is None and f'"{bos}"' in json.dumps(tj.get("post_processor"))):
            bos = None
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        eos = eos or next((t for t in END_OF_TURN if t in added), None)
        return cls._from_bpe(model["vocab"], merges, added, special=special, pre=tj.get("pre_tokenizer"), bos=bos,
                             eos=eos, chat_template=template, nfc=norm is not None, source=file)

    @classmethod
    def _from_tiktoken_file(cls, file: Path, cfg: dict, template, bos, eos) -> "Tokenizer":
        """Llama-3's tokenizer.model: "base64(token bytes) rank" per line; 256 specials follow the ranks."""
        try:
            lines = (ln.split() for ln in file.read_bytes().split(b"\n") if ln)
            ranks = {base64.b64decode(tok, validate=True): int(rank) for tok, rank in lines}
        except ValueError:
            raise ValueError(f"{file} is not a tiktoken BPE file (SentencePiece models are not supported); "
                             "use a folder with tokenizer.json") from None
        if len(ranks) < 256:
            raise ValueError(f"{file} holds {len(ranks)} tokens, fewer than the 256 bytes a byte-level BPE needs")
        if sorted(ranks.values()) != list(range(len(ranks))):  # a cut or damaged line repeats or skips one
            raise ValueError(f"{file}: the ranks are not 0..{len(ranks) - 1}, each once; the file is damaged")
        names = {int(i): t["content"] for i, t in cfg.get("added_tokens_decoder", {}).items()}
        added = {names.get(len(ranks) + i, t): len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
        bos = None if cfg.get("add_bos_token") is False else bos or "<|begin_of_text|>"
        return cls(ranks, added, set(added), split_byte_level(LLAMA3_PAT), bos=bos, eos=eos or "<|end_of_text|>",
                   chat_template=template)

    @classmethod
    def from_gguf(cls, path, fields=None) -> "Tokenizer":
        """The tokenizer in a GGUF file's tokenizer.ggml.* metadata (byte-level BPE only). fields: the
        file's metadata, if already read (gguf.GGUFReader(path).fields)."""
        if fields is None:
            from gguf import GGUFReader
            fields = GGUFReader(path).fields

        def get(key, default=None):
            return fields[key].contents() if key in fields else default

        if get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"{path}: tokenizer.ggml.model is {get('tokenizer.ggml.model')!r}, only 'gpt2' "
                             "(byte-level BPE) is supported")
        pre = get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE:
            raise ValueError(f"{path}: unknown tokenizer.ggml.pre {pre!r}; add its regex to GGUF_PRE in support/tokenizer.py")
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                    "tokenizer.ggml.eos_token_id"):
            if key not in fields:
                raise ValueError(f"{path}: the GGUF metadata lacks {key}, so it holds no usable tokenizer")
        tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
        if len(tokens) != len(types) or not 0 <= get("tokenizer.ggml.eos_token_id") < len(tokens):
            raise ValueError(f"{path}: the GGUF tokenizer metadata is inconsistent ({len(tokens)} tokens, "
                             f"{len(types)} token types, eos id {get('tokenizer.ggml.eos_token_id')})")
        added = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty not in (1, 6)}  # 1 normal, 6 byte
        special = {t for t, ty in zip(tokens, types) if ty not in (1, 4, 6)}  # 4 user-defined: plain text
        bos = tokens[get("tokenizer.ggml.bos_token_id")] if get("tokenizer.ggml.add_bos_token", False) else None
        merges = [m.split(" ") for m in get("tokenizer.ggml.merges")]
        return cls._from_bpe({t: i for i, t in enumerate(tokens)}, merges, added, special=special, pre=GGUF_PRE[pre],
                             bos=bos, eos=tokens[get("tokenizer.ggml.eos_token_id")],
                             chat_template=get("tokenizer.chat_template"))


def encode_prompt(tok, text: str, chat: bool) -> list[int]:
    """A prompt's ids: in the model's chat template (chat), else as plain text."""
    if chat and tok.chat_format:
        return tok.encode_chat([{"role": "user", "content": text}])
    return tok.encode(text, bos=tok.bos_id is not None)
