"""Decoding that samples (support/sampling.py, decode.speculative_step): the acceptance step equals p in
closed form; --verify's speculative sampling is distributed as k=1 sampling, end to end, within a bound
derived from the number of samples, while a wrong acceptance rule is not; temperature 0 is greedy
decoding; a seed gives its text again; bad settings get one line."""
import json
import math

import pytest
import torch

import decode
from decode import generate, keep_probability, residual, speculative_step
from support.sampling import Sampler, seeded
from support.weights import load_model

VOCAB, MASK = 8, 7  # a tiny vocabulary, so that every 2-token continuation is counted


def output_distribution(p, q, keep=keep_probability):
    """The closed-form distribution of the token one draft step emits: the draft d ~ q, kept with
    probability keep(d), else a token from residual(p, q)."""
    drafts = torch.arange(len(q))
    kept = keep(p.expand(len(q), -1), q.expand(len(q), -1), drafts)  # keep(d) for every possible draft d
    kept = torch.where(q > 0, kept, 0.0)  # a draft q cannot draw is never fed
    return q * kept + (q * (1 - kept)).sum() * residual(p, q)


def test_the_acceptance_step_gives_p_exactly():
    g = torch.Generator().manual_seed(0)
    cases = []
    for _ in range(50):
        p, q = torch.rand(2, 12, generator=g).pow(3).unbind()
        cases.append((p / p.sum(), q / q.sum()))
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])  # p truncated (top-k) where q is not, and the other way round
    cases += [(p, torch.tensor([0.1, 0.2, 0.3, 0.4])), (torch.tensor([0.1, 0.2, 0.3, 0.4]), p), (p, p)]
    for p, q in cases:
        assert torch.allclose(output_distribution(p.double(), q.double()), p.double(), atol=1e-12)
    accept_all = lambda p, q, d: torch.ones(len(d), dtype=p.dtype)  # noqa: E731
    p, q = cases[0]
    assert not torch.allclose(output_distribution(p.double(), q.double(), accept_all), p.double(), atol=0.01)


@pytest.fixture(scope="module")
def tiny8(make_tiny, tmp_path_factory):
    """A random 2-block Qwen3 of 8 token ids, the last one its <MTP>."""
    _, path = make_tiny(tmp_path_factory.mktemp("tiny8"), vocab_size=VOCAB)
    model = load_model(str(path), add_mask=False)
    model.cfg.mask_id = MASK
    return model


def k1_distribution(model, sampler, prompt) -> torch.Tensor:
    """The exact distribution of k=1 sampling's first 2 tokens, (VOCAB, VOCAB): the product of the conditionals."""
    def probs(ids):
        return decode.next_token_probs(model, model(torch.tensor([ids]))[0, -1:].double(), sampler)[0]
    first = probs(prompt)
    return torch.stack([first[a] * probs(prompt + [a]) for a in range(VOCAB)])


def sampled_distance(model, sampler, prompt, n: int) -> float:
    """The total-variation distance between --verify sampling's first 2 tokens, counted over n runs, and
    k=1 sampling's exact distribution. Each run decodes 3 tokens with k_max 3: the second token comes from
    a draft kept or from the residual, the third is the bonus or a draw."""
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    for _ in range(n):
        tokens = generate(model, prompt, 3, verify=True, k_max=3, sampler=sampler).tokens
        counts[tokens[0], tokens[1]] += 1
    return 0.5 * (counts / n - k1_distribution(model, sampler, prompt)).abs().sum().item()


def tv_bound(n: int, outcomes: int, failure: float = 1e-6) -> float:
    """What the TV distance of n samples from their own distribution stays below, but with probability
    `failure`: its mean is at most sum_x sqrt(p_x (1 - p_x) / n) / 2 <= sqrt(outcomes / n) / 2 (Cauchy-Schwarz),
    and one sample moves it by at most 1 / n, so it exceeds its mean by t with probability at most
    exp(-2 n t^2) (McDiarmid)."""
    return math.sqrt(outcomes / n) / 2 + math.sqrt(math.log(1 / failure) / (2 * n))


N = 2000  # samples per setting; with 49 possible continuations the bound is 0.137


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 5, 0.9)])
def test_verify_samples_exactly_as_k1(tiny8, temperature, top_k, top_p):
    prompt = [1, 2, 3]
    sampler = Sampler(temperature, top_k, top_p, seeded("cpu", 0))
    distance, bound = sampled_distance(tiny8, sampler, prompt, N), tv_bound(N, (VOCAB - 1) ** 2)
    assert distance < bound, (distance, bound)


def test_a_wrong_acceptance_rule_fails_the_same_test(tiny8, monkeypatch):
    """Keeping every draft emits the draft's own distribution: far from k=1 sampling's."""
    monkeypatch.setattr(decode, "keep_probability", lambda p, q, d: torch.ones(len(d), dtype=p.dtype))
    distance = sampled_distance(tiny8, Sampler(1.0, generator=seeded("cpu", 0)), [1, 2, 3], N)
    assert distance > tv_bound(N, (VOCAB - 1) ** 2), distance


def test_speculative_step_keeps_a_chain_as_p_would():
    """Two drafts in one pass, p's rows fixed: the first token emitted is p_1's, the second p_2's (joint
    counted over 20,000 steps, within the bound), and every draft is kept where q is p."""
    g = torch.Generator().manual_seed(1)
    p = torch.rand(3, 4, generator=g).pow(2)
    p, q = p / p.sum(-1, keepdim=True), torch.full((2, 4), 0.25)
    sampler, n = Sampler(1.0, generator=seeded("cpu", 2)), 20_000
    counts = torch.zeros(4, 4)
    for _ in range(n):
        drafts = sampler.draw(q)
        kept, token = speculative_step(p, q, drafts, sampler)
        emitted = drafts[:int(kept)].tolist() + [int(token)]
        if len(emitted) >= 2:
            counts[emitted[0], emitted[1]] += 1
        else:
            counts[emitted[0], sampler.draw(p[1:2])[0]] += 1  # what the next pass would draw
    distance = 0.5 * (counts / n - p[0][:, None] * p[1][None]).abs().sum().item()
    assert distance < tv_bound(n, 16), distance
    kept, _ = speculative_step(p[:3], p[:2], sampler.draw(p[:2]), sampler)
    assert int(kept) == 2


def test_seeds_repeat(tiny8):
    """A seed gives the same text again in every mode whose passes have fixed sizes, and at temperature 1
    other seeds give other texts."""
    prompt = [1, 2, 3]
    for mode in (dict(k=1), dict(k=2), dict(threshold=0.3, k_max=4), dict(verify=True, k_max=4)):
        texts = [generate(tiny8, prompt, 12, sampler=Sampler(1.0, generator=seeded("cpu", s)), **mode).tokens
                 for s in (0, 0, 1, 2, 3)]
        assert texts[0] == texts[1] and len({tuple(t) for t in texts}) >= 3, (mode, texts)
        assert MASK not in sum(texts, [])


def test_cli_samples_and_refuses_bad_settings(script, smollm2_gguf):
    """Temperature 0 is greedy decoding, as without the option, in every mode (greedy k=1 equals transformers'
    and --verify equals k=1: tests/test_decode.py); a seed repeats its text; bad settings get one line."""
    common = ["--init", smollm2_gguf, "--prompt", "Name three colors.", "--max-new-tokens", "12", "--json"]
    for mode in ([], ["--threshold", "0.9", "--full-block"], ["--verify", "--full-block"]):
        greedy = json.loads(script("decode.py", *common, *mode).stdout)["tokens"]
        assert json.loads(script("decode.py", *common, *mode, "--temperature", "0").stdout)["tokens"] == greedy
    runs = [script("decode.py", *common, "--temperature", "1", "--seed", s, *mode)
            for s, mode in ((0, []), (0, []), (1, []), (0, ["--verify", "--full-block", "--top-p", "0.9"]))]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    tokens = [json.loads(r.stdout)["tokens"] for r in runs]
    assert tokens[0] == tokens[1] != tokens[2] and 1 <= len(tokens[3]) <= 12
    for bad, message in ((["--temperature", "-1"], "--temperature must be at least 0"),
                         (["--temperature", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
                         (["--temperature", "1", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
                         (["--temperature", "1", "--top-k", "0"], "--top-k must be at least 1"),
                         (["--top-k", "5"], "give a --temperature above 0"),
                         (["--temperature", "1", "--verify", "--tree", "3"], "a chain of drafts")):
        r = script("decode.py", *common, *bad)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
