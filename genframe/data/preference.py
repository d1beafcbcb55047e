"""Preference pairs for language models: a prompt with a preferred (chosen) and a
dispreferred (rejected) completion, the data of Direct Preference Optimization.

DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) raises the model's
log-probability of the chosen completion and lowers the rejected one's, each measured
against a frozen reference model (the model fine-tuning starts from). The reference's
log-probabilities are computed once, before training (`PreferenceDataModule.set_reference`,
TRL's ``precompute_ref_log_probs``), so no second model is held in memory and a resumed
run measures against the same reference.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from genframe.data.base import SPLIT_WORDS, SPLITS, DictDataset
from genframe.data.text import TokenizedDataModule
from genframe.errors import UserError, did_you_mean

log = logging.getLogger("genframe")

#: The batch keys of one side of a pair (``chosen_`` or ``rejected_`` + these).
SIDES = ("chosen", "rejected")
#: What the model's reference log-probabilities add to a batch.
REFERENCE_KEYS = frozenset({"reference_chosen_logps", "reference_rejected_logps"})
#: Every key a batch of preference pairs holds.
PREFERENCE_KEYS = frozenset({"chosen_tokens", "chosen_loss_mask", "rejected_tokens",
                             "rejected_loss_mask"}) | REFERENCE_KEYS


def read_preference_jsonl(path: str | Path) -> list[dict[str, str]]:
    """The pairs of a UTF-8 JSONL file, one ``{"prompt", "chosen", "rejected"}`` object a
    line (TRL's explicit-prompt preference format; ``prompt`` may be left out, null or
    empty). Lines are read as every genframe JSONL file is
    (`genframe.text.sources.jsonl_records`: records end at newlines only, a byte-order
    mark is not text, a byte that is not UTF-8 is named with its offset).

    Raises:
        UserError: a missing file or a folder, a line that is not such an object, a value
            that is not a string, an empty completion, no pair at all.
    """
    from genframe.text.sources import jsonl_records

    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise UserError(f"data.path={path} {what}; expected a JSONL file of preference pairs, one "
                        '{"prompt": ..., "chosen": ..., "rejected": ...} a line')
    pairs = []
    for where, row in jsonl_records(file):
        if not isinstance(row, dict):
            raise UserError(f'{where}: expected an object {{"prompt", "chosen", "rejected"}}, '
                            f"got {type(row).__name__}")
        unknown = sorted(set(row) - {"prompt", *SIDES})
        missing = [k for k in SIDES if k not in row]
        if missing or unknown:
            problem = (f"missing {', '.join(missing)}" if missing else f"unknown keys {', '.join(unknown)}")
            hint = did_you_mean((unknown or [""])[0], ["prompt", *SIDES]) if unknown else ""
            raise UserError(f'{where}: {problem}; each line holds "prompt" (optional), "chosen" and '
                            f'"rejected".{hint}')
        pair = {"prompt": row.get("prompt") or "", **{k: row[k] for k in SIDES}}
        for key, value in pair.items():
            if not isinstance(value, str):
                raise UserError(f"{where}: {key} must be a string, got {value!r}")
        for key in SIDES:
            if not pair[key]:
                raise UserError(f"{where}: {key} is empty; each side of a pair needs a completion")
        pairs.append(pair)
    if not pairs:
        raise UserError(f"data.path={path}: no preference pairs in the file (it is empty)")
    return pairs


class PreferenceDataModule(TokenizedDataModule):
    """Preference pairs from a JSONL file as rows of token ids, for DPO fine-tuning.

    Each side of a pair is the prompt's tokens (the start token when there is no prompt)
    followed by the completion's, one row of ``block_size + 1`` ids padded with id 0. Its
    ``loss_mask`` is 1 on the completion's tokens: a side's log-probability is the sum
    over those. A row too long loses the prompt's oldest tokens first, then the
    completion's last (counted and logged); a pair whose sides are equal, or with no
    completion token left on a side, is dropped (counted and logged).

    Batches: ``chosen_tokens``, ``rejected_tokens`` (long, N x (T + 1)),
    ``chosen_loss_mask``, ``rejected_loss_mask`` (float, N x (T + 1)) and, once
    `set_reference` has run, ``reference_chosen_logps``, ``reference_rejected_logps``
    (float, N: the reference model's summed log-probabilities, nats).

    Args:
        path: the JSONL file (`read_preference_jsonl`).
        tokenizer: "char" or "bpe", trained on the training pairs; used only when no
            tokenizer is handed in with `use_tokenizer` (fine-tuning keeps the model's).
        vocab_size: BPE vocabulary size (ignored by "char").
        block_size: context length T; each row holds T + 1 tokens.
        batch_size: pairs per batch.
        val_fraction: share of pairs held out for validation (at least one).
        test_fraction: share of pairs held out for testing; 0 turns the test split off.
        seed: seed of the split of pairs.
        num_workers: DataLoader worker processes.
    """

    provides = PREFERENCE_KEYS

    def __init__(
        self,
        path: str | None = None,
        tokenizer: str = "char",
        vocab_size: int = 512,
        block_size: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        if not path:
            raise UserError("data.path is not set; expected a JSONL file of preference pairs, "
                            "e.g. data.path=pairs.jsonl")
        super().__init__(tokenizer=tokenizer, vocab_size=vocab_size, block_size=block_size,
                         batch_size=batch_size, val_fraction=val_fraction,
                         test_fraction=test_fraction, seed=seed, num_workers=num_workers)
        self.path = path
        #: After setup: pairs read, and per split how many were truncated/dropped.
        self.stats: dict[str, int] = {}
        #: Where the reference log-probabilities came from (`set_reference`).
        self.reference: str | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        pairs = read_preference_jsonl(self.path)
        split = self.split_items(pairs, "preference pairs", f"data.path={self.path}")
        self.stats = {"pairs": len(pairs)}
        unknown = self.fit_tokenizer({s: [p["prompt"] + p[k] for p in split[s] for k in SIDES] for s in SPLITS},
                                     where=f"data.path={self.path}")
        self.stats.update({f"{s}_unknown_characters": n for s, n in unknown.items()})
        for s in SPLITS:
            if split[s]:
                setattr(self, f"{s}_set", self._rows(split[s], s))
        self.summarize_splits("preference pairs", detail=f"seed {self.seed}")

    def _rows(self, pairs: list[dict[str, str]], split: str) -> DictDataset:
        from genframe.text.tokenize import start_id

        span = self.block_size + 1
        columns: dict[str, list[list[float]]] = {f"{k}_{c}": [] for k in SIDES for c in ("tokens", "loss_mask")}
        truncated = dropped = 0
        for pair in pairs:
            prompt = self.tokenizer.encode(pair["prompt"]) or [start_id(self.tokenizer)]
            rows = {}
            for side in SIDES:
                completion = self.tokenizer.encode(pair[side])
                ids, mask, cut = _row(prompt, completion, span)
                truncated += cut
                rows[side] = (ids, mask)
            if rows["chosen"] == rows["rejected"] or not all(any(m) for _, m in rows.values()):
                dropped += 1
                continue
            for side, (ids, mask) in rows.items():
                pad = span - len(ids)
                columns[f"{side}_tokens"].append(ids + [0] * pad)
                columns[f"{side}_loss_mask"].append(mask + [0] * pad)
        self.stats[f"{split}_truncated_rows"] = truncated
        self.stats[f"{split}_dropped"] = dropped
        name = SPLIT_WORDS[split]
        if truncated or dropped:
            log.warning("preference data: %d %s rows cut to data.block_size + 1 = %d tokens; %d of %d "
                        "pairs dropped (sides equal as tokens, or no completion token left)",
                        truncated, name, span, dropped, len(pairs))
        if not columns["chosen_tokens"]:
            raise UserError(f"data.path={self.path}: none of the {len(pairs)} {name} preference pairs "
                            f"is usable within data.block_size + 1 = {span} tokens ({dropped} dropped: "
                            "sides equal as tokens, or no completion token left; characters the "
                            "tokenizer does not know are all read as <unk>, which can make the sides equal)")
        return DictDataset({k: torch.tensor(v, dtype=torch.long if k.endswith("tokens") else torch.float32)
                            for k, v in columns.items()})

    def set_reference(self, model, *, source: str) -> None:
        """Add the reference model's log-probabilities of every side of every pair
        (``reference_chosen_logps``, ``reference_rejected_logps``), computed once with
        `model` (its ``sequence_logps(tokens, loss_mask) -> (N,)``) in eval mode.

        Args:
            model: the reference: the model fine-tuning starts from, before any change.
            source: what the reference is, for run.json (its run or hub entry).

        Raises:
            UserError: the model cannot score sequences (no ``sequence_logps``).
        """
        scorer = getattr(model, "sequence_logps", None)
        if scorer is None:
            raise UserError(f"preference pairs train with DPO, which scores sequences; model "
                            f"'{getattr(model, 'registered_name', type(model).__name__)}' cannot "
                            "(a transformer language model can)")
        self.setup("fit")
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for s in SPLITS:
                    dataset = getattr(self, f"{s}_set", None)
                    if dataset is None:
                        continue
                    for side in SIDES:
                        tokens, mask = dataset.columns[f"{side}_tokens"], dataset.columns[f"{side}_loss_mask"]
                        logps = [scorer(tokens[i:i + self.batch_size].to(model.device),
                                        mask[i:i + self.batch_size].to(model.device)).float().cpu()
                                 for i in range(0, len(tokens), self.batch_size)]
                        dataset.columns[f"reference_{side}_logps"] = torch.cat(logps)
        finally:
            model.train(was_training)
        self.reference = source
        log.info("preference data: reference log-probabilities from %s", source)

    def check_reference(self) -> None:
        """Refuse (`UserError`) pairs without the reference's log-probabilities."""
        if self.reference is None:
            raise UserError(
                "data=preference trains with DPO against a reference model: the model the "
                "training starts from. Use genframe finetune run=<trained model> data=preference "
                "(genframe train starts from random weights, which are no reference)")


def _row(prompt: list[int], completion: list[int], span: int) -> tuple[list[int], list[int], int]:
    """(ids, loss mask, 1 if cut else 0) of prompt + completion in at most `span` tokens:
    the prompt's oldest tokens go first (one is kept: it predicts the first completion
    token), then the completion's last."""
    cut = int(len(prompt) + len(completion) > span)
    if cut:
        keep = max(1, span - len(completion))
        prompt = prompt[-keep:]
        completion = completion[:span - len(prompt)]
    ids = prompt + completion
    # Position 0 is never a target (token t predicts t + 1): the prompt's last token
    # predicts the completion's first, so the mask sits on the completion's positions.
    return ids, [0] * len(prompt) + [1] * len(completion), cut
