"""Sampling's distribution and its draws, on the device: the temperature, top-k and top-p of every
decoding mode (decode.py), and draws that need no copy to the host.

    sampler = Sampler(temperature=0.7, top_p=0.95, generator=seeded("cpu", 0))
    probs = sampler.probs(logits)   # (rows, vocab): tempered, truncated, normalized
    tokens = sampler.draw(probs)    # (rows,): one token per row, drawn from its row
"""
from dataclasses import dataclass

import torch


@dataclass
class Sampler:
    temperature: float                      # > 0 (0 is greedy decoding, which takes no Sampler)
    top_k: int | None = None                # keep the k likeliest tokens of each row
    top_p: float | None = None              # keep the fewest likeliest tokens whose probability reaches p
    generator: torch.Generator | None = None

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's distribution: softmax(logits / temperature), cut to top_k and then top_p, renormalized."""
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.size(-1):
            kth = logits.topk(self.top_k, -1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        probs = logits.softmax(-1)
        if self.top_p is not None and self.top_p < 1:
            ranked, order = probs.sort(-1, descending=True)
            beyond = ranked.cumsum(-1) - ranked >= self.top_p  # the tokens ranked before it already reach top_p
            probs = probs.masked_fill(torch.empty_like(beyond).scatter(-1, order, beyond), 0.0)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row of probs (unnormalized is fine): the argmax of probs / E with E ~ Exp(1) per
        entry, which is token i with probability probs_i / sum(probs). No host copy, as gpt-fast draws."""
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        return (probs / noise).argmax(-1)

    def uniform(self, n: int, device) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, device=device)


def seeded(device, seed: int | None) -> torch.Generator:
    """A generator on the device the draws are made on, seeded (None: from the system's entropy)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sampler_of(args, device) -> Sampler | None:
    """The Sampler of the command line's --temperature, --top-k, --top-p and --seed; None when greedy."""
    if not args.temperature:
        return None
    return Sampler(args.temperature, args.top_k, args.top_p, seeded(device, args.seed))


SEED_HELP = ("--temperature > 0: the seed of the draws (default: a new one each run). The same seed gives the "
             "same text when the passes have the same sizes (k=1, static k, --full-block); passes sized by their "
             "measured cost (the default of ConfAdapt and --verify) make as many draws as their size, which depends "
             "on the machine's timings, so the text may differ while its distribution does not")


def add_sampling_args(p):
    """--temperature, --top-k, --top-p and --seed (decode.py, evaluate.py, bench.py)."""
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default); > 0: sample from the "
                   "tempered distribution (--verify: speculative sampling with a chain of drafts, exact in distribution)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens only")
    p.add_argument("--top-p", type=float, default=None, help="sample among the fewest likeliest tokens whose "
                   "probability reaches p (nucleus sampling)")
    p.add_argument("--seed", type=int, default=None, help=SEED_HELP)


def check_sampling_args(a, p):
    if a.temperature < 0:
        p.error(f"--temperature must be at least 0, not {a.temperature:g}")
    if a.top_k is not None and a.top_k < 1:
        p.error(f"--top-k must be at least 1, not {a.top_k}")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], not {a.top_p:g}")
    if not a.temperature and (a.top_k is not None or a.top_p is not None or a.seed is not None):
        p.error("--top-k, --top-p and --seed shape sampling: give a --temperature above 0")
