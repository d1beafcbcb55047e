"""Cross-attention and the spatial transformer block in genframe.layers (fast, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from genframe.layers import CrossAttention, SpatialTransformer, TransformerBlock

C, D, T = 8, 12, 5  # map channels, context width, context length


def _live_block(**kwargs) -> SpatialTransformer:
    """A SpatialTransformer whose zero-initialised output conv is made non-zero, so the
    attention path shows in the output (at init the block is exactly the identity)."""
    torch.manual_seed(0)
    block = SpatialTransformer(C, D, num_heads=2, **kwargs)
    nn.init.normal_(block.proj_out.weight, std=0.5)
    return block.eval()


def test_cross_attention_shapes():
    attn = CrossAttention(16, D, num_heads=4)
    y = attn(torch.randn(3, 7, 16), torch.randn(3, T, D))
    assert y.shape == (3, 7, 16)
    wide = CrossAttention(16, D, num_heads=2, head_dim=24)  # inner width 48 != query_dim
    assert wide(torch.randn(3, 7, 16), torch.randn(3, T, D)).shape == (3, 7, 16)
    assert CrossAttention(16, None, num_heads=4)(torch.randn(2, 7, 16)).shape == (2, 7, 16)


@pytest.mark.parametrize("depth, gated_ff, head_dim", [(1, True, None), (2, False, 3)])
def test_spatial_transformer_shape(depth, gated_ff, head_dim):
    block = SpatialTransformer(C, D, num_heads=2, head_dim=head_dim, depth=depth, gated_ff=gated_ff)
    assert len(block.blocks) == depth
    x = torch.randn(2, C, 5, 3)  # odd, non-square map
    assert block(x, torch.randn(2, T, D), torch.ones(2, T, dtype=torch.bool)).shape == x.shape


def test_spatial_transformer_is_identity_at_init():
    block = SpatialTransformer(C, D, num_heads=2)
    x = torch.randn(2, C, 4, 4)
    assert torch.equal(block(x, torch.randn(2, T, D)), x)
    assert torch.equal(block(x), x)


def test_padding_mask_ignores_padded_tokens_only():
    block = _live_block()
    x, ctx = torch.randn(2, C, 3, 3), torch.randn(2, T, D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    y = block(x, ctx, mask)

    padded = ctx.clone()
    padded[0, 3:] = 100 * torch.randn(2, D)  # only sample 0's padding slots change
    assert torch.allclose(block(x, padded, mask), y, atol=1e-6)
    assert not torch.allclose(block(x, padded, None), block(x, ctx, None), atol=1e-3)  # unmasked they count

    real = ctx.clone()
    real[0, 1] = torch.randn(D)  # a real token of sample 0
    y_real = block(x, real, mask)
    assert not torch.allclose(y_real[0], y[0], atol=1e-3)
    assert torch.allclose(y_real[1], y[1], atol=1e-6)  # samples do not see each other's context


def test_cross_attention_mask_alone_and_all_padding_row():
    torch.manual_seed(0)
    attn = CrossAttention(16, D, num_heads=4).eval()
    x, ctx = torch.randn(2, 4, 16), torch.randn(2, T, D)
    mask = torch.tensor([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    y = attn(x, ctx, mask)
    assert torch.isfinite(y).all()
    assert torch.equal(y[1], torch.zeros_like(y[1]))  # an empty caption: no contribution
    # one real key: every query reads exactly that token's value
    assert torch.allclose(y[0], attn.to_out(attn.to_v(ctx[0, :1])).expand(4, 16), atol=1e-5)
    # a long 0/1 mask (as tokenizers return) means the same as a bool one
    assert torch.allclose(attn(x, ctx, mask.long()), y)


def test_all_padding_sample_matches_no_context():
    block = _live_block()
    x, ctx = torch.randn(2, C, 3, 3), torch.randn(2, T, D)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    y = block(x, ctx, mask)
    assert torch.isfinite(y).all()
    assert torch.allclose(y[1], block(x[1:], None)[0], atol=1e-6)
    assert not torch.allclose(y[0], block(x[:1], None)[0], atol=1e-3)


def test_gradients_reach_the_context():
    block = _live_block().train()
    ctx = torch.randn(2, T, D, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    block(torch.randn(2, C, 3, 3), ctx, mask).square().sum().backward()
    assert ctx.grad is not None
    assert ctx.grad[0, :3].abs().sum() > 0 and ctx.grad[1].abs().sum() > 0
    assert torch.equal(ctx.grad[0, 3:], torch.zeros(2, D))  # padding gets no gradient
    assert all(p.grad is not None for p in block.parameters())


def test_context_none_works_and_differs_from_conditioned():
    block = _live_block()
    x = torch.randn(2, C, 3, 3)
    y = block(x, None)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert not torch.allclose(y, block(x, torch.randn(2, T, D)), atol=1e-3)
    selfish = SpatialTransformer(C, None, num_heads=2)  # self-attention only
    assert selfish(x).shape == x.shape
    assert all(b.attn2 is None for b in selfish.blocks)


@pytest.mark.parametrize("batch, length", [(1, 1), (1, T), (3, 1)])
def test_batch_one_and_single_token_context(batch, length):
    block = _live_block()
    x, ctx = torch.randn(batch, C, 2, 3), torch.randn(batch, length, D)
    y = block(x, ctx, torch.ones(batch, length, dtype=torch.bool))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert torch.allclose(y, block(x, ctx), atol=1e-6)  # an all-True mask is no mask
    block(torch.randn(1, C, 1, 1), torch.randn(1, 1, D))  # a 1x1 map, one token


def test_overfit_two_contexts_to_two_targets():
    """The same input map with two different captions must be sent to two different
    targets: only the context tells them apart, so an unconditioned block can do no
    better than predicting the targets' mean."""
    torch.manual_seed(0)
    block = SpatialTransformer(C, D, num_heads=2)
    x = torch.randn(1, C, 4, 4).expand(2, -1, -1, -1)  # identical inputs
    ctx = torch.randn(2, T, D)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    target = x + torch.randn(2, C, 4, 4)
    baseline = ((target[0] - target[1]) / 2).square().mean().item()  # best loss without context
    opt = torch.optim.Adam(block.parameters(), lr=1e-2)
    for _ in range(100):
        loss = (block(x, ctx, mask) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = (block(x, ctx, mask) - target).square().mean().item()
    assert final < 0.15 * baseline, (final, baseline)


def test_transformer_block_on_tokens():
    block = TransformerBlock(16, num_heads=4, context_dim=D)
    x = torch.randn(2, 6, 16)
    assert block(x, torch.randn(2, T, D)).shape == x.shape
    assert block(x).shape == x.shape
    with pytest.raises(ValueError, match="context_dim"):
        TransformerBlock(16, num_heads=4)(x, torch.randn(2, T, D))


@pytest.mark.parametrize("build, match", [
    (lambda: CrossAttention(10, D, num_heads=3), "num_heads"),
    (lambda: CrossAttention(0, D), "query_dim"),
    (lambda: CrossAttention(16, 0), "context_dim"),
    (lambda: CrossAttention(16, D, num_heads=2, head_dim=-1), "head_dim"),
    (lambda: CrossAttention(16, D, dropout=1.5), "dropout"),
    (lambda: SpatialTransformer(6, D, num_heads=4), "num_heads"),
    (lambda: SpatialTransformer(C, D, depth=0), "depth"),
])
def test_bad_constructor_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_forward_shapes():
    attn = CrossAttention(16, D, num_heads=4)
    x, ctx = torch.randn(2, 4, 16), torch.randn(2, T, D)
    with pytest.raises(ValueError, match=r"context must be \(B=2, T, 12\)"):
        attn(x, torch.randn(2, T, D + 1))
    with pytest.raises(ValueError, match="context must be"):
        attn(x, torch.randn(3, T, D))  # batch mismatch
    with pytest.raises(ValueError, match=r"mask must be \(B, T\)"):
        attn(x, ctx, torch.ones(2, T + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="context .* is required"):
        attn(x)
    with pytest.raises(ValueError, match="x must be"):
        attn(torch.randn(2, 4, 15), ctx)
    with pytest.raises(ValueError, match=r"x must be \(B, 8, H, W\)"):
        SpatialTransformer(C, D)(torch.randn(2, C + 1, 3, 3), torch.randn(2, T, D))
