"""The GPU run: correctness on CUDA, a real short training run, Qwen3-4B's shape, decoding cost.

    python -m scripts.gpu_check --part correctness --out gpu              # about a minute on an H200
    python -m scripts.gpu_check --part rest --gguf SmolLM2.gguf --out gpu  # about 5 minutes on an H200
    python -m scripts.gpu_check --part plans --out gpu                     # each card's plan, about 4 minutes
    python -m scripts.gpu_check --tiny --out /tmp/gpu                      # every part, tiny, on the CPU

correctness: tiny random models, CPU float32 logits against the device's (plain, cached, the <MTP>
  layout); k=1 against greedy over plain forwards; --verify against k=1 (float32 and bfloat16); which
  attention kernel each kind of call reaches.
rest: SmolLM2-135M tuned by train.py on its own GSM8K answers, then measured against the original's
  k=1 on held-out GSM8K test problems; Qwen3-4B's shape with random bfloat16 weights under the
  paper-gpu recipe (step time, peak memory against optim.memory_estimate, the MTP step against a plain
  step, what one step at lr 1e-5 moves); the cost of a decode pass by rows and context, k=1 against
  the bandwidth bound, the captured fixed-shape passes (time to first token, capture, cost by rows);
  SmolLM2 in bfloat16 against transformers' own generate on the same device.
plans: Qwen3-4B's shape under the plan picked for each card up to this one's size (smaller cards simulated
  by capping the process's memory): peak memory against the estimate, step time, and the MTP step against
  a plain step, warm, with the layout's floor.
Every figure is appended to OUT/results.jsonl the moment it is measured, so a run cut short keeps
what it measured. --tiny runs the same code on tiny shapes on the CPU, so that a test keeps it alive.
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import torch

import train
from data import gsm8k_prompt, load_gsm8k
from data.held_out import against_original, describe_against_original
from decode import generate
from distill import build_batch
from model import ModelConfig, Transformer, rope_frequencies
from support.optim import make_optimizer, memory_estimate, plan_memory
from support.sizing import mask_pass
from support.step_timing import mtp_step_cost
from support.timing import bandwidth_gbs, wait_for
from support.tokenizer import encode_prompt
from support.weights import load_model, model_config

# Qwen3-4B's shape (the qwen3-4b preset, support/weights.py), which the design card's first command trains
QWEN3_4B = {f.name: getattr(model_config("qwen3-4b"), f.name) for f in fields(ModelConfig) if f.name != "hf"}
QWEN3_4B["mask_id"] = 151669
# what --tiny puts in its place: the same kinds of layer, small enough for a CPU
TINY_4B = dict(QWEN3_4B, vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
               mask_id=500)
LOGIT_TOL = 1e-4  # float32 logits, CPU against the device
ROOT = Path(__file__).resolve().parent.parent


class Results:
    """results.jsonl in the output folder: one JSON object per figure, flushed as it comes."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "results.jsonl"

    def __call__(self, name: str, **fields):
        line = json.dumps({"name": name, **fields}, default=float)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)


def random_model(cfg: dict, device, dtype=torch.float32, seed=0) -> Transformer:
    """A Transformer of this shape with random weights (std 0.02, norms at 1), made on the device."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(ModelConfig(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
            elif "norm" in name:
                p.add_(0.1 * torch.randn_like(p))  # away from 1, so that a wrong norm shows
    model.to(dtype)
    model.inv_freq = rope_frequencies(model.cfg).to(device)  # RoPE stays float32
    return model.eval()


# -----------------------------------------------------------------------------
# correctness

def tiny_shapes(tiny: bool) -> dict[str, dict]:
    small = dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
                 max_seq_len=1024, mask_id=299)
    return {"llama (GQA, untied)": dict(small, model_type="llama", tie_embeddings=False),
            "qwen3 (q/k norms, tied)": dict(small, model_type="qwen3", qk_norm=True),
            # head_dim 128 in bfloat16: the case the fused GPU kernels are made for
            "qwen3 head_dim 128": dict(small, model_type="qwen3", qk_norm=True, head_dim=32 if tiny else 128)}


@torch.no_grad()
def logits_against_cpu(record, name, cfg, device):
    """The same weights on the CPU and the device, float32: a plain forward, a cached one in chunks
    (prompt, a ConfAdapt-like chunk of 12 over the cache, then single tokens), the <MTP> layout."""
    cpu = random_model(cfg, "cpu")
    dev = copy.deepcopy(cpu).to(device)
    dev.inv_freq = cpu.inv_freq.to(device)
    idx = torch.randint(0, cfg["mask_id"], (2, 48), generator=torch.Generator().manual_seed(1))
    want = cpu(idx)
    plain = (dev(idx.to(device)).cpu() - want).abs().max().item()
    cache = dev.new_cache(64, batch=2)
    chunks = [dev(idx[:, a:b].to(device), cache=cache).cpu() for a, b in [(0, 30), (30, 42)] + [(i, i + 1) for i in range(42, 48)]]
    cached = (torch.cat(chunks, 1) - want).abs().max().item()
    tokens, lengths = idx, torch.tensor([48, 37])
    b = build_batch(tokens, lengths, 5, cfg["mask_id"], branch_every=3, generator=torch.Generator().manual_seed(5))
    hidden = dev.hidden(b.idx.to(device), b.pos.to(device), b.mask.to(device))
    layout = dev.output(hidden.gather(1, b.pred.to(device)[..., None].expand(-1, -1, hidden.size(-1)))).cpu()
    worst = 0.0
    for row in range(2):
        for p0 in range(0, b.pred.size(1), 5):
            cut = b.pred[row, p0].item()
            plain_in = torch.cat([tokens[row, :cut + 1], torch.full((4,), cfg["mask_id"])])[None]
            worst = max(worst, (layout[row, p0:p0 + 5] - cpu(plain_in)[0, cut:]).abs().max().item())
    ok = max(plain, cached, worst) <= LOGIT_TOL
    record("logits_cpu_vs_device", model=name, device=str(device), plain=plain, cached=cached, mtp_layout=worst,
           tol=LOGIT_TOL, ok=ok)
    return dev


@torch.no_grad()
def greedy_by_plain_forwards(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids], device=model.embed_tokens.weight.device))[0, -1].argmax()))
    return ids[len(prompt):]


def decoding_against_k1(record, name, model, n_prompts, n_new):
    """k=1 (cached) against greedy over plain forwards; --verify, ConfAdapt with the whole block and
    static k against k=1, in float32 and bfloat16: same text per prompt."""
    prompts = [torch.randint(0, model.cfg.mask_id, (20 + 7 * i,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(n_prompts)]
    same_greedy = sum(generate(model, p, n_new, k=1).tokens == greedy_by_plain_forwards(model, p, n_new) for p in prompts)
    record("k1_equals_greedy", model=name, same=same_greedy, of=n_prompts, ok=same_greedy == n_prompts)
    for dtype in (torch.float32, torch.bfloat16):
        m = copy.deepcopy(model).to(dtype)
        m.inv_freq = model.inv_freq
        k1 = [generate(m, p, n_new, k=1).tokens for p in prompts]
        verify = [generate(m, p, n_new, verify=True, k_max=8) for p in prompts]
        same = sum(r.tokens == t for r, t in zip(verify, k1))
        tokens_differ = sum(a != b for r, t in zip(verify, k1) for a, b in zip(r.tokens, t))
        generate(m, prompts[0], n_new, threshold=0.9, k_max=8), generate(m, prompts[0], n_new, k=3, k_max=8)
        record("verify_equals_k1", model=name, dtype=str(dtype).removeprefix("torch."), same_text=same, of=n_prompts,
               tokens_differ=tokens_differ, drafts_fed=sum(r.drafts_fed for r in verify),
               drafts_accepted=sum(r.drafts_accepted for r in verify),
               ok=same == n_prompts if dtype == torch.float32 else None)


ATTENTION_OPS = {  # the aten op each SDPA backend runs under (torch.profiler's CPU-side names)
    "flash": ("_flash_attention_forward", "_scaled_dot_product_flash_attention"),
    "efficient": ("_efficient_attention_forward", "_scaled_dot_product_efficient_attention"),
    "cudnn": ("_scaled_dot_product_cudnn_attention", "_cudnn_attention_forward"),
    "math": ("_scaled_dot_product_attention_math",),
}


def backends_of(fn) -> list[str]:
    """Which attention backends fn() reaches, read off the operators torch.profiler records."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    found = {b for b, ops in ATTENTION_OPS.items() for n in names for op in ops if op in n}
    if "flash" in found and any("for_cpu" in n for n in names):
        found = (found - {"flash"}) | {"flash (cpu)"}
    return sorted(found)


def timed_ms(fn, device, reps=10):
    fn()
    wait_for(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    wait_for(device)
    return 1e3 * (time.perf_counter() - t0) / reps


def attention_paths(record, cfg, device, tiny):
    """For each kind of call the project makes, the attention backend it reaches and its time, in
    bfloat16 at head_dim 128 (float32 too on the device's decode pass, the --verify check's dtype)."""
    from decode import branch_layout
    context = 64 if tiny else 512
    for dtype in (torch.bfloat16, torch.float32):
        model = random_model(cfg, device, dtype)
        cache = model.new_cache(context + 64)
        prompt = torch.randint(0, cfg["mask_id"], (1, context), device=device)
        model(prompt, cache=cache)

        def cached(idx, pos=None, mask=None):
            def run():
                model(idx, pos, mask, cache=cache)
                cache.truncate(context)
            return run
        one = torch.ones(1, 1, dtype=torch.long, device=device)
        block = torch.full((1, 16), cfg["mask_id"], dtype=torch.long, device=device)
        pos, mask = branch_layout(4, list(range(4)), 3, context, device)  # --verify: 4 fed tokens, branches of 3
        verify_idx = torch.full((1, len(pos)), cfg["mask_id"], dtype=torch.long, device=device)
        calls = {"prefill, no cache": lambda: model(prompt),
                 "prefill into an empty cache": lambda: model(prompt, cache=model.new_cache(context)),
                 "k=1 step (1 row over the cache)": cached(one),
                 "ConfAdapt pass (16 rows over the cache)": cached(block),
                 "--verify pass (explicit mask over the cache)": cached(verify_idx, pos, mask)}
        if dtype == torch.bfloat16:
            tokens = torch.randint(0, cfg["mask_id"], (4, 160), generator=torch.Generator().manual_seed(0)).to(device)
            b = build_batch(tokens, torch.full((4,), 160, device=device), 16, cfg["mask_id"], 32)
            train_model = random_model(cfg, device, dtype).train()

            def step():
                hidden = train_model.hidden(b.idx, b.pos, b.mask)
                logits = train_model.output(hidden.gather(1, b.pred[..., None].expand(-1, -1, hidden.size(-1))))
                logits.float().logsumexp(-1).mean().backward()
            calls["training layout, forward + backward (4 x 235 slots)"] = step
        with torch.no_grad():
            for name, fn in calls.items():
                with torch.enable_grad() if name.startswith("training") else torch.no_grad():
                    record("attention_path", call=name, dtype=str(dtype).removeprefix("torch."), device=str(device),
                           backends=backends_of(fn), ms=timed_ms(fn, device, reps=3 if tiny else 10))


def correctness(record, device, tiny):
    for name, cfg in tiny_shapes(tiny).items():
        try:
            model = logits_against_cpu(record, name, cfg, device)
            decoding_against_k1(record, name, model, *((2, 16) if tiny else (4, 40)))
        except Exception as e:  # a failure is a finding: record it and go on
            record("error", check=f"correctness {name}", error=f"{type(e).__name__}: {e}"[:500])
    try:
        attention_paths(record, tiny_shapes(tiny)["qwen3 head_dim 128"], device, tiny)
    except Exception as e:
        record("error", check="attention paths", error=f"{type(e).__name__}: {e}"[:500])


# -----------------------------------------------------------------------------
# a real short training run, measured against the original

def short_training(record, out, init, device, minutes, tiny):
    """train.py on the model's own GSM8K answers (gated LoRA in the top 4 blocks, float32 weights,
    bfloat16 autocast on a GPU), its log in OUT/train.log; returns the folder of the tuned model."""
    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_check_run"
    flags = ["--init", init, "--device", device, "--recipe", "cpu-hour", "--data", "gsm8k", "--out", str(run_dir),
             "--overwrite", "--dtype", "float32", "--eval-every", "0", "--save-every", "100000", "--log-every", "20"]
    if tiny:
        flags += ["--lora", "8", "--lora-layers", "1", "--self-answers", "4", "--steps", "2", "--batch-size", "2",
                  "--seq-len", "256", "--amp", "none", "--eval-prompts", "1", "--eval-tokens", "16"]
    else:
        flags += ["--lora", "128", "--lora-layers", "4", "--self-answers", "512", "--batch-size", "32",
                  "--max-minutes", str(minutes), "--amp", "bfloat16", "--eval-prompts", "4", "--eval-tokens", "128"]
    t0 = time.time()
    with open(out / "train.log", "w") as log:
        code = subprocess.call([sys.executable, str(ROOT / "train.py"), *flags], stdout=log, stderr=subprocess.STDOUT,
                               cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = (out / "train.log").read_text().splitlines()
    steps = [ln for ln in lines if ln.startswith("step ")]
    record("training", command="python train.py " + " ".join(flags), exit=code, seconds=time.time() - t0,
           last_step=steps[-1] if steps else None, tail=lines[-8:])
    return run_dir / "model" if code == 0 else None


def tuned_against_original(record, model_dir, device, tiny, seconds):
    """The tuned adapter's ConfAdapt(0.9) and --verify against the original's k=1 (the same model's
    k=1 with gated LoRA) on held-out GSM8K test problems 200.., in float32 and bfloat16."""
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(str(model_dir), device=device, dtype=dtype)
        tok = model.tokenizer
        prompts = [encode_prompt(tok, gsm8k_prompt(r["question"]), True)
                   for r in load_gsm8k("test")[200:200 + (2 if tiny else 30)]]
        table, measured = against_original(model, model, tok, prompts, 16 if tiny else 256, 0.9,
                                                 model.cfg.k_max, deadline=time.time() + seconds)
        record("against_original", dtype=str(dtype).removeprefix("torch."), device=device, prompts=measured,
               first_problem=200, table=table, lines=describe_against_original(table))
        seconds /= 2  # bfloat16: the mismatch rate of --verify, on fewer prompts


def bring_back(out: Path, model_dir: Path, part_bytes=15 << 20):
    """The adapter into OUT/adapter: its config, and its weights cut in parts of at most 15 MiB (the
    most a file may be on the way back); cat adapter.safetensors.part* joins them."""
    dst = out / "adapter"
    dst.mkdir(exist_ok=True)
    (dst / "adapter_config.json").write_text((model_dir / "adapter_config.json").read_text())
    data = (model_dir / "adapter.safetensors").read_bytes()
    for i in range(0, len(data), part_bytes):
        (dst / f"adapter.safetensors.part{i // part_bytes}").write_bytes(data[i:i + part_bytes])


# -----------------------------------------------------------------------------
# Qwen3-4B's shape under the paper's recipe

def paper_run(cfg, device, tiny, out):
    """train.py's Run for the paper-gpu recipe on a random model of this shape, bfloat16 weights with
    a float32 master copy, on random token rows (the step's cost does not depend on the text)."""
    flags = ["--recipe", "paper-gpu", "--device", device, "--out", str(out), "--overwrite",
             "--lr", "1e-5", "--warmup", "1"]
    if tiny:
        flags += ["--batch-size", "2", "--grad-accum", "2", "--seq-len", "48", "--k-max", "4", "--branch-every", "8"]
    args = train.get_args(flags)
    student = random_model(cfg, device, torch.bfloat16).train()
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(0, cfg["mask_id"], (args.seq_len,), generator=g).tolist(), 16) for _ in range(256)]
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    plan_memory(student, args, 1, log)
    tok = SimpleNamespace(eos_id=0)
    return train.Run(args, student, teacher, make_optimizer(student, args), tok, examples, [], out, log=log,
                     hits=torch.zeros(args.k_max), counts=torch.zeros(args.k_max))


def moved_share(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    changed = sum((a.cpu() != b).sum().item() for a, b in zip(after, before))
    return changed / sum(b.numel() for b in before)


def qwen3_4b_shape(record, device, tiny, out):
    cfg = TINY_4B if tiny else QWEN3_4B
    run = paper_run(cfg, device, tiny, out)
    n = sum(p.numel() for p in run.student.parameters())
    estimate = memory_estimate(run.student.cfg, n, run.args, checkpointing=run.student.checkpointing)
    record("qwen3_4b_setup", params=n, checkpointing=run.student.checkpointing, estimate_gib=estimate,
           estimate_total_gib=sum(estimate.values()), micro_batch=run.args.batch_size, grad_accum=run.args.grad_accum,
           seq_len=run.args.seq_len, k_max=run.args.k_max, branch_every=run.args.branch_every)
    ratio = mtp_step_cost(run, 1, train.micro_batches, train.batch_loss)
    record("qwen3_4b_mtp_vs_plain", ratio=ratio, target=1.45, ok=ratio <= 1.45)
    params = [p for p in run.student.parameters()]
    before = [p.detach().cpu().clone() for p in params]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for step in range(2):
        wait_for(device)
        t0 = time.perf_counter()
        r = train.train_step(run, step)
        wait_for(device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        fields = dict(step=step + 1, seconds=seconds, loss=r["loss"], lr=r["lr"], ok=r["ok"], peak_gib=peak,
                      estimate_total_gib=sum(estimate.values()))
        if step == 0:
            masters = [run.optimizer.state[p]["master"] for p in params]
            fields.update(master_moved=moved_share([b.float() for b in before], masters),
                          bf16_moved=moved_share(before, [p.detach() for p in params]))
        record("qwen3_4b_step", **fields)
    if not tiny:  # the same with activation checkpointing, the estimate's other column
        run.student.checkpointing = True
        torch.cuda.reset_peak_memory_stats()
        wait_for(device)
        t0 = time.perf_counter()
        train.train_step(run, 2)
        wait_for(device)
        est = memory_estimate(run.student.cfg, n, run.args, checkpointing=True)
        record("qwen3_4b_step_checkpointed", seconds=time.perf_counter() - t0,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30, estimate_total_gib=sum(est.values()))
    model = run.student.eval()
    del run
    return model


CARDS = (24, 47.5, 79.6, 140.4)  # GiB: the cards people own or rent (README, "On a GPU")


def plans_on_this_card(record, device, tiny, out, steps=10):
    """Qwen3-4B's shape with random bfloat16 weights under the plan `train.py --plan --gpu-memory GIB` picks
    for each card up to this one's size, a smaller card simulated by capping this process's memory
    (torch.cuda.set_per_process_memory_fraction: "H200, memory capped" is not that card): the peak memory
    against the plan's estimate, the mean step time after one warm-up step, and on the largest the MTP step
    against a plain step over the same rows, warm, with the layout's floor (3 + 1) S / (3 R)."""
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.startswith("cuda") else 150.0
    for card in [c for c in CARDS if c <= total]:
        flags = ["--init", "qwen3-4b", "--gpu-memory", str(card), "--device", device, "--out", str(out),
                 "--overwrite", "--warmup", "1"]
        if tiny:
            flags += ["--seq-len", "48", "--k-max", "4", "--branch-every", "8", "--batch-size", "2", "--grad-accum", "2"]
        try:
            run, plan = planned_run(flags, TINY_4B if tiny else QWEN3_4B, device, out)
            if device.startswith("cuda"):
                torch.cuda.set_per_process_memory_fraction(min(1.0, card / total), device)
                torch.cuda.reset_peak_memory_stats()
            seconds = []
            for step in range(1 + (2 if tiny else 3)):
                wait_for(device)
                t0 = time.perf_counter()
                train.train_step(run, step)
                wait_for(device)
                seconds.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
            record("plan_on_card", card_gib=card, capped=card < total, plan=plan.line(), estimate_gib=plan.gib,
                   peak_gib=peak, step_seconds=sum(seconds[1:]) / len(seconds[1:]), warm_up_seconds=seconds[0])
            if card == max(c for c in CARDS if c <= total):
                slots = real = 0
                for step in range(1, 1 + steps):
                    for b in train.micro_batches(run, step):
                        slots, real = slots + b.idx.numel(), real + b.idx.size(0) * (b.idx.size(1) - b.fill.size(1))
                ratio = mtp_step_cost(run, 2 if tiny else steps, train.micro_batches, train.batch_loss)
                record("mtp_vs_plain_warm", card_gib=card, steps=steps, ratio=ratio, floor=4 * slots / (3 * real),
                       within_15_percent=ratio <= 1.15 * 4 * slots / (3 * real))
        except torch.OutOfMemoryError as e:
            record("plan_on_card", card_gib=card, capped=card < total, error=f"out of memory: {e}"[:300])
        finally:
            run = None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(1.0, device)


def planned_run(flags, cfg, device, out):
    """train.py's Run under the plan for these flags, on a random model of this shape and random token rows."""
    from lora import add_lora
    from support.plan import apply_plan, plan_run
    args = train.get_args(flags)
    args.device = device  # --gpu-memory plans for a card; --tiny runs the plan on the CPU
    plan = plan_run(args, ModelConfig(**cfg))
    apply_plan(plan, args, out)
    student = random_model(cfg, device, torch.bfloat16).train()
    if args.lora:
        teacher = add_lora(student, args.lora, args.lora_alpha, layers=args.lora_layers or None)
    else:
        teacher = copy.deepcopy(student).requires_grad_(False).eval()
    student.checkpointing = args.checkpoint_activations == "on"
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(0, cfg["mask_id"], (args.seq_len,), generator=g).tolist(), 16) for _ in range(256)]
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    run = train.Run(args, student, teacher, make_optimizer(student, args), SimpleNamespace(eos_id=0), examples,
                    [], out, log=log, hits=torch.zeros(args.k_max), counts=torch.zeros(args.k_max))
    return run, plan


@torch.no_grad()
def decode_cost(record, model, device, tiny):
    """A decode pass of 1..64 rows over contexts of 512 and 4096 (ms), and k=1 tokens/s against the
    bound of reading every weight once per token at the measured copy bandwidth."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    rows = [1, 2, 4, 8, 16, 32, 64]
    for context in ((32, 64) if tiny else (512, 4096)):
        one_pass = mask_pass(model, rows, context)
        ms = {r: timed_ms(lambda: one_pass(r), device, reps=2 if tiny else 10) for r in rows}
        record("decode_pass_ms", context=context, dtype="bfloat16", ms=ms, vs_one_row={r: ms[r] / ms[1] for r in rows})
    weights = {t.data_ptr(): t for t in model.state_dict().values()}.values()
    weight_bytes = sum(t.numel() * t.element_size() for t in weights)
    bandwidth = bandwidth_gbs(device, n_bytes=(1 << 24) if tiny else (1 << 30))
    prompt = torch.randint(0, model.cfg.mask_id, (64 if tiny else 512,), generator=torch.Generator().manual_seed(0)).tolist()
    static = device.startswith("cuda")  # the passes a GPU decodes with (support/static_passes.py), warmed up
    generate(model, prompt, 8, k=1, static=static)
    r = generate(model, prompt, 16 if tiny else 256, k=1, static=static)
    eager = generate(model, prompt, 16 if tiny else 64, k=1, static=False)
    bound = bandwidth * 1e9 / weight_bytes
    record("k1_vs_bandwidth", tokens_per_s=r.tokens_per_s, bound_tokens_per_s=bound, share_of_bound=r.tokens_per_s / bound,
           weight_gb=weight_bytes / 1e9, copy_bandwidth_gbs=bandwidth, captured=static,
           eager_tokens_per_s=eager.tokens_per_s)
    for context in ((32, 64) if tiny else (512, 4096)):
        captured_passes(record, model, device, tiny, prompt[:context] * (context // len(prompt[:context])))


@torch.no_grad()
def captured_passes(record, model, device, tiny, prompt):
    """The fixed-shape passes (support/static_passes.py) after a prompt: the time to the first token (the
    prompt's pass), each row bucket's first call (its capture, kept out of the costs) and then its cost."""
    from support.static_passes import ROW_BUCKETS, StaticPasses
    wait_for(device)
    t0 = time.perf_counter()
    passes = StaticPasses(model, model.new_cache(len(prompt) + 64), {"mode": "reduce-overhead"} if not tiny else None)
    model(torch.tensor([prompt], device=device), cache=passes.cache)
    wait_for(device)
    first_token_s, capture_s, ms = time.perf_counter() - t0, {}, {}
    for rows in ROW_BUCKETS[:6]:
        block = torch.full((1, rows), model.cfg.mask_id, dtype=torch.long, device=device)
        t0 = time.perf_counter()
        passes(block, len(prompt))
        wait_for(device)
        capture_s[rows] = time.perf_counter() - t0
        ms[rows] = timed_ms(lambda: passes(block, len(prompt)), device, reps=2 if tiny else 20)
    record("captured_pass_ms", context=len(prompt), ms=ms, vs_one_row={r: ms[r] / ms[1] for r in ms},
           first_call_s=capture_s, time_to_first_token_s=first_token_s, compiled=not tiny)


@torch.no_grad()
def against_transformers(record, init, model_dir, device, tiny):
    """SmolLM2 in bfloat16 on both sides, on held-out GSM8K test problems 200..219, exactly N new tokens each
    (no stop token): transformers' greedy generate of the original (default, and with its static cache
    compiled, where that runs), our k=1 of the original, and the tuned model's ConfAdapt(0.9) and --verify
    (passes sized by their cost), interleaved; --verify's text against our k=1's."""
    import transformers
    from support.sizing import measure_pass_cost
    dtype, n_new, n_prompts = torch.bfloat16, 16 if tiny else 128, 2 if tiny else 20
    ours = load_model(str(model_dir or init), device=device, dtype=dtype)
    original = ours if getattr(ours, "lora", None) else load_model(init, device=device, dtype=dtype)
    tok = ours.tokenizer
    path = Path(init)

    def hf_model():
        kw = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
        return transformers.AutoModelForCausalLM.from_pretrained(path.parent if kw else path, dtype=dtype, **kw).to(device).eval()
    hf, hf_compiled = hf_model(), hf_model()  # the second: a static cache and a compiled forward (transformers' recipe)
    hf_compiled.forward = torch.compile(hf_compiled.forward, mode="reduce-overhead", fullgraph=True,
                                        **({"backend": "eager"} if tiny else {}))
    prompts = [encode_prompt(tok, gsm8k_prompt(r["question"]), True) for r in load_gsm8k("test")[200:200 + n_prompts]]
    costs = {name: measure_pass_cost(ours, ours.cfg.k_max or 4, name == "verify") for name in ("confadapt", "verify")}

    def hf_generate(p, model=hf, **kw):
        idx = torch.tensor([p], device=device)
        out = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False, pad_token_id=0, **kw)
        return out[0, len(p):].tolist()
    runs = {"transformers": hf_generate,
            "transformers static cache, compiled": lambda p: hf_generate(p, hf_compiled, cache_implementation="static"),
            "k1": lambda p: generate(original, p, n_new, k=1).tokens,
            "confadapt": lambda p: generate(ours, p, n_new, threshold=0.9, k_max=ours.cfg.k_max or 4,
                                            pass_cost=costs["confadapt"]).tokens,
            "verify": lambda p: generate(ours, p, n_new, verify=True, k_max=ours.cfg.k_max or 4,
                                         pass_cost=costs["verify"]).tokens}
    seconds, texts, failed = {name: 0.0 for name in runs}, {name: [] for name in runs}, {}
    for i, p in enumerate([prompts[0][:16]] + prompts):  # the first: a warm-up (captures, compiles)
        for name, run in runs.items():
            if name in failed:
                continue
            wait_for(device)
            t0 = time.perf_counter()
            try:
                tokens = run(p)
            except Exception as e:  # transformers' compiled static cache may not run on this stack
                failed[name] = f"{type(e).__name__}: {e}"[:300]
                continue
            wait_for(device)
            if i:
                seconds[name] += time.perf_counter() - t0
                texts[name].append(tokens)
    speed = {name: n_new * n_prompts / s for name, s in seconds.items() if name not in failed and s}
    best = max(v for name, v in speed.items() if name.startswith("transformers"))
    record("smollm2_vs_transformers", device=device, dtype="bfloat16", prompts=n_prompts, first_problem=200,
           new_tokens=n_new, tokens_per_s=speed, transformers_best=best, k1_tokens_per_s=speed["k1"],
           confadapt_tokens_per_s=speed["confadapt"], verify_tokens_per_s=speed["verify"],
           verify_text_mismatch=sum(a != b for a, b in zip(texts["verify"], texts["k1"])) / n_prompts,
           tuned=model_dir is not None, failed=failed)


def rest(record, out, device, tiny, gguf, minutes, tokenizer=None):
    init = gguf
    if tiny:
        init = str(tiny_checkpoint(tokenizer))
    try:
        model_dir = short_training(record, out, init, device, minutes, tiny)
        if model_dir is not None:
            bring_back(out, model_dir)
            tuned_against_original(record, model_dir, device, tiny, seconds=2 if tiny else 45)
    except Exception as e:
        record("error", check="training", error=f"{type(e).__name__}: {e}"[:500])
        model_dir = None
    try:
        against_transformers(record, init, model_dir, device, tiny)
    except Exception as e:
        record("error", check="against transformers", error=f"{type(e).__name__}: {e}"[:500])
    try:
        model = qwen3_4b_shape(record, device, tiny, Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_check_4b")
        decode_cost(record, model, device, tiny)
    except Exception as e:
        record("error", check="qwen3-4b shape", error=f"{type(e).__name__}: {e}"[:500])


def tiny_checkpoint(tokenizer: str | None = None) -> Path:
    """--tiny: a random Qwen3-shaped model with the real Qwen3 tokenizer (or the one in folder `tokenizer`),
    saved as a HF folder; 32 embedding rows past the tokenizer's ids stay free, as in Qwen3."""
    from support.files import FIXTURES
    from support.tokenizer import Tokenizer
    from support.weights import save_model
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_check_tiny_model"
    tok = Tokenizer.from_dir(tokenizer or FIXTURES / "tokenizers" / "qwen3")
    model = random_model(dict(TINY_4B, vocab_size=tok.n_vocab + 32, mask_id=None), "cpu")
    model.tokenizer = tok
    save_model(model, path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["correctness", "rest", "plans", "all"], default="all")
    p.add_argument("--out", required=True, help="folder for results.jsonl, train.log and the adapter")
    p.add_argument("--gguf", help="the real SmolLM2-135M-Instruct GGUF (the rest part)")
    p.add_argument("--minutes", type=float, default=3.0, help="train.py's --max-minutes in the rest part")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, under a minute")
    p.add_argument("--tokenizer", help="--tiny: the tiny model's tokenizer folder (default: the Qwen3 fixture)")
    args = p.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here (use --tiny on a CPU)")
    if args.part in ("rest", "all") and not args.tiny and not args.gguf:
        sys.exit("error: the rest part needs --gguf (the SmolLM2-135M-Instruct GGUF file)")
    out = Path(args.out)
    record = Results(out)
    where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    record("machine", device=where, torch=torch.__version__, tiny=args.tiny, part=args.part)
    t0 = time.time()
    if args.part in ("correctness", "all"):
        correctness(record, device, args.tiny)
    if args.part in ("rest", "all"):
        rest(record, out, device, args.tiny, args.gguf, args.minutes, args.tokenizer)
    if args.part in ("plans", "all"):
        plans_on_this_card(record, device, args.tiny, Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_check_plans")
    record("done", seconds=time.time() - t0)


if __name__ == "__main__":
    main()
