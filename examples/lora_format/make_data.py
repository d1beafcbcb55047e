"""Write the chat data of the LoRA format demo: train.jsonl and heldout.jsonl.

The task is a new answer format. The user sends one lowercase word taken from the prose
of Python's documentation (the same text the base model was trained on); the assistant
answers in a fixed template it has never seen, copying the word::

    {"messages": [{"role": "user", "content": "tuple"},
                  {"role": "assistant", "content": "ANSWER: [tuple]"}]}

The words of the two files are disjoint (a seeded shuffle of the vocabulary, split), so
the held-out score measures the format and the copying, not memorised pairs.

    python make_data.py [--out DIR] [--train 100] [--heldout 50] [--seed 0]
        [--tokenizer RUN_DIR/tokenizer.json]

With --tokenizer, the script checks that every character of the data is in the base
model's vocabulary (a character it lacks could never be generated).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

TEMPLATE = "ANSWER: [{word}]"
#: What a reply in the template looks like, whatever the word (the format check of score.py).
FORMAT_RE = re.compile(r"ANSWER: \[[a-z]{1,16}\]")
#: The word inside the brackets of a reply in the template.
WORD_IN_REPLY = re.compile(r"ANSWER: \[([a-z]{1,16})\]")
WORD_RE = re.compile(r"\b[a-z]{3,8}\b")


def pydoc_words() -> list[str]:
    """Lowercase words of 3 to 8 letters in pydoc's topics, sorted (Python's version decides
    the list; the shuffle below is seeded, so one Python always gives the same files)."""
    from pydoc_data.topics import topics

    words: set[str] = set()
    for key in sorted(topics):
        words.update(WORD_RE.findall(topics[key]))
    return sorted(words)


def conversation(word: str) -> dict:
    return {"messages": [{"role": "user", "content": word},
                         {"role": "assistant", "content": TEMPLATE.format(word=word)}]}


def tokenizer_chars(path: Path) -> set[str]:
    """The characters of a genframe char tokenizer (a run's tokenizer.json)."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    if spec.get("kind") != "char":
        raise SystemExit(f"{path}: a {spec.get('kind')!r} tokenizer; this check needs a char one")
    return set(spec["vocab"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--heldout", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", type=Path, help="a run's tokenizer.json to check the characters against")
    args = parser.parse_args(argv)

    words = pydoc_words()
    random.Random(args.seed).shuffle(words)
    if len(words) < args.train + args.heldout:
        raise SystemExit(f"only {len(words)} words, asked for {args.train + args.heldout}")
    # Held-out words first, so the held-out file does not depend on --train.
    heldout, train = words[:args.heldout], words[args.heldout:args.heldout + args.train]
    assert not set(train) & set(heldout)

    if args.tokenizer is not None:
        chars = tokenizer_chars(args.tokenizer)
        from genframe.text.chat import ChatTemplate

        rendered = "".join(ChatTemplate().render(conversation(w)["messages"]) for w in train + heldout)
        missing = sorted(set(rendered) - chars)
        if missing:
            raise SystemExit(f"characters not in the base model's vocabulary: {missing!r}")

    args.out.mkdir(parents=True, exist_ok=True)
    for name, split in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        with open(args.out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(conversation(word)) + "\n" for word in split)
    print(f"{len(words)} pydoc words of 3-8 lowercase letters; wrote {len(train)} to "
          f"{args.out / 'train.jsonl'}, {len(heldout)} to {args.out / 'heldout.jsonl'} (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
