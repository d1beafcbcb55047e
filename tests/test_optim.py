"""The shared optimizers: AdamW's implementation choice, Muon in float32 where bfloat16
is slow, and Muon with AdamW stepped as one optimizer."""

from __future__ import annotations

import copy

import pytest
import torch

from genframe import optim


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((16, 8), (8, 24), (5,))]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_muon_is_torchs_muon_and_float32_stays_close(monkeypatch):
    ours, theirs, fp32 = _params()[:2], _params()[:2], _params()[:2]
    monkeypatch.setattr(optim, "fast_bf16", lambda device: True)
    a = optim.Muon(ours, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    b = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        _grads(ours, step), _grads(theirs, step)
        a.step(), b.step()
    for p, q in zip(ours, theirs):
        assert torch.allclose(p, q, atol=1e-6), (p - q).abs().max()
    monkeypatch.setattr(optim, "fast_bf16", lambda device: False)
    c = optim.Muon(fp32, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    start = [p.detach().clone() for p in fp32]
    for step in range(3):
        _grads(fp32, step)
        c.step()
    for p, q, s in zip(fp32, theirs, start):
        moved = (q - s).norm()
        assert (p - q).norm() < 0.05 * moved  # bfloat16 rounding only
    assert a.state_dict()["state"].keys() == b.state_dict()["state"].keys()


def test_newton_schulz_orthogonalises():
    g = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    x = optim.newton_schulz(g, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32)
    singular = torch.linalg.svdvals(x)
    assert x.shape == g.shape and singular.min() > 0.5 and singular.max() < 1.5
    u, _, v = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity((u @ v).flatten(), x.flatten(), dim=0) > 0.9


def test_muon_with_adamw_steps_both_and_round_trips_its_state():
    def build(params):
        matrices, others = params[:2], [{"params": params[2:], "weight_decay": 0.0}]
        return optim.MuonWithAdamW(matrices, others, lr=1e-2, weight_decay=0.1)

    params = _params()
    opt = build(params)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    assert len(opt.param_groups) == 2 and {len(g["params"]) for g in opt.param_groups} == {1, 2}
    start = [p.detach().clone() for p in params]
    for step in range(2):
        _grads(params, step)
        opt.step()
        schedule.step()
    assert all(not torch.equal(p, s) for p, s in zip(params, start))  # Muon's and AdamW's moved
    assert [m.param_groups[0]["lr"] for m in opt.members] == [1e-2 * 0.25] * 2  # the schedule reached both
    assert len(opt.state) == 3
    saved = copy.deepcopy(opt.state_dict())  # as from a checkpoint: load_state_dict shares tensors
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = build(twin_params)
    twin.load_state_dict(saved)
    for step in (2, 3):
        _grads(params, step), _grads(twin_params, step)
        opt.step(), twin.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))
    with pytest.raises(ValueError, match="another optimizer"):
        twin.load_state_dict(torch.optim.SGD(params, lr=1).state_dict())
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_adamw_takes_the_fused_kernel_for_float_tensors():
    params = _params()
    assert optim.adamw(params, lr=1e-3).defaults["fused"] is True
    halves = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]
    assert optim.implementation(halves) == {"fused": True}
    ints = [torch.zeros(3, dtype=torch.long)]
    assert optim.implementation(ints) == {"foreach": True}
