"""The quality benchmark's harness (bench/quality): task generators keep their invariants, and a
dense model trained by the harness learns a small instance, so a family that fails in the
benchmark fails on its own account, not the harness's."""
from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:   # bench/ is not an installed package
    sys.path.insert(0, ROOT)

from bench.quality import tasks as T  # noqa: E402
from bench.quality.models import FAMILIES, VARIANTS, build_model, coverage, parameter_counts  # noqa: E402
from bench.quality.train import RunSpec, evaluate, train_run, train_runs  # noqa: E402


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n,pairs", [(64, 4), (512, 8), (200, 3)])
def test_mqar_answers_come_only_from_the_pairs_at_the_start(n, pairs):
    x, y = T.mqar(6, n, num_pairs=pairs, generator=_gen(n))
    assert x.shape == y.shape == (6, n)
    for i in range(6):
        keys, vals = x[i, 0:2 * pairs:2], x[i, 1:2 * pairs:2]
        assert len(set(keys.tolist())) == pairs and all(int(k) in T.KEYS for k in keys)
        assert all(int(v) in T.VALUES for v in vals)
        table = dict(zip(keys.tolist(), vals.tolist()))
        pos = (y[i] != T.IGNORE).nonzero().flatten()
        assert len(pos) == pairs                                   # every key asked exactly once
        assert int(pos.min()) >= n // 2 and int(pos.max()) <= n - 2  # queries in the second half
        assert sorted(x[i, pos].tolist()) == sorted(keys.tolist())
        for p in pos.tolist():
            assert int(y[i, p]) == table[int(x[i, p])] == int(x[i, p + 1])
        # between the pairs and the queries: filler only, so no other copy of a key exists
        middle = x[i, 2 * pairs:n // 2]
        assert all(int(t) in T.FILLER for t in middle)


def test_needle_is_single_and_far_from_the_question():
    n = 256
    x, y = T.needle(64, n, generator=_gen(1))
    assert ((y != T.IGNORE).sum(-1) == 1).all() and (y[:, -2] == x[:, -1]).all()
    for i in range(64):
        where = (x[i, :-2] == x[i, -2]).nonzero().flatten()
        assert len(where) == 1                                    # the key occurs once before the question
        depth = int(where[0])
        assert depth < 3 * n // 4 - 2 and int(x[i, depth + 1]) == int(x[i, -1])
        assert (n - 2) - depth > n // 4                           # outside every window used here (64)
        others = torch.cat([x[i, :depth], x[i, depth + 2:-2]])
        assert all(int(t) in T.FILLER for t in others)


def test_local_copy_repeats_each_span_and_targets_the_copies():
    x, y = T.local_copy(3, 50, span=5, generator=_gen(2))
    for s in range(0, 50 - 10 + 1, 10):
        assert torch.equal(x[:, s:s + 5], x[:, s + 5:s + 10])
    mask = y != T.IGNORE
    pos = mask[0].nonzero().flatten()
    assert torch.equal(y[:, pos], x[:, pos + 1])
    assert all(((p + 1) // 5) % 2 == 1 for p in pos.tolist())
    assert torch.equal(y[:, pos], x[:, pos + 1 - 5])              # every answer is 5 tokens back


def test_generators_reject_bad_arguments():
    with pytest.raises(ValueError, match="num_pairs"):
        T.mqar(1, 512, num_pairs=0)
    with pytest.raises(ValueError, match="seq_len"):
        T.mqar(1, 16, num_pairs=8)
    with pytest.raises(ValueError, match="task must be one of"):
        T.make_batch("sort", 1, 64, _gen())


def test_families_match_in_size_and_are_sparse_at_512():
    counts = {f: parameter_counts(build_model(f, seed=0)) for f in FAMILIES}
    dense = counts["dense"]["total"]
    for f, c in counts.items():
        assert abs(c["total"] / dense - 1) < 0.05, (f, c, dense)
    for f in ("msra", "dala", "ucsa"):
        cov = coverage(f, 512)
        assert cov["exact"] < 0.6 and cov["keys_per_query"] < 512, (f, cov)


def test_variants_change_only_what_they_name():
    """A variant is its base family with one default changed: same weights from the same seed, except
    the changed slopes (dala-halfdecay), or the same weights and a plan that selects more at N = 2048."""
    import danon
    dala, half = build_model("dala", seed=3), build_model("dala-halfdecay", seed=3)
    for (name, a), (_, b) in zip(dala.named_parameters(), half.named_parameters()):
        if name.endswith("slopes"):
            assert torch.equal(b, torch.cat([torch.zeros(2), danon.alibi_slopes(2)])), name
            assert torch.equal(a, danon.alibi_slopes(4)), name
        else:
            assert torch.equal(a, b), name
    ucsa, scaled = build_model("ucsa", seed=3), build_model("ucsa-scaled", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(ucsa.parameters(), scaled.parameters()))
    assert coverage("ucsa-scaled", 2048)["exact"] > coverage("ucsa", 2048)["exact"]
    # causal: query block t selects ceil(0.1 (t + 1)) blocks, at N = 512 (32 blocks) at most UCSA's 4
    assert coverage("ucsa-scaled", 512)["exact"] < coverage("ucsa", 512)["exact"]
    assert not set(VARIANTS) & set(FAMILIES)   # the default grid never runs a variant
    with pytest.raises(ValueError, match="family must be one of"):
        build_model("dala-nodecay", seed=0)


@pytest.mark.slow   # about 14 s of training (bench/quality.py measures learning; -m slow runs this)
def test_dense_learns_a_small_copy_instance():
    """A few hundred steps on N = 32 (spans of 4): dense attention must get most answers right
    (chance is 1/64); an untrained model must not, so the check can fail."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors: one thread avoids contention on a shared machine
    saved = T.TASKS["copy"]
    T.TASKS["copy"] = functools.partial(T.local_copy, span=4)
    try:
        untrained = evaluate(build_model("dense", seed=0), "copy", 32, 4096, 64)["accuracy"]
        result = train_run(RunSpec(task="copy", family="dense", seq_len=32, seed=0, steps=300, lr=1e-2,
                                   tokens_per_step=512, warmup=20, eval_tokens=4096))
    finally:
        T.TASKS["copy"] = saved
        torch.set_num_threads(threads)
    assert untrained < 0.1
    assert result["accuracy"] > 0.8, result["accuracy"]
    assert result["losses"][-1] < 0.5 * result["losses"][0]


def _tiny(n, **kw):
    return RunSpec(**{**dict(task="copy", family="msra", seq_len=n, seed=0, steps=3, tokens_per_step=256,
                             eval_tokens=256, short_steps=4, short_len=32), **kw})


def test_runs_of_two_lengths_share_the_curriculum_and_continue_it_exactly():
    """Each run continues from a copy of the curriculum's model and optimizer: its losses equal one model
    trained straight through the same batches (no copy), and the two runs share the curriculum's losses."""
    from bench.quality import train as TR
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pair = train_runs([_tiny(64), _tiny(128)])
        spec = _tiny(128)
        torch.manual_seed(spec.seed)
        model = build_model(spec.family, seed=spec.seed)
        opt = TR._optimizer(model, spec)
        straight = []
        g = torch.Generator().manual_seed(7_000_000 + 1_000 * spec.seed + 100 * TR._TASK_IDS[spec.task])
        TR._train_steps(model, opt, spec, range(spec.short_steps), g, straight, None)
        g = torch.Generator().manual_seed(1_000 * spec.seed + 100 * TR._TASK_IDS[spec.task] + spec.seq_len)
        TR._train_steps(model, opt, spec, range(spec.short_steps, spec.total_steps), g, straight, None)
    finally:
        torch.set_num_threads(threads)
    assert pair[0]["losses"][:4] == pair[1]["losses"][:4]
    assert pair[0]["losses"][4:] != pair[1]["losses"][4:]          # different data at N
    assert pair[1]["losses"] == straight


def test_runs_that_differ_in_more_than_the_length_are_refused():
    with pytest.raises(ValueError, match="seed"):
        train_runs([_tiny(64), _tiny(128, seed=1)])


def test_report_has_a_column_per_family_and_variant_that_ran():
    from bench.quality.report import markdown
    runs = [{"task": "needle", "seq_len": 512, "family": f, "seed": s, "accuracy": a, "train_s": 1.0,
             "curriculum_s": 2.0, "eval_s": 0.5} for f, a0 in (("dala-halfdecay", 0.5), ("dala", 0.1)) for s, a in
            enumerate((a0, a0 + 0.1))]
    cov = {"exact": 0.5, "summary": 0.2, "skipped": 0.3, "keys_per_query": 100.0}
    meta = {"date": "today", "machine": "cpu", "command": "run.py", "wall_min": 1.0, "short_steps": 3, "short_len": 32,
            "steps": 2, "tokens_per_step": 64, "lr": 0.01, "warmup": 1, "eval_tokens": 64, "jobs": 1, "threads": 1,
            "seeds": [0, 1], "tasks": ["needle"], "png": "x.png", "shared_curriculum": True,
            "params": {"dala": {"total": 10, "trainable": 9}, "dala-halfdecay": {"total": 10, "trainable": 9}},
            "coverage": {("dala", 512): cov, ("dala-halfdecay", 512): cov}}
    text = markdown(runs, meta)
    assert "| task | N | dala | dala-halfdecay |" in text                    # base family first, then the variant
    assert "| needle | 512 | 0.150 ± 0.071 [0.10-0.20] | 0.550 ± 0.071 [0.50-0.60] |" in text
    assert VARIANTS["dala-halfdecay"]["what"] in text
