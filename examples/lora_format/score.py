"""Score a run on held-out chat conversations: does it answer in the template?

    python score.py RUN_DIR heldout.jsonl [--out FILE] [--max-new-tokens 32] [--examples 5]

For each conversation the prompt is everything before the last assistant message,
rendered with the run's chat template (the one its training data used; the default
template for a run trained on plain text) and ended with the generation prompt, exactly
as in training and in `genframe chat`. The reply is greedy (temperature 0), cut before the
stop string. Two accuracies:

- format: the reply is in the template, ``ANSWER: [<lowercase letters>]`` (make_data.FORMAT_RE);
- exact: the reply is the expected assistant message, character for character;

and, to show partial copying, letter similarity: the mean similarity (difflib's ratio, 0
to 1) between the word in the reply's brackets and the expected one (0 for a reply that is
not in the template).

Prints them with a few replies and writes them as JSON (default: RUN_DIR/heldout_score.json).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from pathlib import Path

from make_data import FORMAT_RE, WORD_IN_REPLY


def score(run_dir: str, heldout: str, *, ckpt: str | None = None, max_new_tokens: int = 32,
          batch_size: int = 50) -> dict:
    from genframe.tasks.chat import resolve_chat_template
    from genframe.text.chat import read_chat_jsonl
    from genframe.weights import load_model

    model, run, weights = load_model(run_dir, ckpt=ckpt)
    template, template_from = resolve_chat_template(None, run)
    conversations = read_chat_jsonl(heldout)
    prompts, expected = [], []
    for messages in conversations:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(template.render(messages[:last], add_generation_prompt=True))
        expected.append(messages[last]["content"])

    start = time.perf_counter()
    replies = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        samples = model.generate(len(chunk), condition={"prompt": chunk}, seed=0, temperature=0,
                                 max_new_tokens=max_new_tokens, stop=list(template.stop))
        replies += samples.texts
    seconds = time.perf_counter() - start

    rows = [{"prompt": p, "expected": e, "reply": r, "format_ok": bool(FORMAT_RE.fullmatch(r)),
             "exact": r == e, "letter_similarity": round(letter_similarity(r, e), 3)}
            for p, e, r in zip(prompts, expected, replies)]
    n = len(rows)
    return {
        "run": str(run_dir), "weights": str(weights), "heldout": str(heldout),
        "template_from": template_from,
        "n": n,
        "format_accuracy": sum(r["format_ok"] for r in rows) / n,
        "exact_accuracy": sum(r["exact"] for r in rows) / n,
        "letter_similarity": round(sum(r["letter_similarity"] for r in rows) / n, 3),
        "generate_seconds": round(seconds, 2),
        "rows": rows,
    }


def letter_similarity(reply: str, expected: str) -> float:
    """How close the bracketed word of `reply` is to that of `expected` (0 to 1)."""
    got, want = WORD_IN_REPLY.fullmatch(reply), WORD_IN_REPLY.fullmatch(expected)
    if got is None or want is None:
        return 0.0
    return difflib.SequenceMatcher(None, got.group(1), want.group(1)).ratio()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("heldout")
    parser.add_argument("--out", type=Path, help="JSON file to write (default: RUN_DIR/heldout_score.json)")
    parser.add_argument("--ckpt", help="a checkpoint of the run to score instead of its best weights")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--examples", type=int, default=5, help="replies to print")
    args = parser.parse_args(argv)

    result = score(args.run_dir, args.heldout, ckpt=args.ckpt, max_new_tokens=args.max_new_tokens)
    out = args.out or Path(args.run_dir) / "heldout_score.json"
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{result['weights']}: {result['n']} conversations of {args.heldout}, template from "
          f"{result['template_from']}")
    print(f"  format accuracy {result['format_accuracy']:.0%}, exact accuracy "
          f"{result['exact_accuracy']:.0%}, letter similarity {result['letter_similarity']:.2f}")
    for row in result["rows"][:args.examples]:
        mark = "exact" if row["exact"] else ("format" if row["format_ok"] else "wrong")
        print(f"  [{mark:6}] expected {row['expected']!r:24} got {row['reply']!r}")
    print(f"  wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
