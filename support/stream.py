"""What decode.py prints: the text as it grows, each pass's tokens on a colour that says how many it
accepted (--show-chunks), and the closing line or JSON object."""
import json
import sys
from collections import Counter


class TextStream:
    """generate()'s on_tokens: prints the text as it grows. The whole token list so far is decoded
    and only new, complete text printed, so a character whose bytes span tokens (an emoji, CJK)
    waits for its last byte instead of printing as U+FFFD. Stop tokens are not printed.
    show_chunks: each pass's text on a background colour that says how many tokens it accepted."""

    def __init__(self, tok, show_chunks: bool = False, out=None):
        self.tok, self.show_chunks, self.out = tok, show_chunks, out or sys.stdout
        self.ids, self.shown = [], 0  # tokens so far, characters of their text printed

    def __call__(self, accepted: list[int]):
        self.ids += [t for t in accepted if t not in self.tok.stop_ids]
        text = self.tok.decode(self.ids)
        self.write(text[self.shown:len(text.rstrip("\ufffd"))], len(accepted))

    def finish(self):  # whatever was held back: bytes that never completed a character
        self.write(self.tok.decode(self.ids)[self.shown:], 0)

    def write(self, new: str, chunk: int):
        if new:
            self.shown += len(new)
            print(paint(new, chunk) if self.show_chunks and chunk else new, end="", file=self.out, flush=True)


CHUNK_BACKGROUNDS = {1: 238, 2: 24, 3: 30, 4: 28, 5: 94, 6: 130, 7: 124}  # 256-colour codes; 7: 7 or more


def paint(text: str, chunk: int) -> str:
    """text on the background colour of its chunk size, each line closed (no colour past the line's end)."""
    start = f"\x1b[38;5;15;48;5;{CHUNK_BACKGROUNDS[min(chunk, 7)]}m"
    return "\n".join(f"{start}{line}\x1b[0m" if line else line for line in text.split("\n"))


def chunk_legend() -> str:
    return "tokens accepted per pass: " + " ".join(paint(f" {n}{'+' if n == 7 else ''} ", n) for n in range(1, 8))


def strategy_name(k: int, threshold: float | None, verify: bool = False, k_max: int = 0,
                  draft_threshold: float | None = None, tree: int = 1) -> str:
    if verify:
        drafts = f", drafts >= {draft_threshold}" if draft_threshold else ""
        return f"verify(k_max {k_max}{drafts}" + (f", tree {tree})" if tree > 1 else ")")
    return f"ConfAdapt({threshold})" if threshold is not None else f"k={k}"


def print_result(r, tok, name: str, as_json: bool, verify: bool):
    """decode.py's last output: one JSON object (--json), or one line on stderr after the streamed text."""
    text = tok.decode([t for t in r.tokens if t not in tok.stop_ids])
    if as_json:
        print(json.dumps({"text": text, "tokens": r.tokens, "passes": r.passes, "acceleration": r.acceleration,
                          "tokens_per_s": r.tokens_per_s, "chunks": r.chunks, "strategy": name,
                          "drafts_fed": r.drafts_fed, "drafts_accepted": r.drafts_accepted,
                          "draft_acceptance": r.draft_acceptance, "rows_per_pass": r.rows_per_pass}))
        return
    hist = " ".join(f"{n}:{c}" for n, c in sorted(Counter(r.chunks).items()))
    drafts = f" | drafts accepted {r.drafts_accepted}/{r.drafts_fed} ({r.draft_acceptance:.0%})" if verify else ""
    print(f"\n[{name}] {len(r.tokens)} new tokens in {r.passes} passes | acceleration {r.acceleration:.2f} | "
          f"{r.tokens_per_s:.1f} tokens/s | {r.rows_per_pass:.1f} rows per pass | chunk sizes {hist}{drafts}",
          file=sys.stderr)
