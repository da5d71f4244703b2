"""danon.context_parallel: one sequence split across ranks equals the single-process op, outputs and gradients.

The distributed checks run in spawned gloo CPU groups of 2 and 4 ranks (tests/parallel/_cp_workers.py): every
family and the exact one, causal and not, with key padding, GQA and N = 200 (13 blocks of 16, the last one
short: not a multiple of ranks x block), in the contiguous and the balanced order, fp64 (and fp32 at 4 ranks);
then three SGD steps of a factory model trained with its sequence split. The in-process tests cover the layout,
the one-rank group and the errors.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import danon
from danon.parallel import SequenceLayout, one_rank_group
from _spawn import spawn_ranks

FP64, FP32 = 1e-10, 1e-5


def _spawn(tmp_path, world: int, which: str, timeout: float) -> list:
    sys.path.insert(0, os.path.dirname(__file__))
    try:
        import _cp_workers
    finally:
        sys.path.pop(0)
    return spawn_ranks(_cp_workers.run_checks, world, (which,), tmp_path, timeout)


# 4 ranks (the full check set) take about 65 s to spawn and run: -m slow; the default run checks 2 ranks
@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)], ids=["2 ranks", "4 ranks"])
def ranks(request, tmp_path_factory):
    world = request.param
    return world, _spawn(tmp_path_factory.mktemp(f"cp{world}"), world, "full" if world == 4 else "quick", 300)


def _op_cases(results: dict) -> dict:
    return {k: v for k, v in results.items() if isinstance(v, dict) and "out" in v}


def test_every_family_equals_the_single_process_op(ranks):
    world, results = ranks
    cases = _op_cases(results[0])
    # 10 family settings x 2 orders x (causal or not x padded or not in fp64, causal or not in fp32, tail padding
    # with a rank that passes no mask), and D != Dv twice per order
    assert len([k for k in cases if k.endswith(("dense", "padded"))]) == 80
    assert len([k for k in cases if k.endswith("fp32")]) == 40
    assert len([k for k in cases if k.endswith("tail padding")]) == 20
    for name, errs in cases.items():
        limit = FP32 if name.endswith("fp32") else FP64
        worst = max(errs[x] for x in ("out", "dq", "dk", "dv"))
        assert errs["finite"], f"{name}: a non-finite output or gradient"
        assert worst < limit, f"{name} at {world} ranks: relative error {worst:.2e} >= {limit:.0e} ({errs})"


def test_training_steps_equal_the_single_process_run(ranks):
    """The factory models trained with the sequence split; "dense" is the SDPA layer routed through danon's exact
    family inside `with cp:`, "msra_checkpointed" recomputes its layers in a backward called after the scope."""
    world, results = ranks
    kinds = ["msra", "dense", "msra_checkpointed"] + (["dala", "ucsa"] if world == 4 else [])
    for kind in kinds:
        got = results[0][f"training|{kind}"]
        assert got["param_rel"] < 1e-10, f"{kind}: parameters after 3 steps differ by {got['param_rel']:.2e}"
        for one, split in got["losses"]:
            assert abs(one - split) < 1e-10 * abs(one)
        assert got["losses"][-1][0] < got["losses"][0][0]     # it did train
    assert all(r["bytes_training"] > 0 for r in results)       # the ranks did exchange keys


def test_transformers_llama_trains_split_like_one_process(ranks):
    """attn_implementation="danon" (MSRA) inside `with cp:`, position_ids and a padded batch row: three SGD steps."""
    world, results = ranks
    err = results[0]["training|llama"]["param_rel"]
    assert err < 1e-10, f"Llama parameters after 3 steps differ by {err:.2e} at {world} ranks"


def test_bytes_counted_per_collective_match_the_layout(ranks):
    """MSRA causal sends its block sums to every other rank and one halo block to the next rank, nothing else
    (beyond the requests' ids); the backward reduce-scatters the block sums' gradients and sends the halo's
    gradient back from the next rank."""
    world, results = ranks
    for r, res in enumerate(results):
        got = res["bytes"]
        assert got["sent"]["block sums"] == got["expected_block_sums"]
        assert got["sent"]["keys and values"] == got["expected_halo"], f"rank {r}"
        assert got["backward"]["block sums"] == got["expected_block_sums"]
        assert got["backward"]["keys and values"] == got["expected_halo_backward"], f"rank {r}"


# --- in one process ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,world,b,balanced", [(200, 2, 16, False), (200, 4, 16, True), (1000, 3, 64, False),
                                                (64, 4, 16, False), (4096, 4, 64, True)])
def test_layout_covers_the_sequence_once_in_whole_blocks(n, world, b, balanced):
    layout = SequenceLayout(n, world, b, balanced)
    seen = torch.cat([layout.positions(r) for r in range(world)])
    assert torch.equal(seen.sort().values, torch.arange(n))
    for r in range(world):
        for s, e in layout.segments(r):
            assert s % b == 0 and (e % b == 0 or e == n) and e > s
        rank, row = layout.owners(layout.positions(r))
        assert (rank == r).all() and torch.equal(row, torch.arange(layout.local_len(r)))
    x = torch.randn(2, n, 3)
    assert torch.equal(layout.unshard([layout.shard(x, r) for r in range(world)]), x)


def test_balanced_layout_evens_out_causal_work():
    layout = SequenceLayout(8192, 4, 64, balanced=True)
    work = [sum(e * e - s * s for s, e in layout.segments(r)) for r in range(4)]   # causal pairs ~ position^2
    assert max(work) / min(work) < 1.1
    contiguous = SequenceLayout(8192, 4, 64)
    work = [sum(e * e - s * s for s, e in contiguous.segments(r)) for r in range(4)]
    assert max(work) / min(work) > 5


@pytest.mark.parametrize("bad,match", [
    (dict(seq_len=0), "seq_len must be an integer >= 1"),
    (dict(block_size=0), "block_size must be an integer >= 1"),
    (dict(seq_len=40, balanced=True), "fewer than the 4 pieces"),
])
def test_layout_rejects_bad_arguments(bad, match):
    kw = dict(seq_len=200, world_size=2, block_size=16, balanced=False) | bad
    with pytest.raises(ValueError, match=match):
        SequenceLayout(**kw)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind", ["exact", "msra", "ucsa", "dala"])
def test_one_rank_equals_the_op(kind, causal):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 100, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 2, 100, 8, dtype=torch.float64)
    kpm = torch.rand(2, 100) > 0.3
    opts = dict(block_size=16) if kind == "exact" else dict(block_size=16, **{
        "msra": dict(window=16), "ucsa": dict(local_window_size=16, global_tokens=16, top_k_blocks=1),
        "dala": dict(window=16, memory_size=4)}[kind])
    with one_rank_group():
        cp = danon.context_parallel(100, block_size=16)
        out = cp.attention(q, k, v, kind, causal=causal, key_padding_mask=kpm, **opts)
        assert cp.bytes_sent() == 0
    ref = danon.attention(q, k, v, kind=kind, causal=causal, key_padding_mask=kpm, **opts)
    assert ((out - ref).norm() / ref.norm()).item() < FP64


def test_context_manager_routes_danon_attention_and_restores():
    q = torch.randn(1, 2, 64, 8, dtype=torch.float64)
    with one_rank_group():
        cp = danon.context_parallel(64, block_size=16)
        with cp:
            assert danon.parallel.active() is cp
            out = danon.attention(q, q, q, kind="msra", block_size=16, window=16)
            assert "block sums" in cp.exchange.sent       # it ran through the exchange (one rank: 0 bytes)
        assert danon.parallel.active() is None
    ref = danon.attention(q, q, q, kind="msra", block_size=16, window=16)
    assert ((out - ref).norm() / ref.norm()).item() < FP64


@pytest.mark.parametrize("dtype,n", [(torch.bfloat16, 4096), (torch.float16, 66560)])
def test_fetched_token_positions_keep_their_precision(dtype, n):
    """DALA's routed tokens join the call as one-token summaries whose ALiBi position is the token's: it must not be
    rounded to the keys' dtype (bf16 holds integers exactly only up to 256; fp16 none past 65504). Measured against
    the float64 op's output rounded to the dtype: a few last bits differ (relative 4e-5 for bf16, 1e-5 for fp16);
    with the positions rounded to the dtype they differ by 2.5e-4 and 1.5e-4."""
    torch.manual_seed(0)
    q = torch.randn(1, 1, n, 8, dtype=dtype)
    k, v = torch.randn(2, 1, 1, n, 8, dtype=dtype)
    opts = dict(causal=True, block_size=64, window=64, memory_size=4, slopes=torch.full((1,), 1e-4))
    exact = danon.attention(q.double(), k.double(), v.double(), kind="dala", **{**opts, "slopes": opts["slopes"].double()})
    with one_rank_group():
        out = danon.context_parallel(n, block_size=64).attention(q, k, v, "dala", **opts)

    assert ((out.double() - exact.to(dtype).double()).norm() / exact.norm()).item() < 1e-4


def test_errors_name_the_bad_argument():
    q = torch.randn(1, 2, 64, 8)
    with one_rank_group():
        cp = danon.context_parallel(64, block_size=16)
        with pytest.raises(ValueError, match="q must be this rank's 64 tokens"):
            cp.attention(q[:, :, :32], q, q, "msra", block_size=16)
        with pytest.raises(ValueError, match="block_size=32 must divide the layout's block_size=16"):
            cp.attention(q, q, q, "msra", block_size=32)
        with pytest.raises(ValueError, match=r"key_padding_mask must be \[B, 64\]"):
            cp.attention(q, q, q, "msra", block_size=16, key_padding_mask=torch.ones(1, 32, dtype=torch.bool))
        with pytest.raises(ValueError, match="past_queries"):
            cp.attention(q, q, q, "ucsa", block_size=16, causal=True, past_queries=q)
        with pytest.raises(TypeError, match="unexpected keyword argument 'windw'"):
            cp.attention(q, q, q, "msra", block_size=16, windw=3)
        with pytest.raises(ValueError, match="window must be an integer >= 0"):
            cp.attention(q, q, q, "msra", block_size=16, window=-1)


def test_context_parallel_needs_a_process_group():
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        danon.context_parallel(64)


def test_model_position_ids_equal_the_default_positions():
    torch.manual_seed(0)
    model = danon.create_msra_model(hidden_size=32, num_heads=2, num_layers=1, vocab_size=20, block_size=16,
                                    window=16)
    ids = torch.randint(0, 20, (1, 40))
    assert torch.equal(model(ids), model(ids, position_ids=torch.arange(40)))
    with pytest.raises(ValueError, match=r"position_ids must be an int64 tensor \[N\] = \[40\]"):
        model(ids, position_ids=torch.arange(39))
    with pytest.raises(ValueError, match="position_ids must lie in 0..max_sequence_length - 1"):
        model(ids, position_ids=torch.arange(40) + (1 << 20))


@pytest.mark.slow   # it needs the 4-rank spawn (about 55 s): -m slow, with the other 4-rank checks
@pytest.mark.parametrize("ranks", [4], indirect=True, ids=["4 ranks"])
def test_two_dimensional_mesh_with_tensor_parallel_shard(ranks):
    world, results = ranks
    got = results[0]["mesh_2d"]
    assert got["sharded"] > 0 and got["local_heads"] == 2            # danon.shard split the heads over "tp"
    assert got["param_rel"] < 1e-10, f"parameters after 3 steps differ by {got['param_rel']:.2e}"


def test_compiled_models_inside_with_cp():
    """torch.compile(backend="danon") inside `with cp:`: a factory model's danon layers graph-break into the
    context-parallel path and equal the eager model; an SDPA site the backend rewrote into danon::attention would
    attend over this rank's tokens alone, so the op refuses it with an error that says so."""
    torch.manual_seed(0)
    model = danon.create_msra_model(hidden_size=32, num_heads=2, num_layers=1, vocab_size=20, block_size=16,
                                    window=16).eval()

    class Sdpa(torch.nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    ids, q = torch.randint(0, 20, (1, 64)), torch.randn(1, 2, 64, 8)
    options = {"attention": "msra", "min_seq_len": 0, "block_size": 16, "window": 16}
    compiled = torch.compile(model, backend="danon", options=options)
    sdpa = torch.compile(Sdpa(), backend="danon", options=options)
    with torch.no_grad(), one_rank_group():
        sdpa(q)                                                 # outside the split: runs
        cp = danon.context_parallel(64, block_size=16)
        with cp:
            split = compiled(cp.shard(ids), position_ids=cp.positions())
            with pytest.raises(RuntimeError, match="not through the context-parallel path"):
                sdpa(cp.shard(q, 2))
        assert torch.allclose(split, model(ids), atol=1e-5)
