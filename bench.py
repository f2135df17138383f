"""Decoding speed, measured side by side in one run on the same model and prompts; and the cost of
a training step.

    python bench.py                       # out/model if train.py wrote one, else SmolLM2-135M
    python bench.py --init out/cpu-run/model --prompts 8 --max-new-tokens 128
    python bench.py --offset 200 --prompts 20    # GSM8K test problems 200-219, never trained or tuned on
    python bench.py --against-original --offset 200 --prompts 20   # only (h) and (i)
    python bench.py --train-step 2 --amp none   # N MTP steps against N plain steps (train.py's flags)

(a) our k=1 decoding vs transformers' generate (greedy, KV cache, same weights, dtype and threads);
(c) our k=1 against the memory-bandwidth bound: weight bytes read per pass / measured bandwidth;
(d) where the time of a k=1 token goes, for both: the same decoding with every linear layer
    replaced by one that returns zeros leaves the time spent outside the matrix products;
(e) k=1, ConfAdapt and --verify on the same prompts, interleaved: tokens/s and its ratio to k=1,
    tokens per pass (acceleration), rows per pass, whether the text is k=1's (verify: always);
    passes sized by their cost (decode.py's default) and/or the whole block (--blocks);
(f) the cost of a pass by rows fed, against the floors of reading every weight once and of the
    FLOPs, both measured on this machine; the machine's class heads the report;
(g) the sized passes as decoding itself timed them, by rows fed (the costs sizing goes by);
(h) ConfAdapt and --verify against the ORIGINAL model's k=1 (a full fine-tune's own k=1 is another
    model): tokens/s ratio, tokens per pass, how often the final answer and text are the original's;
(i) where a pass's time goes, by rows fed: the pass as it is, without the gated-LoRA update, and
    without any matrix product, timed side by side; and torch.profiler's busiest operators.
Only ratios are meant to be compared; absolute numbers depend on the machine and its load.
transformers is needed here (pip install transformers); nothing else in the project uses it.
"""
import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from unittest import mock

import torch
import torch.nn as nn

from data import extract_number, gsm8k_prompt, load_gsm8k
from data.held_out import against_original, describe_against_original
from decode import generate
from support.cli import TREE, add_cpu_kernels_arg
from support.cpu_kernels import machine
from support.sampling import add_sampling_args, check_sampling_args, sampler_of
from support.sizing import PassCost, mask_pass, measure_pass_cost
from support.step_timing import mtp_step_cost
from support.timing import bandwidth_gbs, matmul_gflops
from support.tokenizer import encode_prompt
from support.weights import default_init, default_reference, load, save_model


def zeros_linear(self, x, gate=None):
    return x.new_zeros(*x.shape[:-1], self.out_features)


@contextlib.contextmanager
def without_matmuls():
    """Every linear layer returns zeros: a decode step then costs only its overhead."""
    from support.cpu_kernels import FewRowLinear
    with mock.patch.object(nn.Linear, "forward", zeros_linear), \
            mock.patch.object(FewRowLinear, "forward", zeros_linear):
        yield


@contextlib.contextmanager
def without_adapter():
    """Every gated-LoRA projection computes its base product only, as a real token's row does."""
    from lora import GatedLoRALinear
    from support.cpu_kernels import FewRowGatedLoRA
    base_only = lambda self, x, gate: self.base(x)  # noqa: E731
    with mock.patch.object(GatedLoRALinear, "forward", base_only), mock.patch.object(FewRowGatedLoRA, "forward", base_only):
        yield


@torch.no_grad()
def pass_profile(model, rows=(1, 2, 4, 16), context=256, reps=5, top=6):
    """(i) a pass of r rows (one token, r-1 <MTP>) after `context` cached positions, timed as it is,
    without the adapter's update, and without any matrix product (best of reps, interleaved): the
    differences are the adapter's time and the base products' time, the last is the rest. Then
    torch.profiler's operators with the most self CPU time in one such pass, with their call counts."""
    one_pass = mask_pass(model, rows, context)
    variants = {"as is": contextlib.nullcontext, "no adapter": without_adapter, "no products": without_matmuls}
    ms = {(v, r): math.inf for v in variants for r in rows}
    for rep in range(reps + 1):  # the first round warms up
        for v, variant in variants.items():
            with variant():
                for r in rows:
                    t0 = time.perf_counter()
                    one_pass(r)
                    if rep:
                        ms[v, r] = min(ms[v, r], 1e3 * (time.perf_counter() - t0))
    report = {}
    for r in rows:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            one_pass(r)
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        report[r] = {"ms": ms["as is", r], "adapter_ms": ms["as is", r] - ms["no adapter", r],
                     "base_products_ms": ms["no adapter", r] - ms["no products", r], "rest_ms": ms["no products", r],
                     "top": [(e.key, e.count, e.self_cpu_time_total / 1e3) for e in ops[:top]]}
    return report


def pass_cost_table(model, device, dtype, max_rows=32):
    """(f) the cost of a pass by rows fed, against its two floors: every weight read once (weight
    bytes / copy bandwidth) and every row multiplied through every matrix (FLOPs / matmul rate)."""
    cost = PassCost.measure(model, max_rows, reps=5)
    weights = {t.data_ptr(): t for t in model.state_dict().values()}.values()  # tied embeddings: one storage
    weight_bytes = sum(t.numel() * t.element_size() for t in weights)
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    bw, rate = bandwidth_gbs(device), matmul_gflops(device, dtype)
    rows = {r: {"ms": 1e3 * s, "vs_one_row": s / cost.seconds[0],
                "bytes_floor_ms": 1e3 * weight_bytes / (bw * 1e9),
                "flops_floor_ms": 1e3 * 2 * matmul_params * r / (rate * 1e9)}
            for r, s in zip(cost.rows, cost.seconds)}
    return cost, {"bandwidth_GBps": bw, "matmul_GFLOPs": rate, "weight_MB": weight_bytes / 1e6, "rows": rows}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--train-step" in argv:  # the rest of the command line is train.py's
        import train
        i = argv.index("--train-step")
        n_steps, rest = int(argv[i + 1]), argv[:i] + argv[i + 2:]
        args = train.get_args(rest, fresh_out=False)  # own answers an earlier run wrote are reused
        return mtp_step_cost(train.setup(args), n_steps, train.micro_batches, train.batch_loss)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default=None)
    p.add_argument("--prompts", type=int, default=8, help="GSM8K test questions used as prompts")
    p.add_argument("--against-original", action="store_true", help="only (h) and (i): the tuned model "
                   "against the original's k=1, and where a pass's time goes")
    p.add_argument("--kernels-against-plain", action="store_true", help="only: decoding with the CPU's few-row "
                   "kernels against the plain layers (--no-cpu-kernels), the same model loaded twice, interleaved")
    p.add_argument("--offset", type=int, default=0, help="the first GSM8K test question used (time problems "
                   "the model was neither trained nor tuned on)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--k-max", type=int, default=None, help="ConfAdapt and --verify block (default: the model's, "
                   "else 16)")
    p.add_argument("--draft-threshold", type=float, default=None, help="--verify: feed only drafts this confident")
    p.add_argument("--layouts", nargs="+", default=["quadratic"], choices=["quadratic", "simple"],
                   help="--verify branch layouts to time (each interleaved with the rest)")
    p.add_argument("--trees", nargs="+", type=int, default=[None], help="--verify: the candidates tried at each "
                   "draft position, a tree per value (default: decode.py's), each interleaved with the rest")
    p.add_argument("--blocks", nargs="+", default=["sized"], choices=["sized", "full"],
                   help="ConfAdapt and --verify passes: sized by their cost (decode.py's default) or the whole block")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both implementations")
    p.add_argument("--compile", action="store_true", help="torch.compile our model's blocks (Transformer.hidden; GPU)")
    p.add_argument("--json", action="store_true")
    add_sampling_args(p)
    add_cpu_kernels_arg(p)
    args = p.parse_args(argv)
    check_sampling_args(args, p)
    if args.kernels_against_plain and not args.cpu_kernels:
        p.error("--kernels-against-plain times the kernels against --no-cpu-kernels: give only one of them")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import transformers
    except ImportError:
        sys.exit("error: bench.py compares against transformers: pip install transformers")

    questions = load_gsm8k("test")[args.offset:args.offset + args.prompts]
    if not questions:
        raise ValueError(f"--offset {args.offset} is past the last of GSM8K's 1319 test questions")
    init = args.init or default_init()
    model, tok = load(init, args.device, args.dtype, args.cpu_kernels)
    k_max = args.k_max or model.cfg.k_max or 16
    prompts = [encode_prompt(tok, gsm8k_prompt(r["question"]), True) for r in questions]
    header = {"machine": machine(), "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "prompts": len(prompts), "offset": args.offset, "k_max": k_max}
    if args.kernels_against_plain:
        report = {**header, "kernels_against_plain": kernels_against_plain(init, model, tok, prompts, args, k_max)}
        print(json.dumps(report) if args.json else "\n".join(
            [f"machine: {report['machine']}", f"{args.dtype}, {report['threads']} threads, GSM8K test prompts "
             f"{args.offset}-{args.offset + len(prompts) - 1}, interleaved: tokens/s with the few-row kernels, plain"] +
            [f"    {name:<16} {t['kernels']:6.1f} {t['plain']:6.1f}  {t['kernels'] / t['plain']:.2f}x"
             for name, t in report["kernels_against_plain"].items()]))
        return
    if args.against_original:
        report = {**header, **against_original_report(init, model, tok, prompts, args, k_max)}
        if args.json:
            print(json.dumps(report))
        else:
            print_against_original(report, args)
        return
    with tempfile.TemporaryDirectory() as d:  # the very same weights, in transformers
        save_model(model, d, original=True)  # a gated-LoRA model's k=1 is its original
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, args.dtype)).to(args.device)
    hf.eval()
    if args.compile:
        model.hidden = torch.compile(model.hidden, dynamic=True)
    stop = sorted(tok.stop_ids)
    n_new = args.max_new_tokens

    def run_hf(prompt):
        t0 = time.perf_counter()
        drawn = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k or 0, top_p=args.top_p or 1.0) \
            if args.temperature else dict(do_sample=False)
        out = hf.generate(torch.tensor([prompt], device=args.device), max_new_tokens=n_new, eos_token_id=stop,
                          pad_token_id=tok.eos_id, **drawn)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out.size(1) - len(prompt), time.perf_counter() - t0

    cost, floors = pass_cost_table(model, args.device, getattr(torch, args.dtype), max(32, min(k_max ** 2, 64)))
    common = dict(stop_ids=stop, sampler=sampler_of(args, args.device))
    strategies = {"k=1": lambda prompt: generate(model, prompt, n_new, k=1, **common)}
    for block in args.blocks:
        c = cost if block == "sized" else None
        strategies[f"ConfAdapt({args.threshold}), {block}"] = lambda prompt, c=c: generate(
            model, prompt, n_new, threshold=args.threshold, k_max=k_max, pass_cost=c, **common)
        for layout in args.layouts:
            strategies[f"verify {layout}, {block}"] = lambda prompt, c=c, layout=layout: generate(
                model, prompt, n_new, verify=True, k_max=k_max, layout=layout, draft_threshold=args.draft_threshold,
                pass_cost=c, **common)
    for run in strategies.values():  # warm-up: every kernel has chosen for its rows
        run(prompts[0][:16])
    run_hf(prompts[0][:16])
    totals = {name: dict(tokens=0, seconds=0.0, passes=0, rows=0, fed=0, accepted=0, same=0) for name in strategies}
    hf_total = [0, 0.0]
    for prompt in prompts:  # interleaved, so that load on the machine hits all of them alike
        ref = None
        for name, run in strategies.items():
            r = run(prompt)
            ref = r.tokens if ref is None else ref  # k=1 runs first: the text every other one is compared to
            for key, value in (("tokens", len(r.tokens)), ("seconds", r.seconds), ("passes", r.passes - 1),
                               ("rows", r.rows_fed), ("fed", r.drafts_fed), ("accepted", r.drafts_accepted),
                               ("same", r.tokens == ref)):
                totals[name][key] += value
            if name == "k=1":
                n_hf, t_hf = run_hf(prompt)
                hf_total[0] += n_hf
                hf_total[1] += t_hf
    # (d) k=1 with and without the matrix products: a fixed number of tokens, no stop token
    n_tok, breakdown = min(32, n_new), {}
    for matmuls in (True, False):
        with contextlib.nullcontext() if matmuls else without_matmuls():
            ours = generate(model, prompts[0], n_tok, k=1)
            t0 = time.perf_counter()
            hf.generate(torch.tensor([prompts[0]], device=args.device), max_new_tokens=n_tok,
                        min_new_tokens=n_tok, do_sample=False, pad_token_id=tok.eos_id)
            breakdown[matmuls] = (ours.seconds / len(ours.tokens), (time.perf_counter() - t0) / n_tok)
    ms_per_token = {name: {"total": 1e3 * breakdown[True][i], "outside_matmuls": 1e3 * breakdown[False][i]}
                    for i, name in enumerate(("ours", "hf"))}
    k1_tps = totals["k=1"]["tokens"] / totals["k=1"]["seconds"]
    hf_tps = hf_total[0] / hf_total[1]
    bound = floors["bandwidth_GBps"] * 1e3 / floors["weight_MB"]
    report = {
        **header,
        "a_ours_k1_vs_transformers": k1_tps / hf_tps, "a_tokens_per_s": {"ours_k1": k1_tps, "transformers": hf_tps},
        "c_k1_bound_tokens_per_s": bound, "c_k1_fraction_of_bound": k1_tps / bound,
        "d_ms_per_token": ms_per_token,
        "e_strategies": {name: {
            "tokens_per_s": t["tokens"] / t["seconds"], "vs_k1": t["tokens"] / t["seconds"] / k1_tps,
            "acceleration": t["tokens"] / (t["passes"] + len(prompts)),
            "rows_per_pass": t["rows"] / max(t["passes"], 1),  # the passes after the prompt's
            "draft_acceptance": t["accepted"] / t["fed"] if t["fed"] else None,
            "same_text_as_k1": f"{t['same']}/{len(prompts)}"} for name, t in totals.items()},
        "f_pass_cost": floors,
        "g_decode_pass_ms": decode_pass_ms(cost),
        **against_original_report(init, model, tok, prompts, args, k_max),
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"machine: {report['machine']}")
    print(f"{args.device} {args.dtype}, {report['threads']} threads, {len(prompts)} GSM8K prompts, "
          f"up to {n_new} new tokens, k_max {k_max}")
    print(f"(a) ours k=1 {k1_tps:.1f} tok/s vs transformers {hf_tps:.1f} tok/s: "
          f"{report['a_ours_k1_vs_transformers']:.2f}x")
    print(f"(c) bandwidth {floors['bandwidth_GBps']:.1f} GB/s, weights {floors['weight_MB']:.0f} MB: k=1 bound "
          f"{bound:.1f} tok/s, ours at {report['c_k1_fraction_of_bound']:.0%} of it")
    print("(d) ms per k=1 token, total / outside matrix products: " + ", ".join(
        f"{name} {d['total']:.1f} / {d['outside_matmuls']:.1f}" for name, d in ms_per_token.items()))
    print("(e) strategy: tokens/s, against k=1, tokens per pass (acceleration), rows per pass, text = k=1")
    for name, e in report["e_strategies"].items():
        drafts = f", drafts accepted {e['draft_acceptance']:.0%}" if e["draft_acceptance"] is not None else ""
        print(f"    {name:<28} {e['tokens_per_s']:6.1f} tok/s {e['vs_k1']:5.2f}x  acceleration "
              f"{e['acceleration']:.2f}  {e['rows_per_pass']:4.1f} rows  same text {e['same_text_as_k1']}{drafts}")
    print(f"(f) pass cost by rows fed (matmul rate {floors['matmul_GFLOPs']:.0f} GFLOP/s): rows, ms, against one row, "
          f"floors: weight bytes / bandwidth, FLOPs / matmul rate")
    for r, f in floors["rows"].items():
        print(f"    {r:>3} {f['ms']:7.1f} ms {f['vs_one_row']:5.2f}x   floors {f['bytes_floor_ms']:.1f} / "
              f"{f['flops_floor_ms']:.1f} ms")
    print("(g) the sized passes as decoding timed them (sizing.PassCost.observe): rows, mean ms (passes)")
    print("    " + ", ".join(f"{r}: {g['ms']:.1f} ({g['passes']})" for r, g in report["g_decode_pass_ms"].items()))
    print_against_original(report, args)


def against_original_report(init, model, tok, prompts, args, k_max) -> dict:
    """(h) against the original model's k=1 (a full fine-tune's own k=1 is another model), and (i)."""
    reference = default_reference(init, model)
    original = model if getattr(model, "lora", None) or reference == init else load(reference, args.device, args.dtype, args.cpu_kernels)[0]
    sampler = sampler_of(args, model.embed_tokens.weight.device)
    table, _ = against_original(original, model, tok, prompts, args.max_new_tokens, args.threshold, k_max,
                                teacher_loss=True, trees=args.trees, sampler=sampler)
    report = {"h_against_original": {"original": reference, **table}, "i_pass_profile": pass_profile(model)}
    if sampler is not None:  # the same distribution as k=1 sampling's (--verify): the losses' difference
        report["h_teacher_loss_difference"] = {name: bootstrap_difference(t["teacher_nll_and_tokens"],
                                                                          table["original k=1"]["teacher_nll_and_tokens"])
                                               for name, t in table.items() if name != "original k=1"}
    if args.dtype != "float32":  # how often rounding alone changes the original's own text and answer
        in_float32 = load(reference, args.device, "float32", args.cpu_kernels)[0]
        report["h_original_vs_float32"] = k1_agreement(original, in_float32, tok, prompts, args.max_new_tokens)
    return report


def kernels_against_plain(init, model, tok, prompts, args, k_max) -> dict:
    """tokens/s of k=1, ConfAdapt and --verify (passes sized by their cost) with the few-row kernels (model,
    as main loaded it) and with the plain layers (init loaded again), each prompt decoded every way in turn."""
    runs, n, stop = {}, args.max_new_tokens, sorted(tok.stop_ids)
    for way, m in (("kernels", model), ("plain", load(init, args.device, args.dtype, cpu_kernels=False)[0])):
        confadapt, verify = measure_pass_cost(m, k_max, False), measure_pass_cost(m, k_max, True, TREE)
        runs["k=1", way] = lambda p, m=m: generate(m, p, n, k=1, stop_ids=stop)
        runs[f"ConfAdapt({args.threshold})", way] = lambda p, m=m, c=confadapt: generate(
            m, p, n, threshold=args.threshold, k_max=k_max, stop_ids=stop, pass_cost=c)
        runs["--verify", way] = lambda p, m=m, c=verify: generate(m, p, n, verify=True, k_max=k_max, stop_ids=stop,
                                                                  pass_cost=c, tree=TREE)
    for run in runs.values():  # warm-up
        run(prompts[0][:16])
    tokens, seconds = dict.fromkeys(runs, 0), dict.fromkeys(runs, 0.0)
    for prompt in prompts:
        for key, run in runs.items():
            r = run(prompt)
            tokens[key], seconds[key] = tokens[key] + len(r.tokens), seconds[key] + r.seconds
    table = {}
    for (name, way) in runs:
        table.setdefault(name, {})[way] = tokens[name, way] / seconds[name, way]
    return table


def bootstrap_difference(ours, base, resamples: int = 10_000, seed: int = 0) -> dict:
    """The teacher loss per token of our texts less that of base's, over the same prompts ((nll, tokens) per
    prompt), and its 95% bootstrap interval: prompts drawn with replacement, the two losses of each draw
    taken over the same prompts."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.tensor(ours, dtype=torch.float64), torch.tensor(base, dtype=torch.float64)
    draws = torch.randint(len(a), (resamples, len(a)), generator=g)
    loss = lambda t: t[draws, 0].sum(1) / t[draws, 1].sum(1).clamp(min=1)  # noqa: E731
    lo, hi = (loss(a) - loss(b)).quantile(torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"difference": (a[:, 0].sum() / a[:, 1].sum() - b[:, 0].sum() / b[:, 1].sum()).item(), "low": lo, "high": hi}


def k1_agreement(original, in_float32, tok, prompts, max_new_tokens: int) -> dict:
    """How often the original's k=1 in this precision gives the text, and the final answer, of its k=1 in float32."""
    same = same_answer = 0
    for prompt in prompts:
        a, b = (generate(m, prompt, max_new_tokens, stop_ids=tok.stop_ids).tokens for m in (original, in_float32))
        same += a == b
        same_answer += extract_number(tok.decode(a)) == extract_number(tok.decode(b))
    return {"same_text": same / len(prompts), "same_answer": same_answer / len(prompts)}


def print_against_original(report: dict, args):
    if args.against_original:
        print(f"machine: {report['machine']}")
        print(f"{args.device} {args.dtype}, {report['threads']} threads, GSM8K test prompts {args.offset}-"
              f"{args.offset + report['prompts'] - 1}, up to {args.max_new_tokens} new tokens, k_max {report['k_max']}")
    table = {name: t for name, t in report["h_against_original"].items() if name != "original"}
    drawn = f", sampled at temperature {args.temperature:g}" if args.temperature else ""
    print(f"(h) against the original model's k=1 ({report['h_against_original']['original']}), passes sized, "
          f"interleaved{drawn}:")
    for line in describe_against_original(table):
        print("    " + line)
    for name, d in report.get("h_teacher_loss_difference", {}).items():
        print(f"    {name}: teacher loss less k=1 sampling's {d['difference']:+.3f}, 95% bootstrap interval "
              f"[{d['low']:+.3f}, {d['high']:+.3f}] over the prompts")
    if agree := report.get("h_original_vs_float32"):
        print(f"    the original's k=1 in {args.dtype} against its k=1 in float32: final answer the same "
              f"{agree['same_answer']:.0%}, text {agree['same_text']:.0%}")
    print("(i) a pass by rows fed: ms as is = the adapter's update + the base's products + the rest (timed without "
          "each); torch.profiler's busiest operators (calls, self ms)")
    for r, i in report["i_pass_profile"].items():
        print(f"    {r:>3} rows {i['ms']:6.1f} ms = adapter {i['adapter_ms']:5.1f} + products {i['base_products_ms']:5.1f} "
              f"+ rest {i['rest_ms']:5.1f} | " + ", ".join(f"{name} {count} {ms:.1f}" for name, count, ms in i["top"]))


def decode_pass_ms(cost: PassCost) -> dict[int, dict]:
    """Mean milliseconds of the sized decode passes by the rows they fed, whole pass (forward, choice
    of tokens, bookkeeping), over every prompt and strategy that shared this PassCost."""
    by_rows = {}
    for rows, seconds in cost.history:
        by_rows.setdefault(rows, []).append(seconds)
    return {r: {"ms": 1e3 * sum(s) / len(s), "passes": len(s)} for r, s in sorted(by_rows.items())}


def cli(argv=None):
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
