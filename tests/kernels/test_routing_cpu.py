"""DALA's routed tokens through danon's C++ scan (danon/kernels/csrc/routing_cpu.cpp) against the traceable tree
(core/dala.py `_routed_tokens_tree`) and a brute force: the same lists, in the same order, and eager CPU calls
take the scan while traces keep the tree. tests/core/test_plans.py holds both to the brute force on random sizes.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import danon
from danon.core import dala
from danon.kernels import native_cpu, routing_cpu


def _scores(n, seed, dtype=torch.float32, heads=3):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, heads, n, generator=g, dtype=torch.float64).to(dtype)
    scores[0, :, : n // 4] = float("-inf")          # padding: never routed
    scores[1, 1, 5::7] = float("-inf")              # scattered padding
    return scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,b,m,w", [(1000, 16, 8, 2), (333, 16, 20, 0), (2048, 64, 64, 4), (10, 16, 10, 0),
                                     (4096, 32, 40, 3)])
def test_the_scan_equals_the_tree_in_order(dtype, causal, n, b, m, w):
    scores = _scores(n, n + b + m, dtype)
    tk = -(-n // b)
    for first, count in [(0, tk), (tk - 1, 1), (min(3, tk - 1), 1), (tk // 2, tk - tk // 2), (0, 0)]:
        tree = dala._routed_tokens_tree(scores, b, m, w, causal, first, count)
        scan = routing_cpu.routed_tokens(scores, b, m, w, causal, first, count)
        assert scan.dtype == torch.int32 and scan.shape == (2, 3, count, m)
        assert torch.equal(scan, tree), (first, count)


def test_equal_scores_rank_the_lower_token_first_and_nan_takes_a_slot_as_in_the_tree():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (1, 2, 640), generator=g).float()    # many ties
    b, m, w = 32, 24, 1
    scan = routing_cpu.routed_tokens(scores, b, m, w, True, 0, 20)
    tk = 20
    for t in range(tk):
        end = max(0, t - w) * b
        candidates = sorted(range(end), key=lambda j: (-scores[0, 0, j].item(), j))[:m]
        expected = candidates + [-1] * (m - len(candidates))
        assert scan[0, 0, t].tolist() == expected, t
    # the tree breaks ties its own way: the same scores are picked
    tree = dala._routed_tokens_tree(scores, b, m, w, True, 0, 20).long()
    picked = lambda idx: torch.where(idx >= 0, scores[:, :, None, :].expand(-1, -1, tk, -1).gather(
        -1, idx.clamp(min=0)), float("-inf")).sort(-1).values
    assert torch.equal(picked(scan.long()), picked(tree))
    # NaN ranks above every number (torch.topk's order) and leaves its slot -1, as the tree's lists do
    scores = _scores(512, 1)
    scores[:, :, 3::50] = float("nan")
    for causal in (True, False):
        tree = dala._routed_tokens_tree(scores, 16, 12, 1, causal)
        assert torch.equal(routing_cpu.routed_tokens(scores, 16, 12, 1, causal, 0, 32), tree)


def test_eager_cpu_calls_take_the_scan_and_traces_the_tree(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args)
        return routing_cpu.routed_tokens(*args)

    monkeypatch.setitem(dala._ROUTING_KERNELS, "cpu", spy)
    q = torch.randn(1, 2, 1024, 16)
    plan = danon.attention_plan(q, q, q, kind="dala", causal=True, block_size=32, window=64, memory_size=16)
    assert len(calls) == 1
    tree = dala._routed_tokens_tree(q.norm(dim=-1), 32, 16, 2, True)
    assert torch.equal(plan.token_idx, tree)
    mode = FakeTensorMode()
    fake = mode.from_tensor(q.norm(dim=-1))
    with mode:
        out = dala._routed_tokens(fake, 32, 16, 2, True)
    assert len(calls) == 1 and out.shape == (1, 2, 32, 16)


def test_bad_arguments_name_what_is_allowed():
    scores = torch.randn(1, 2, 64)
    ops = native_cpu.load()
    with pytest.raises(RuntimeError, match=r"scores must be \[B, Hkv, Nk\]"):
        ops.routed_tokens(scores[0], 16, 4, 1, True, 0, 4)
    with pytest.raises(RuntimeError, match="block_size >= 1"):
        ops.routed_tokens(scores, 0, 4, 1, True, 0, 4)
    # what the C++ scan does not take goes back to the caller, which builds the tree
    assert routing_cpu.routed_tokens(scores.half(), 16, 4, 1, True, 0, 4) is None
    assert routing_cpu.routed_tokens(scores, 16, 4, -1, True, 0, 4) is None
