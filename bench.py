"""Decoding speed, measured side by side in one run on the same model and prompts; and the cost of
a training step.

    python bench.py                       # out/model if train.py wrote one, else SmolLM2-135M
    python bench.py --init out/cpu-run/model --prompts 8 --max-new-tokens 128
    python bench.py --train-step 2 --amp none   # N MTP steps against N plain steps (train.py's flags)

(a) our k=1 decoding vs transformers' generate (greedy, KV cache, same weights, dtype and threads);
(b) ConfAdapt wall-clock tokens/s vs our k=1, next to its acceleration (tokens per forward pass);
(c) our k=1 against the memory-bandwidth bound: weight bytes read per pass / measured bandwidth;
(d) where the time of a k=1 token goes, for both: the same decoding with every linear layer
    replaced by one that returns zeros leaves the time spent outside the matrix products;
(e) --verify wall-clock tokens/s vs our k=1, its acceleration, draft acceptance, rows per pass,
    and whether its output is k=1's, token for token.
Only ratios are meant to be compared; absolute numbers depend on the machine and its load.
transformers is needed here (pip install transformers); nothing else in the project uses it.
"""
import argparse
import contextlib
import json
import sys
import tempfile
import time
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import gsm8k_prompt, load_gsm8k
from decode import encode_prompt, generate, load
from weights import save_model


def bandwidth_gbs(device, n_bytes=1 << 28, reps=5):
    """Measured copy bandwidth (read + write) in GB/s."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        if src.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best / 1e9


def zeros_linear(self, x):
    return x.new_zeros(*x.shape[:-1], self.out_features)


@contextlib.contextmanager
def without_matmuls():
    """Every linear layer returns zeros: a decode step then costs only its overhead."""
    from kernels import FewRowLinear
    with mock.patch.object(nn.Linear, "forward", zeros_linear), \
            mock.patch.object(FewRowLinear, "forward", zeros_linear):
        yield


def bench_train_step(run, n_steps: int):
    """The cost of one MTP step against one plain fine-tuning step (student forward + backward with
    next-token cross-entropy) on the same ground-truth rows. The paper reports about 4/3
    (docs/METHOD.md, "The paper's numbers")."""
    from distill import mtp_loss, mtp_loss_gated
    from optim import autocast
    from train import micro_batches
    args, model = run.args, run.model

    def mtp(b):
        with autocast(args):
            loss, _ = mtp_loss_gated(model, b) if args.lora else mtp_loss(model, run.teacher, b)
        loss.backward()

    frozen = [p for p in run.student.parameters() if not p.requires_grad]

    def plain(b):  # with gated LoRA no real token reaches the adapter: the plain step trains every weight
        L = b.idx.size(1) - b.fill.size(1)
        tokens = b.idx[:, :L]
        for p in frozen:
            p.requires_grad_(True)
        with autocast(args):
            logits = model(tokens)
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        for p in frozen:
            p.requires_grad_(False)
            p.grad = None

    times = {"mtp": 0.0, "plain": 0.0}
    for step in range(n_steps + 1):
        batches = micro_batches(run, step)
        for name, fn in (("mtp", mtp), ("plain", plain)):
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if step:  # the first step is warm-up
                times[name] += time.perf_counter() - t0
            run.optimizer.zero_grad(set_to_none=True)
    ratio = times["mtp"] / times["plain"]
    run.log(f"bench: {n_steps} steps | mtp {times['mtp'] / n_steps:.3f} s/step | plain "
            f"{times['plain'] / n_steps:.3f} s/step | ratio {ratio:.2f} (the paper: about 1.33)")
    return ratio


def main():
    if "--train-step" in sys.argv:  # the rest of the command line is train.py's
        import train
        i = sys.argv.index("--train-step")
        n_steps, rest = int(sys.argv[i + 1]), sys.argv[1:i] + sys.argv[i + 2:]
        args = train.get_args(rest, fresh_out=False)  # own answers an earlier run wrote are reused
        return bench_train_step(train.setup(args), n_steps)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default=None)
    p.add_argument("--prompts", type=int, default=8, help="GSM8K test questions used as prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--k-max", type=int, default=None, help="ConfAdapt and --verify block (default: the model's, "
                   "else 16)")
    p.add_argument("--draft-threshold", type=float, default=None, help="--verify: feed only drafts this confident")
    p.add_argument("--layouts", nargs="+", default=["quadratic"], choices=["quadratic", "simple"],
                   help="--verify branch layouts to time (each interleaved with the rest)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both implementations")
    p.add_argument("--compile", action="store_true", help="torch.compile our model's forward (GPU)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import transformers
    except ImportError:
        sys.exit("error: bench.py compares against transformers: pip install transformers")

    model, tok = load(args.init, args.device, args.dtype)
    k_max = args.k_max or model.cfg.k_max or 16
    with tempfile.TemporaryDirectory() as d:  # the very same weights, in transformers
        save_model(model, d, original=True)  # a gated-LoRA model's k=1 is its original
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, args.dtype)).to(args.device)
    hf.eval()
    if args.compile:
        model.forward = torch.compile(model.forward, dynamic=True)
    prompts = [encode_prompt(tok, gsm8k_prompt(r["question"]), True) for r in load_gsm8k("test")[:args.prompts]]
    stop = sorted(tok.stop_ids)

    def run_hf(prompt):
        t0 = time.perf_counter()
        out = hf.generate(torch.tensor([prompt], device=args.device), max_new_tokens=args.max_new_tokens,
                          do_sample=False, eos_token_id=stop, pad_token_id=tok.eos_id)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out.size(1) - len(prompt), time.perf_counter() - t0

    generate(model, prompts[0], 8, stop_ids=stop)  # warm-up both
    generate(model, prompts[0], 8, verify=True, k_max=k_max)
    run_hf(prompts[0][:16])
    total = {"ours_k1": [0, 0.0], "hf": [0, 0.0], "confadapt": [0, 0.0], "passes": 0}
    verify = {layout: dict(tokens=0, seconds=0.0, passes=0, fed=0, accepted=0, rows=0, same=0)
              for layout in args.layouts}
    same_tokens = 0
    for prompt in prompts:  # interleaved, so that load on the machine hits all of them alike
        ref = generate(model, prompt, args.max_new_tokens, k=1, stop_ids=stop)
        n_hf, t_hf = run_hf(prompt)
        ca = generate(model, prompt, args.max_new_tokens, threshold=args.threshold, k_max=k_max, stop_ids=stop)
        total["ours_k1"][0] += len(ref.tokens)
        total["ours_k1"][1] += ref.seconds
        total["hf"][0] += n_hf
        total["hf"][1] += t_hf
        total["confadapt"][0] += len(ca.tokens)
        total["confadapt"][1] += ca.seconds
        total["passes"] += ca.passes
        same_tokens += n_hf == len(ref.tokens)
        for layout, v in verify.items():
            r = generate(model, prompt, args.max_new_tokens, verify=True, k_max=k_max, layout=layout,
                         draft_threshold=args.draft_threshold, stop_ids=stop)
            for key, value in (("tokens", len(r.tokens)), ("seconds", r.seconds), ("passes", r.passes),
                               ("fed", r.drafts_fed), ("accepted", r.drafts_accepted),
                               ("rows", r.rows_fed), ("same", r.tokens == ref.tokens)):
                v[key] += value
    # (d) k=1 with and without the matrix products: a fixed number of tokens, no stop token
    n_tok, breakdown = min(32, args.max_new_tokens), {}
    for matmuls in (True, False):
        with contextlib.nullcontext() if matmuls else without_matmuls():
            ours = generate(model, prompts[0], n_tok, k=1)
            t0 = time.perf_counter()
            hf.generate(torch.tensor([prompts[0]], device=args.device), max_new_tokens=n_tok,
                        min_new_tokens=n_tok, do_sample=False, pad_token_id=tok.eos_id)
            breakdown[matmuls] = (ours.seconds / len(ours.tokens), (time.perf_counter() - t0) / n_tok)
    ms_per_token = {name: {"total": 1e3 * breakdown[True][i], "outside_matmuls": 1e3 * breakdown[False][i]}
                    for i, name in enumerate(("ours", "hf"))}
    tps = {name: n / t for name, (n, t) in ((k, total[k]) for k in ("ours_k1", "hf", "confadapt"))}
    acceleration = total["confadapt"][0] / total["passes"]
    # bytes read per pass: every weight once (tied embeddings share one storage)
    weight_bytes = sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())
    bw = bandwidth_gbs(args.device)
    bound = bw * 1e9 / weight_bytes
    report = {
        "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(), "prompts": len(prompts),
        "tokens_per_s": tps,
        "a_ours_k1_vs_transformers": tps["ours_k1"] / tps["hf"],
        "b_confadapt_speedup_vs_k1": tps["confadapt"] / tps["ours_k1"], "b_confadapt_acceleration": acceleration,
        "b_speedup_over_acceleration": tps["confadapt"] / tps["ours_k1"] / acceleration,
        "c_bandwidth_GBps": bw, "c_weight_MB": weight_bytes / 1e6, "c_k1_bound_tokens_per_s": bound,
        "c_k1_fraction_of_bound": tps["ours_k1"] / bound,
        "d_ms_per_token": ms_per_token,
        "same_length_outputs": f"{same_tokens}/{len(prompts)}",
        "e_verify": {layout: {
            "tokens_per_s": v["tokens"] / v["seconds"], "speedup_vs_k1": v["tokens"] / v["seconds"] / tps["ours_k1"],
            "acceleration": v["tokens"] / v["passes"], "draft_acceptance": v["accepted"] / max(v["fed"], 1),
            "rows_per_pass": v["rows"] / max(v["passes"] - len(prompts), 1),  # passes after the prompt's
            "same_tokens_as_k1": f"{v['same']}/{len(prompts)}"} for layout, v in verify.items()},
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{args.device} {args.dtype}, {report['threads']} threads, {len(prompts)} GSM8K prompts, "
          f"up to {args.max_new_tokens} new tokens")
    print(f"(a) ours k=1 {tps['ours_k1']:.1f} tok/s vs transformers {tps['hf']:.1f} tok/s: "
          f"{report['a_ours_k1_vs_transformers']:.2f}x")
    print(f"(b) ConfAdapt({args.threshold}, k_max {k_max}) {tps['confadapt']:.1f} tok/s: "
          f"{report['b_confadapt_speedup_vs_k1']:.2f}x wall-clock at acceleration {acceleration:.2f} "
          f"(ratio {report['b_speedup_over_acceleration']:.2f})")
    print(f"(c) bandwidth {bw:.1f} GB/s, weights {weight_bytes / 1e6:.0f} MB: k=1 bound {bound:.1f} tok/s, "
          f"ours at {report['c_k1_fraction_of_bound']:.0%} of it")
    print("(d) ms per k=1 token, total / outside matrix products: " + ", ".join(
        f"{name} {d['total']:.1f} / {d['outside_matmuls']:.1f}" for name, d in ms_per_token.items()))
    for layout, e in report["e_verify"].items():
        drafts = f", drafts >= {args.draft_threshold}" if args.draft_threshold else ""
        print(f"(e) verify(k_max {k_max}{drafts}, {layout}) {e['tokens_per_s']:.1f} tok/s: {e['speedup_vs_k1']:.2f}x "
              f"wall-clock at acceleration {e['acceleration']:.2f}, drafts accepted {e['draft_acceptance']:.0%}, "
              f"{e['rows_per_pass']:.1f} rows per pass, output = k=1 on {e['same_tokens_as_k1']} prompts")


if __name__ == "__main__":
    main()
