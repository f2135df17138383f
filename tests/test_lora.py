"""Gated LoRA (train.py --lora): real tokens see the original model exactly (ours and transformers'),
the adapter round-trips through save and load beside untouched original weights, and the shared
ground-truth computation (distill.SharedGroundTruth) gives the loss and gradients of the plain layout."""
import copy
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from decode import generate
from distill import SharedGroundTruth, TwoModels, build_batch, mtp_loss
from support.cpu_kernels import use_few_row_kernels
from lora import GatedLoRALinear, adapter_state, add_lora
from conftest import TINY_MASK
from support.weights import load_model, save_model


def with_random_adapter(model, rank=4, seed=0):
    """add_lora starts with B = 0 (no change at all); a trained adapter is nonzero everywhere."""
    add_lora(model, rank, alpha=2.0 * rank)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (0.3 if p.dim() == 1 else 0))
    return model


def test_real_tokens_see_the_original_smollm2(smollm2, smollm2_hf):
    lora = with_random_adapter(copy.deepcopy(smollm2), rank=8)
    tok = smollm2.tokenizer
    prompt = tok.encode("The capital of France is Paris. The capital of Italy is")
    idx = torch.tensor([prompt])
    V = smollm2_hf.config.vocab_size
    with torch.no_grad():
        ours, base = lora(idx), smollm2(idx)
        hf = smollm2_hf(idx).logits
    assert torch.equal(ours, base)
    torch.testing.assert_close(ours[..., :V], hf, rtol=0, atol=1e-4)
    # with <MTP> slots after the prompt, the prompt's rows are unchanged and the slots are not
    M = smollm2.cfg.mask_id
    with torch.no_grad():
        mixed, mixed_base = lora(torch.tensor([prompt + [M, M]])), smollm2(torch.tensor([prompt + [M, M]]))
    assert torch.equal(mixed[:, :len(prompt)], base)
    assert (mixed[:, len(prompt):] - mixed_base[:, len(prompt):]).abs().max() > 1e-2
    # and the slots of such a mixed pass (decoding) get what a pass of the slots alone over the cached
    # prompt gives them (the all-<MTP> path that training's branch passes take, distill.SharedGroundTruth)
    cache = lora.new_cache(len(prompt) + 2)
    with torch.no_grad():
        lora(idx, cache=cache)
        alone = lora(torch.tensor([[M, M]]), cache=cache)
    torch.testing.assert_close(mixed[:, len(prompt):], alone, rtol=1e-4, atol=1e-4)
    # so k=1 decoding of a gated-LoRA model is the original model, token for token, and --verify
    # with the adapter's drafts is a lossless speed-up of the original
    a = generate(lora, prompt, 24, stop_ids=tok.stop_ids)
    b = generate(smollm2, prompt, 24, stop_ids=tok.stop_ids)
    v = generate(lora, prompt, 24, k_max=4, verify=True, stop_ids=tok.stop_ids)
    assert a.tokens == b.tokens == v.tokens


def test_the_adapters_few_row_kernels_give_the_same_mask_rows(smollm2):
    """use_few_row_kernels gives the adapter's two products of every projection their own kernels
    (decoding on a CPU); a decode pass of a token and masks then computes what it computed before."""
    plain = with_random_adapter(copy.deepcopy(smollm2), rank=8)
    fast = use_few_row_kernels(copy.deepcopy(plain), max_rows=16, pack=True)
    products = [p for m in fast.modules() if isinstance(m, GatedLoRALinear) for p in m.products]
    assert len(products) == 2 * 7 * smollm2.cfg.n_layers
    assert all(sorted(p.plan) == list(range(1, 17)) for p in products)
    assert not any("products" in m.__dict__ for m in plain.modules())  # the model without: addmm
    prompt, M = smollm2.tokenizer.encode("Three apples and four pears are"), smollm2.cfg.mask_id
    for n_masks in (1, 3, 7, 15):
        chunk = torch.tensor([[prompt[-1]] + [M] * n_masks])
        rows = []
        for model in (plain, fast):
            cache = model.new_cache(len(prompt) + n_masks)
            with torch.no_grad():
                model(torch.tensor([prompt[:-1]]), cache=cache)
                rows.append(model(chunk, cache=cache))
        torch.testing.assert_close(rows[1], rows[0], rtol=1e-4, atol=1e-4)


def files_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_adapter_round_trip(tiny_qwen, tmp_path):
    before = files_digest(tiny_qwen)
    model = with_random_adapter(load_model(str(tiny_qwen)))
    model.lora["base"] = str(tiny_qwen)
    model.cfg.k_max = 5
    save_model(model, tmp_path / "adapter", {"train_args.json": "{}\n"})
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter.safetensors" in saved and "adapter_config.json" in saved and "model.safetensors" not in saved
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["rank"] == 4 and conf["mtp_mask_id"] == TINY_MASK and conf["mtp_k_max"] == 5
    n_adapter = sum(p.numel() for p in adapter_state(model).values())
    assert n_adapter < 0.1 * sum(p.numel() for p in model.parameters())

    loaded = load_model(str(tmp_path / "adapter"))
    assert loaded.cfg.k_max == 5 and loaded.tokenizer is not None
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    idx = torch.tensor([[1001, 11, 2001, TINY_MASK, TINY_MASK, TINY_MASK]])
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))
    assert files_digest(tiny_qwen) == before  # the original weights are untouched

    save_model(model, tmp_path / "original", original=True)  # what bench.py gives transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "original").eval()
    real = idx[:, :3]
    with torch.no_grad():
        torch.testing.assert_close(hf(real).logits, model(real), rtol=0, atol=1e-5)


def test_adapter_folder_errors(tiny_qwen, tmp_path):
    model = with_random_adapter(load_model(str(tiny_qwen)))
    model.lora["base"] = str(tiny_qwen)
    save_model(model, tmp_path / "a")
    (tmp_path / "a" / "SHA256SUMS").unlink()  # edited on purpose below: the format's own checks
    conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**conf, "rank": 8}))
    with pytest.raises(ValueError, match=r"lora_a has shape \(4, 32\), expected \(8, 32\)"):
        load_model(str(tmp_path / "a"))
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"rank": 4}))
    with pytest.raises(ValueError, match="lacks base"):
        load_model(str(tmp_path / "a"))
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(conf))
    (tmp_path / "a" / "adapter.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_model(str(tmp_path / "a"))


@pytest.fixture
def tiny_llama(make_tiny, tmp_path):
    _, path = make_tiny(tmp_path / "tiny", "llama", tie_word_embeddings=False)
    model = load_model(str(path), add_mask=False)
    model.cfg.mask_id = 299
    return with_random_adapter(model)


@pytest.mark.parametrize("k,soft", [(2, False), (4, False), (5, True)])
def test_shared_ground_truth_gives_the_plain_layout_loss_and_gradients(tiny_llama, k, soft):
    model = tiny_llama
    g = torch.Generator().manual_seed(k)
    tokens = torch.randint(0, 299, (2, 30), generator=g)
    lengths, start = torch.tensor([30, 21]), torch.tensor([0, 6])
    b = build_batch(tokens, lengths, k, 299, branch_every=3, start=start, generator=g)
    assert b.valid.any()

    def run(fn):
        model.zero_grad()
        loss, metrics = fn()
        loss.backward()
        return loss.item(), metrics, {n: p.grad.clone() for n, p in adapter_state(model).items()}
    plain = run(lambda: mtp_loss(TwoModels(model, model), b, soft=soft))
    shared = run(lambda: mtp_loss(SharedGroundTruth(model), b, soft=soft))
    assert shared[0] == pytest.approx(plain[0], rel=1e-5)
    assert torch.equal(shared[1]["agree_hit"], plain[1]["agree_hit"]) and shared[1]["n"] == plain[1]["n"]
    for name, grad in plain[2].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(shared[2][name], grad, rtol=1e-4, atol=1e-6)


def test_train_lora_saves_an_adapter_that_decodes_as_the_original(script, train_tiny, tiny_qwen, tmp_path):
    out = tmp_path / "out"
    r = train_tiny(out, lora=4, steps=3, k_max=4, branch_every=2, lr=1e-2, warmup=1, eval_every=2, save_every=3,
                   eval_prompts=2)
    assert r.returncode == 0, r.stderr
    memory = next(line for line in r.stdout.splitlines() if line.startswith("memory per device"))
    assert "gated LoRA rank 4" in r.stdout and "teacher" not in memory  # no second copy of the model
    assert re.search(r"eval step 2 \| minute [0-9.]+ \| ConfAdapt\(0.9\) on 2 held-out prompts: acceleration "
                     r"[0-9.]+ tokens per pass \(k=1: 1.00\), same text as k=1 [0-2]/2, teacher loss [0-9.]+ "
                     r"\(k=1 [0-9.]+\)", r.stdout), r.stdout
    model_dir = out / "model"
    assert (model_dir / "adapter.safetensors").exists() and not (model_dir / "model.safetensors").exists()
    tuned = load_model(str(model_dir))
    base = load_model(str(tiny_qwen))
    assert any(p.abs().max() > 0 for n, p in adapter_state(tuned).items() if "lora_b" in n)  # it trained
    prompt = base.tokenizer.encode("What is 3 plus 4?")
    assert generate(tuned, prompt, 12).tokens == generate(base, prompt, 12).tokens
    d = script("decode.py", "--init", model_dir, "--prompt", "What is 3 plus 4?", "--max-new-tokens", "8",
               "--threshold", "0.5", "--json")
    assert d.returncode == 0, d.stderr
    assert len(json.loads(d.stdout)["tokens"]) > 0
    # --eval: the adapter's base is the reference, and its k=1 row is the base model's own k=1
    def evaluate(init):
        e = script("evaluate.py", "--init", init, "--tasks", "gsm8k", "--limit", "2", "--max-new-tokens", "8",
                   "--eval-threshold", "0.5", "--json")
        assert e.returncode == 0, e.stderr
        return json.loads(e.stdout)["models"][0]
    tuned_report, base_report = evaluate(str(model_dir)), evaluate(str(tiny_qwen))
    assert Path(tuned_report["reference"]).resolve() == tiny_qwen.resolve()
    assert tuned_report["all"]["reference k=1"] == tuned_report["all"]["k=1"]
    for key in ("teacher_loss", "new_tokens", "accuracy"):
        assert tuned_report["all"]["reference k=1"][key] == base_report["all"]["k=1"][key], key


def test_adapters_in_the_top_blocks_leave_the_blocks_below_the_original(tiny_qwen, tmp_path):
    """--lora-layers 1: every row, <MTP> rows included, reaches the top block exactly as in the original
    model (transformers' hidden states); only that block's adapters train, with the <MTP> embedding
    fixed; the mask rows' logits are the adapter's, the real rows' the original's; and the adapter
    folder keeps its block count."""
    model = load_model(str(tiny_qwen))
    n = len(model.layers)
    add_lora(model, 4, alpha=8.0, layers=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapter_state(model).items():
            if "lora_" in name:  # the fixed <MTP> embedding stays as it is
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained and all(name.startswith(f"layers.{n - 1}.") and "lora_" in name for name in trained), trained
    into_top = []
    model.layers[-1].register_forward_pre_hook(lambda module, args: into_top.append(args[0]))
    idx = torch.tensor([[1001, 11, 2001, TINY_MASK, TINY_MASK, TINY_MASK]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen).eval()
    with torch.no_grad():
        logits = model(idx)
        ref = hf(idx, output_hidden_states=True)
    torch.testing.assert_close(into_top[0], ref.hidden_states[n - 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[:, :3], ref.logits[:, :3], rtol=0, atol=1e-5)
    assert (logits[:, 3:] - ref.logits[:, 3:]).abs().max() > 1e-3  # the adapter acts on the masks
    model.lora["base"] = str(tiny_qwen)
    save_model(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["layers"] == 1
    loaded = load_model(str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(loaded(idx), logits)
