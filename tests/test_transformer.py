"""The transformer language model on its own: network, objective, optimizer, generation."""

from __future__ import annotations

import math

import pytest
import torch
from genframe_plugins.transformer.generation import RowText, decode, filter_logits
from genframe_plugins.transformer.model import Transformer, WarmupCosine
from torch.utils.data import DataLoader

from genframe.errors import UserError
from genframe.text import build_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog.\nHello, World! 0123456789\n"
PROMPTS = ["the", "Hello, W", "x", "lazy dog.\n"]  # 3, 8, 1 and 10 tokens


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("char", [TEXT])


def make_model(tok=None, *, spread: float = 0.3, dtype=torch.float32, **kwargs) -> Transformer:
    """A small model with random weights large enough for peaked, varied predictions
    (GPT-2's init makes an untrained model's logits nearly uniform)."""
    torch.manual_seed(0)
    args = {"vocab_size": tok.vocab_size if tok else 32, "block_size": 32, "n_layer": 2,
            "n_head": 2, "n_embd": 32}
    args.update(kwargs)
    model = Transformer(**args)
    if spread:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, spread)
    if tok is not None:
        model.set_tokenizer(tok)
    return model.to(dtype).eval()


def gen(model, prompts, **kw):
    kw.setdefault("seed", 0)
    kw.setdefault("max_new_tokens", 12)
    return model.generate(len(prompts), condition={"prompt": prompts}, **kw)


# -- network ---------------------------------------------------------------------------


def test_weight_tying_shares_the_tensor():
    tied = Transformer(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    assert tied.net.lm_head.weight is tied.net.transformer["wte"].weight
    n_params = sum(p.numel() for p in tied.parameters())
    untied = Transformer(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8,
                         tie_weights=False)
    assert untied.net.lm_head.weight is not untied.net.transformer["wte"].weight
    assert sum(p.numel() for p in untied.parameters()) == n_params + 11 * 8


def test_default_size_is_about_0_8m_parameters():
    model = Transformer(vocab_size=100)  # the `transformer` config's sizes
    n = sum(p.numel() for p in model.parameters())
    assert 0.75e6 < n < 0.85e6, n


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = Transformer(vocab_size=50, block_size=8, n_layer=8, n_head=4, n_embd=64)
    block = model.net.transformer["h"][0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_causal_prefix_logits_do_not_see_the_future(positions):
    model = make_model(positions=positions)
    x = torch.randint(0, 32, (2, 10))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % 32
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :6], model(y)[:, :6], atol=1e-5)
        assert not torch.allclose(model(x)[:, 6:], model(y)[:, 6:], atol=1e-5)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_both_position_kinds_learn_a_repetitive_text(positions):
    text = "abcdefg hij. " * 12
    tok = build_tokenizer("char", [text])
    ids = torch.tensor(tok.encode(text))
    torch.manual_seed(0)
    model = Transformer(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2,
                        n_embd=32, positions=positions, lr=3e-2, warmup_steps=5)
    opt = model.configure_optimizers()["optimizer"]
    gen_ = torch.Generator().manual_seed(0)
    for _ in range(40):
        starts = torch.randint(0, len(ids) - 17, (8,), generator=gen_)
        batch = {"tokens": torch.stack([ids[s:s + 17] for s in starts])}
        nll, _, _ = model.token_nll(batch)
        loss = nll.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * math.log(tok.vocab_size), loss.item()


# -- objective -------------------------------------------------------------------------


def test_loss_mask_restricts_the_loss():
    model = make_model(spread=0.0)
    model.train()
    torch.manual_seed(1)
    tokens = torch.randint(0, 32, (3, 13))
    mask = torch.zeros_like(tokens)
    mask[:, 2:7] = 1  # targets 2..6 (predicted from positions 1..5)
    batch = {"tokens": tokens, "loss_mask": mask}
    loss = model.training_step(batch, 0)

    logits = model(tokens[:, :-1])
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:],
                                            reduction="none")
    assert loss.item() == pytest.approx(nll[:, 1:6].mean().item(), rel=1e-6)
    # Tokens after the masked span are unmasked targets (and later inputs only): no effect.
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 5) % 32
    assert model.training_step({"tokens": changed, "loss_mask": mask}, 0).item() == \
        pytest.approx(loss.item(), rel=1e-6)
    # A masked target does change it, and without a mask every target counts.
    changed[:, 4] = (changed[:, 4] + 5) % 32
    assert model.training_step({"tokens": changed, "loss_mask": mask}, 0).item() != \
        pytest.approx(loss.item(), rel=1e-6)
    assert model.training_step({"tokens": tokens}, 0).item() == \
        pytest.approx(nll.mean().item(), rel=1e-6)


class _ByteTokenizer:
    """A stand-in tokenizer whose ids stand for 0, 1, 2, ... bytes (hand-checkable bpb)."""

    kind = "fake"
    unit = "byte"
    vocab_size = 6

    def unit_lengths(self):
        return [0, 1, 2, 3, 4, 5]

    def to_json(self):
        return "{}"


def _validate(model, batches):
    import pytorch_lightning as pl

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.validate(model, DataLoader(batches, batch_size=None), verbose=False)
    return {k: v.item() for k, v in trainer.callback_metrics.items()}


def test_val_bits_per_unit_for_a_uniform_model(tok):
    # A zero output layer predicts every id with probability 1/V: ln V nats per target.
    V = 8
    model = Transformer(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=8,
                        tie_weights=False)
    torch.nn.init.zeros_(model.net.lm_head.weight)
    model.set_tokenizer(_ByteTokenizer())
    tokens = torch.tensor([[1, 2, 3, 4, 5], [5, 5, 0, 1, 1]])
    mask = torch.ones_like(tokens)
    mask[1, 3:] = 0  # drop the last two targets of row 1
    metrics = _validate(model, [{"tokens": tokens, "loss_mask": mask}, {"tokens": tokens[:1]}])
    targets = 4 + 2 + 4  # batch 1: 4 + 2 masked-in targets; batch 2: 4
    units = (2 + 3 + 4 + 5) + (5 + 0) + (2 + 3 + 4 + 5)
    assert metrics["val/loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert metrics["val/ppl"] == pytest.approx(V, rel=1e-5)
    assert metrics["val/bpb"] == pytest.approx(targets * math.log2(V) / units, rel=1e-6)
    assert "val/bpc" not in metrics

    char_model = Transformer(vocab_size=tok.vocab_size + 3, block_size=8, n_layer=1, n_head=2,
                             n_embd=8, tie_weights=False)
    torch.nn.init.zeros_(char_model.net.lm_head.weight)
    char_model.set_tokenizer(tok)
    metrics = _validate(char_model, [{"tokens": tokens}])
    assert metrics["val/bpc"] == pytest.approx(math.log2(tok.vocab_size + 3), rel=1e-6)


# -- optimizer and schedule ------------------------------------------------------------


def test_optimizer_groups_decay_matrices_only_and_skip_frozen():
    model = Transformer(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=8, bias=True,
                        weight_decay=0.3)
    frozen = model.net.transformer["h"][0].attn.c_attn.weight
    frozen.requires_grad_(False)
    opt = model.configure_optimizers()["optimizer"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    in_groups = [p for g in opt.param_groups for p in g["params"]]
    assert not any(p is frozen for p in in_groups)
    trainable = [p for p in model.parameters() if p.requires_grad]  # tied weight once
    assert len(in_groups) == len(trainable) == len({id(p) for p in in_groups})
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup_steps=10, decay_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # half way down the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert WarmupCosine(0, None, 0.1)(1000) == 1.0

    model = Transformer(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8, lr=0.01,
                        warmup_steps=10, lr_decay_steps=110)
    conf = model.configure_optimizers()
    assert conf["lr_scheduler"]["interval"] == "step"
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(61):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.001) and seen[9] == pytest.approx(0.01)
    assert seen[60] == pytest.approx(0.0055)


def test_grad_clip_applies_unless_the_trainer_sets_one(monkeypatch):
    import pytorch_lightning as pl

    model = Transformer(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8,
                        grad_clip=0.7)
    model.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    calls = []
    monkeypatch.setattr(model, "clip_gradients",
                        lambda opt, gradient_clip_val, gradient_clip_algorithm:
                        calls.append((gradient_clip_val, gradient_clip_algorithm)))
    model.configure_gradient_clipping(None, None, None)
    model.configure_gradient_clipping(None, 0.2, "value")
    model.hparams.grad_clip = 0.0
    model.configure_gradient_clipping(None, None, None)
    assert calls == [(0.7, "norm"), (0.2, "value")]


# -- generation ------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_cache_and_no_cache_give_the_same_tokens(tok, positions):
    model = make_model(tok, positions=positions)
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 3},
               {"temperature": 0.8, "top_k": 5, "top_p": 0.9, "seed": 4}):
        cached = gen(model, PROMPTS, max_new_tokens=20, **kw)  # 10 + 20 <= block_size 32
        plain = gen(model, PROMPTS, max_new_tokens=20, use_cache=False, **kw)
        assert cached.texts == plain.texts, kw
        assert len(set(cached.texts)) == len(PROMPTS)  # not a degenerate model
        assert cached.per_sample["tokens_generated"] == [20] * 4


@pytest.mark.parametrize("positions, width, text", [("learned", 32, "Hello, W"),
                                                     ("rotary", 16, "fox jumps")])
def test_sliding_window_past_the_context(tok, positions, width, text):
    block = 16
    model = make_model(tok, block_size=block, positions=positions, n_embd=width)
    prompt = tok.encode(text)

    def greedy(logits):
        return logits.argmax(-1)

    def next_token(context):
        return model(torch.tensor([context]))[0, -1].argmax().item()

    with torch.no_grad():
        cached = decode(model.net, [prompt], max_new_tokens=30, choose=greedy)[0]
        plain = decode(model.net, [prompt], max_new_tokens=30, choose=greedy,
                       use_cache=False)[0]
        # The documented rules, one token at a time: the reference path reads the last
        # block_size tokens; the cached path cuts a context that outgrew the window to
        # its last block_size // 2 tokens and goes on from there.
        ctx_c, ctx_p = list(prompt), list(prompt)
        for t_c, t_p in zip(cached, plain):
            assert t_c == next_token(ctx_c) and t_p == next_token(ctx_p[-block:])
            ctx_c.append(t_c)
            ctx_p.append(t_p)
            if len(ctx_c) > block:
                ctx_c = ctx_c[-(block // 2):]
    fits = block - len(prompt) + 1  # the last of these is chosen from a full window
    assert len(cached) == len(plain) == 30
    assert cached[:fits] == plain[:fits] and cached != plain


def test_rows_leaving_the_batch_do_not_change_the_others(tok, monkeypatch):
    model = make_model(tok, block_size=16)
    long, short = tok.encode("lazy dog.\n"), tok.encode("x")  # 10 tokens and 1
    prefills = []
    new_cache = model.net.new_cache
    monkeypatch.setattr(model.net, "new_cache", lambda n: prefills.append(n) or new_cache(n))

    def greedy(logits):
        return logits.argmax(-1)

    with torch.no_grad():
        alone = decode(model.net, [short], max_new_tokens=24, choose=greedy)[0]
        prefills.clear()
        # Row 0 ends after its first token. Row 1 then runs behind 9 padding columns
        # that fill the cache before the row fills its window: the batch is re-padded,
        # later the row's own window overflows and is halved, as when it runs alone.
        both = decode(model.net, [long, short], max_new_tokens=24, choose=greedy,
                      on_token=lambda row, token: row == 0)
    assert len(both[0]) == 1 and both[1] == alone
    assert len(prefills) == 3  # at the start, the re-pad, the halving at 17 tokens


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_rows_of_one_length_decode_without_a_mask(tok, positions, monkeypatch):
    # Rows without padding take the fast step: no attention mask for the one new query
    # (SDPA's fused kernel). It must give the reference path's tokens, also after a row
    # leaves the batch.
    model = make_model(tok, positions=positions)
    rows = [tok.encode(t) for t in ("the f", "lazy ", "Hello")]  # 5 tokens each
    assert len({len(r) for r in rows}) == 1

    def greedy(logits):
        return logits.argmax(-1)

    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):
        if q.shape[2] == 1 and k.shape[2] > 1:  # a cached decode step
            masks.append((attn_mask, kw.get("is_causal")))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    def stop_row_1(row, token):
        return row == 1 and len(seen[1]) >= 3

    seen = {0: [], 1: [], 2: []}
    with torch.no_grad():
        plain = decode(model.net, rows, max_new_tokens=12, choose=greedy, use_cache=False,
                       on_token=lambda r, t: seen[r].append(t) or stop_row_1(r, t))
        seen = {0: [], 1: [], 2: []}
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
        cached = decode(model.net, rows, max_new_tokens=12, choose=greedy,
                        on_token=lambda r, t: seen[r].append(t) or stop_row_1(r, t))
    assert cached == plain
    assert [len(c) for c in cached] == [12, 3, 12]
    assert masks and all(m is None and not causal for m, causal in masks)


def test_top_k_1_is_greedy(tok):
    model = make_model(tok)
    greedy = gen(model, PROMPTS, temperature=0)
    assert gen(model, PROMPTS, temperature=1.3, top_k=1, seed=7).texts == greedy.texts
    assert gen(model, PROMPTS, temperature=1.0, top_p=1e-6, seed=7).texts == greedy.texts
    assert gen(model, PROMPTS, temperature=1.0, seed=7).texts != greedy.texts


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda out: torch.isfinite(out)[0].tolist()
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.8)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert kept(filter_logits(shuffled, top_p=0.8)) == [False, True, False, True]


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_prompt_generates_the_same_alone_or_left_padded_in_a_batch(tok, use_cache):
    model = make_model(tok, positions="rotary")
    batch = gen(model, PROMPTS, temperature=0, use_cache=use_cache)
    for i, p in enumerate(PROMPTS):
        alone = gen(model, [p], temperature=0, use_cache=use_cache)
        assert alone.texts[0] == batch.texts[i], p
    assert batch.conditions == [{"prompt": p} for p in PROMPTS]


def test_same_seed_same_texts_and_no_prompt_starts_from_a_newline(tok):
    model = make_model(tok)
    a = model.generate(3, seed=5, max_new_tokens=10)
    assert a.texts == model.generate(3, seed=5, max_new_tokens=10).texts
    assert a.texts != model.generate(3, seed=6, max_new_tokens=10).texts
    assert a.conditions == [{}, {}, {}]
    assert model.generate(1, temperature=0, max_new_tokens=10).texts == \
        model.generate(1, condition={"prompt": "\n"}, temperature=0, max_new_tokens=10).texts
    assert a.metadata["seed"] == 5 and a.metadata["max_new_tokens"] == 10


def test_generation_restores_training_mode(tok):
    model = make_model(tok).train()
    model.generate(1, max_new_tokens=2, seed=0)
    assert model.training


def test_stop_strings_cut_the_text_and_end_rows(tok):
    model = make_model(tok)
    free = gen(model, PROMPTS, temperature=0, max_new_tokens=24)
    stop = free.texts[0][5:7]  # occurs in row 0 after 7 tokens
    cut = gen(model, PROMPTS, temperature=0, max_new_tokens=24, stop=[stop, "@@"])
    rows = zip(free.texts, cut.texts, cut.per_sample["tokens_generated"],
               cut.per_sample["finish_reasons"])
    for i, (full, text, n, reason) in enumerate(rows):
        at = full.find(stop)
        if at < 0:  # rows without the stop string go on, unchanged by the others leaving
            assert (text, n, reason) == (full, 24, "length")
        else:
            assert text == full[:at] and reason == "stop"
            # It ended with the token that completed the stop string.
            shorter = gen(model, [PROMPTS[i]], temperature=0, max_new_tokens=n - 1)
            assert stop not in shorter.texts[0] and n < 24
    assert cut.per_sample["finish_reasons"][0] == "stop"
    assert cut.metadata["stop"] == [stop, "@@"]
    # Every row stopping ends generation early; the prompt itself never stops a row.
    all_stop = gen(model, ["the"] * 2, temperature=0, max_new_tokens=24, stop=free.texts[0][0])
    assert all_stop.texts == ["", ""] and all_stop.per_sample["tokens_generated"] == [1, 1]
    assert "Hello" not in free.texts[1]
    assert gen(model, [PROMPTS[1]], temperature=0, max_new_tokens=24, stop="Hello").texts == \
        [free.texts[1]]


@pytest.mark.parametrize("use_cache", [True, False])
def test_stream_pieces_join_to_the_final_texts(tok, use_cache):
    model = make_model(tok)
    free = gen(model, PROMPTS, temperature=1.0, max_new_tokens=24, seed=2)
    stops = [free.texts[1][6:9], free.texts[3][10:12]]
    pieces: dict[int, list[str]] = {i: [] for i in range(len(PROMPTS))}
    out = gen(model, PROMPTS, temperature=1.0, max_new_tokens=24, seed=2, stop=stops,
              use_cache=use_cache, stream=lambda i, piece: pieces[i].append(piece))
    for i, text in enumerate(out.texts):
        assert "".join(pieces[i]) == text
        assert all(pieces[i])
    assert out.per_sample["finish_reasons"][1] == "stop"
    assert sum(len(p) for p in pieces.values()) > 4 * 8  # streamed along, not at the end


def test_stream_holds_back_incomplete_utf8_and_stop_prefixes():
    # Ids stand for bytes; "é" is two bytes and "€" three, so some prefixes decode to
    # U+FFFD, as byte-level BPE does mid-character.
    pieces_of = {1: b"a", 2: "é".encode()[:1], 3: "é".encode()[1:], 4: b"<", 5: b"/", 6: b"b",
                 7: "€".encode()[:2], 8: "€".encode()[2:]}

    def decode(ids):
        return b"".join(pieces_of[i] for i in ids).decode("utf-8", errors="replace")

    sent: list[str] = []
    row = RowText(decode, stop=["</s>"], emit=sent.append)
    for token in (1, 2, 3, 4, 5, 6, 7, 8, 4, 1):
        assert not row.add(token)
    row.finish()
    assert "".join(sent) == row.text == "aé</b€<a"
    assert not any("\ufffd" in s for s in sent)
    assert sent[:3] == ["a", "é", "</b"]  # "<" and "</" waited: they could begin "</s>"

    sent.clear()
    row = RowText(decode, stop=["</s>", "b"], emit=sent.append)
    assert [row.add(t) for t in (1, 4, 5, 6)] == [False, False, False, True]
    assert row.stopped and row.text == "a</" and "".join(sent) == "a</"


def test_incremental_decoding_matches_a_full_decode():
    import random

    pieces_of = [b"a", b" ", "é".encode()[:1], "é".encode()[1:], "€".encode()[:1],
                 "€".encode()[1:], b"\x82ab", "日".encode()]

    def byte_decode(ids):
        return b"".join(pieces_of[i] for i in ids).decode("utf-8", errors="replace")

    def ids_decode(ids):  # genframe's text of a model without a tokenizer
        return " ".join(str(i) for i in ids)

    rng = random.Random(0)
    for decode_ in (byte_decode, ids_decode):
        for _ in range(20):
            sent: list[str] = []
            row = RowText(decode_, stop=["ab€", "€€"], emit=sent.append)
            ids = [rng.randrange(len(pieces_of)) for _ in range(rng.randrange(1, 40))]
            for n, t in enumerate(ids, 1):
                full = decode_(ids[:n])
                if row.add(t):
                    at = min(i for i in (full.find("ab€"), full.find("€€")) if i >= 0)
                    assert row.text == full[:at]
                    break
                assert row.text == full and "ab€" not in full and "€€" not in full
            row.finish()
            assert "".join(sent) == row.text


def test_byte_level_bpe_generation_streams_whole_characters(monkeypatch):
    text = "héllo wörld, ça va? 日本語のテキスト. " * 3
    tok = build_tokenizer("bpe", [text], vocab_size=280)
    model = make_model(tok, block_size=24)
    decoded: list[str] = []
    original = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids: decoded.append(original(ids)) or decoded[-1])
    pieces: list[str] = []
    out = model.generate(1, condition={"prompt": "日本"}, seed=0, max_new_tokens=30,
                         stream=lambda i, p: pieces.append(p))
    final = out.texts[0]
    assert "".join(pieces) == final
    # Some step ended mid-character (a U+FFFD the next token turned into a character):
    # the stream held it back, so the joined pieces still equal the final text.
    resolved = [t for t in decoded if t.endswith("\ufffd") and final[len(t) - 1] != "\ufffd"]
    assert resolved


def test_ids_beyond_the_tokenizer_are_never_generated(tok, monkeypatch):
    model = make_model(None, vocab_size=tok.vocab_size + 20)
    model.set_tokenizer(tok)
    seen: list[int] = []
    original = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids: seen.extend(ids) or original(ids))
    model.generate(4, seed=0, max_new_tokens=20, temperature=2.0)
    assert seen and max(seen) < tok.vocab_size


def test_without_a_tokenizer_texts_are_ids_and_prompts_are_refused():
    model = make_model(None)
    out = model.generate(2, seed=0, max_new_tokens=5)
    assert all(len(t.split(" ")) == 5 and all(w.isdigit() for w in t.split(" "))
               for t in out.texts)
    with pytest.raises(UserError, match="no tokenizer"):
        model.generate(1, condition={"prompt": "hi"})


def test_a_prompt_longer_than_the_context_is_refused(tok):
    model = make_model(tok, block_size=8)
    model.generate(1, condition={"prompt": "x" * 7}, max_new_tokens=3, seed=0)  # 7 fits
    with pytest.raises(UserError, match=r"prompt is 8 tokens.*block_size=8"):
        model.generate(1, condition={"prompt": "x" * 8}, max_new_tokens=3)
    with pytest.raises(UserError, match="prompt 2 of 2 is 9 tokens"):
        model.generate(2, condition={"prompt": ["ok", "y" * 9]})
    ids = tok.encode("y" * 9)
    with pytest.raises(UserError, match="condition.prompt_ids: prompt 2 of 2 is 9 tokens"):
        model.generate(2, condition={"prompt_ids": [ids[:2], ids]})
    with pytest.raises(UserError, match="condition.prompt_ids: the prompt is 9 tokens"):
        model.generate(2, condition={"prompt_ids": ids})  # one list for every sample


@pytest.mark.parametrize("options, match", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"stop": ""}, "stop"),
    ({"temprature": 0.5}, "Did you mean 'temperature'"),
    ({"condition": {"prompt": ["a"]}}, "1 prompts for 2 samples"),
    ({"condition": {"label": 1}}, "prompt"),
])
def test_bad_generation_options_are_user_errors(tok, options, match):
    model = make_model(tok)
    with pytest.raises(UserError, match=match):
        model.generate(2, **options)


@pytest.mark.parametrize("kwargs, match", [
    ({"vocab_size": None}, "vocab_size is null"),
    ({"n_embd": 30, "n_head": 4}, "divisible"),
    ({"positions": "rotery"}, "learned, rotary.*Did you mean 'rotary'"),
    ({"positions": "rotary", "n_embd": 6, "n_head": 2}, "even head size"),
    ({"dropout": 1.0}, "dropout"),
    ({"betas": [0.9]}, "betas"),
])
def test_bad_constructor_values_are_user_errors(kwargs, match):
    args = {"vocab_size": 10, "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 8}
    with pytest.raises(UserError, match=match):
        Transformer(**{**args, **kwargs})


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tok):
    model = Transformer(vocab_size=tok.vocab_size - 1, block_size=8, n_layer=1, n_head=2,
                        n_embd=8)
    with pytest.raises(UserError, match="vocab_size"):
        model.set_tokenizer(tok)


def test_hparams_are_plain_and_the_presets_are_registered():
    from genframe.plugins import get_registry

    model = Transformer(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8,
                        betas=(0.8, 0.9))
    assert model.hparams.betas == [0.8, 0.9]
    registry = get_registry()
    for name in ("transformer", "transformer_mini", "transformer_small"):
        assert registry.model(name).load() is Transformer
