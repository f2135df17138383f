"""Passes sized by what they cost: how many <MTP> masks and drafts a decode pass feeds.

A pass that feeds more rows (masks for ConfAdapt; drafts and their branches for --verify) can
commit more tokens, but only where the model's guesses hold, and on a CPU every extra row costs
compute. So each pass feeds the number of guesses n that maximizes the expected new tokens per
second of pass:

    (1 + expected guesses that hold among the first n) / cost(rows fed for n)

- cost(rows): a real forward pass of the model, timed per row count at start-up and then from the
  decode passes themselves (PassCost.observe), so that the costs follow the load on the machine; a
  row count not fed for a while is fed once again, so that an estimate too high is corrected too.
- the guesses that hold: counted as decoding goes, per position j, as a_j = how often guess j
  held when guesses 1..j-1 did (Acceptance). n guesses then hold on average sum_j prod_{i<=j} a_i.
  Each a_j starts at a_{j-1} (a_1 at 1) with the weight of two passes: a guess not tried yet is
  assumed as good as the one before it, so it is tried where it would pay off, and dropped once
  the counts say it does not.
- --verify's drafts may form a tree (decode.py --tree c: the c likeliest tokens of each mask slot):
  there the rates are per position and rank, r_j(c) = how often the model's token at position j was
  the branch's c-th candidate when the tokens before it held (RankAcceptance), a node's path holds
  with the product of its rates, and n nodes keep on average the sum over the n likeliest paths
  (draft_tree). A chain is the tree of one candidate.
This is the choice of draft length in speculative decoding (Leviathan et al. 2023, "Fast Inference
from Transformers via Speculative Decoding", section 3.4: the length that maximizes expected tokens
over the cost of a pass), with the acceptance measured per position instead of assumed constant,
and the cost measured instead of modelled. On a GPU, where 16 rows cost about what one costs, it
comes out at the whole block; on a float32 CPU at fewer rows.
"""
import heapq
import sys
import time

import torch

from support.timing import wait_for


class PassCost:
    """Seconds of one forward pass by the number of rows it feeds, at 1, 2, 4, ... rows. A pass of r
    rows costs what the next measured one costs (the kernels may run it padded to that many rows,
    support.cpu_kernels.FewRowLinear). Beyond the largest, each further row costs what a row cost between
    the two largest (on a GPU next to nothing, on a CPU about its share), and a pass decoding feeds
    there becomes a measured row count of its own, so that the guess is corrected by what it costs.

    track: the decoder reports every pass's seconds (observe), and each row count's cost is the
    running mean of its passes, the start-up measurement counting as one and the last RECENT passes
    weighing most: the machine's load changes as decoding goes. stale(rows): no pass of that many
    rows for REVISIT passes, so the decoder feeds it once (best_n), and a row count that was measured
    dear at a busy moment gets the chance to show what it costs now. track=False: a fixed table."""
    RECENT, REVISIT = 8, 32

    def __init__(self, seconds: dict[int, float], track: bool = True):
        self.rows = sorted(seconds)
        self.seconds = [seconds[r] for r in self.rows]
        self.track = track
        self.seen = [1] * len(self.rows)  # passes behind each estimate (the start-up one counts once)
        self.last = [0] * len(self.rows)  # the pass at which each row count was last fed
        self.history = []  # (rows, seconds) of every pass observed: its length counts the passes
        self.rank0_on = None  # a device: in a sharded run every process takes rank 0's decisions (agreed)

    def agreed(self, n: int) -> int:
        """n, or in a sharded run rank 0's n: each process times its own passes, and all of them must feed
        the same rows, since every forward pass of a sharded model is a collective."""
        if self.rank0_on is None:
            return n
        from support.processes import rank0_values
        return int(rank0_values(self.rank0_on, n)[0])

    def bucket(self, rows: int) -> int | None:
        """Index of the measured row count that a pass of `rows` rows runs at (None: beyond them)."""
        return next((i for i, r in enumerate(self.rows) if r >= rows), None)

    def __call__(self, rows: int) -> float:
        i = self.bucket(rows)
        if i is not None:
            return self.seconds[i]
        if len(self.rows) == 1:
            return self.seconds[0] * rows / self.rows[0]
        per_row = max(0.0, (self.seconds[-1] - self.seconds[-2]) / (self.rows[-1] - self.rows[-2]))
        return self.seconds[-1] + per_row * (rows - self.rows[-1])

    def observe(self, rows: int, seconds: float):
        """A decode pass of `rows` rows took `seconds`."""
        if not self.track:
            return
        i = self.bucket(rows)
        if i is None:  # beyond the table: a new row count, 2^n rows, measured from now on
            self.rows.append(1 << (rows - 1).bit_length())
            self.seconds.append(seconds)
            self.seen.append(0)
            self.last.append(0)
            i = len(self.rows) - 1
        self.history.append((rows, seconds))
        self.seen[i] = min(self.seen[i] + 1, self.RECENT)
        self.seconds[i] += (seconds - self.seconds[i]) / self.seen[i]
        self.last[i] = len(self.history)

    def stale(self, rows: int) -> bool:
        i = self.bucket(rows)
        return self.track and i is not None and len(self.history) - self.last[i] >= self.REVISIT

    @classmethod
    @torch.no_grad()
    def measure(cls, model, max_rows: int, context: int = 256, reps: int = 3):
        """Time a pass of 1, 2, 4, ... max_rows rows (one token, the rest <MTP>) after `context`
        cached positions: the best of `reps` rounds over all row counts, after an untimed one, so
        that a moment of load on the machine hits every row count alike."""
        rows = [1 << i for i in range(max(1, max_rows - 1).bit_length() + 1)]
        one_pass = mask_pass(model, rows, context)
        seconds = dict.fromkeys(rows, float("inf"))
        for rep in range(reps + 1):
            for r in rows:
                t0 = time.perf_counter()
                one_pass(r)
                if rep:
                    seconds[r] = min(seconds[r], time.perf_counter() - t0)
        return cls(seconds)

    def __repr__(self):
        return "PassCost(" + ", ".join(f"{r}: {1e3 * s:.1f} ms" for r, s in zip(self.rows, self.seconds)) + ")"


def mask_pass(model, rows, context: int = 256):
    """A function that runs one decode pass of r rows (one token, r-1 <MTP>) for r in rows, after
    `context` cached positions, and cuts the cache back to them: the pass whose cost is timed."""
    device = model.embed_tokens.weight.device
    cache = model.new_cache(context + max(rows))
    model(torch.zeros(1, context, dtype=torch.long, device=device), cache=cache)
    inputs = {r: torch.full((1, r), model.cfg.mask_id or 0, dtype=torch.long, device=device) for r in rows}
    for idx in inputs.values():
        idx[0, 0] = 1

    def one_pass(r):
        model(inputs[r], cache=cache)
        wait_for(device)
        cache.truncate(context)
    return one_pass


class Acceptance:
    """For guess j = 1..n of a pass (the j-th mask, or the j-th draft): how often it held when the
    guesses before it held."""

    def __init__(self, n: int):
        self.hits, self.tries = [0] * n, [0] * n

    def record(self, n_fed: int, n_held: int):
        """A pass fed n_fed guesses, and the first n_held of them held (the next one did not)."""
        for j in range(min(n_held + 1, n_fed)):
            self.tries[j] += 1
            self.hits[j] += j < n_held

    def rates(self, n: int) -> list[float]:
        """a_1..a_n: hits over tries, each shrunk toward the rate before it (a_0 = 1) by two passes."""
        rates, before = [], 1.0
        for j in range(n):
            before = (self.hits[j] + 2 * before) / (self.tries[j] + 2)
            rates.append(before)
        return rates

    def expected(self, n: int) -> float:
        """How many of the first n guesses hold, on average: sum over j of P(guesses 1..j hold)."""
        total, p = 0.0, 1.0
        for a in self.rates(n):
            p *= a
            total += p
        return total


def best_n(max_n: int, expected, cost: PassCost, rows) -> int:
    """The n in 0..max_n with the most expected tokens per second; expected(n): the guesses that hold
    among n (Acceptance.expected), rows(n): the rows fed for n. A row count that has not been fed for a
    while (cost.stale) goes first, once, to be measured again."""
    stale = [n for n in range(max_n + 1) if cost.stale(rows(n))]
    if stale:
        return cost.agreed(min(stale, key=lambda n: cost.last[cost.bucket(rows(n))]))
    return cost.agreed(max(range(max_n + 1), key=lambda n: (1 + expected(n)) / cost(rows(n))))


class RankAcceptance:
    """--verify's drafts (decode.generate_verify): for draft position j = 1..n, once the model's tokens
    before it held, how often its own token there was the branch's 1st, 2nd, ... candidate (its rank)
    or none of the first `width`. Every pass shows these ranks for the positions up to the first draft
    that failed, whichever drafts it fed."""

    def __init__(self, n: int, width: int):
        self.width = width
        self.hits, self.tries = [[0] * width for _ in range(n)], [0] * n

    def record(self, ranks: list[int]):
        """ranks[j - 1]: the rank of the model's token at position j (width: not among the candidates)."""
        for j, r in enumerate(ranks):
            self.tries[j] += 1
            if r < self.width:
                self.hits[j][r] += 1

    def rates(self) -> list[list[float]]:
        """rates[j - 1][r]: P(rank r at position j), each shrunk toward position j - 1's by two passes
        (position 0: always rank 0), as Acceptance.rates."""
        rates, before = [], [1.0] + [0.0] * (self.width - 1)
        for hits, tries in zip(self.hits, self.tries):
            before = [(h + 2 * b) / (tries + 2) for h, b in zip(hits, before)]
            rates.append(before)
        return rates


def draft_tree(rates, max_nodes: int, max_depth: int, usable=lambda depth, rank: True,
               ends=lambda depth, rank: False) -> list[tuple[int, int, int, float]]:
    """The draft tree of at most max_nodes nodes that keeps the most drafts on average, for ranks held
    at the rates of RankAcceptance.rates: a node (parent node or -1, depth, rank, p) proposes the
    branch's candidate of that rank at that depth after its parent's path, and holds with p, the product
    of the rates along its path. The drafts kept are on average the sum of the nodes' p, so the tree of
    the likeliest paths is best; a child is never likelier than its parent, so they do form a tree,
    taken here likeliest first (the trees of Medusa, Cai et al. 2024, and of EAGLE-2, Li et al. 2024).
    usable(depth, rank): whether that candidate may be fed; ends(depth, rank): nothing follows it."""
    width = len(rates[0]) if rates else 0
    heap = [(-rates[0][r], 1, -1, r) for r in range(width)] if max_depth else []
    heapq.heapify(heap)
    nodes = []
    while heap and len(nodes) < max_nodes:
        neg_p, depth, parent, rank = heapq.heappop(heap)
        if not usable(depth, rank):
            continue
        nodes.append((parent, depth, rank, -neg_p))
        if depth < max_depth and not ends(depth, rank):
            for r in range(width):
                heapq.heappush(heap, (neg_p * rates[depth][r], depth + 1, len(nodes) - 1, r))
    return nodes


def measure_pass_cost(model, k_max: int, verify: bool, tree: int = 1) -> PassCost:
    """The cost of a pass by rows, up to the most a ConfAdapt or --verify pass of this block feeds
    (beyond 64 rows: extrapolated), said in one line. One timed round: the decode passes themselves
    then keep it up to date (sizing.PassCost.observe)."""
    t0 = time.perf_counter()
    most = (1 + (k_max - 1) * tree) * k_max if verify else 2 * k_max - 1
    cost = PassCost.measure(model, min(most, 64), reps=1)
    print(f"pass cost by rows fed: {', '.join(f'{r}: {1e3 * s:.0f} ms' for r, s in zip(cost.rows, cost.seconds))}"
          f" (measured in {time.perf_counter() - t0:.1f} s, then from the passes; each pass feeds what pays "
          f"off; --full-block: the whole block)", file=sys.stderr)
    return cost
