"""danon.models: factories, the language model, training, performance monitoring."""
import math

import pytest
import torch
import torch.nn.functional as F

from danon.config import DALAConfig, DenseConfig, MSRAConfig, SuperHybridConfig, UCSAConfig
from danon.models import (
    DanonLanguageModel,
    create_dala_model,
    create_dense_model,
    create_model,
    create_msra_model,
    create_super_hybrid_model,
    create_ucsa_model,
    sinusoidal_position_encoding,
)
from danon.monitoring import PerformanceMonitor, attention_layers
from danon.nn import DALAAttention, HybridAttention, MSRAAttention, SelfAttention, UCSAAttention

VOCAB = 97
SMALL = dict(hidden_size=32, num_heads=4, num_kv_heads=2, num_layers=2, vocab_size=VOCAB, block_size=16)
FAMILY_KW = {
    "dense": {},
    "msra": dict(window=16, num_levels=2),
    "dala": dict(window=16, memory_size=8),
    "ucsa": dict(local_window_size=16, global_tokens=16, top_k_blocks=1),
    "hybrid": dict(window=16, num_levels=2, memory_size=8, local_window_size=16, global_tokens=16, top_k_blocks=1),
}
FACTORIES = {
    "dense": (create_dense_model, DenseConfig, SelfAttention),
    "msra": (create_msra_model, MSRAConfig, MSRAAttention),
    "dala": (create_dala_model, DALAConfig, DALAAttention),
    "ucsa": (create_ucsa_model, UCSAConfig, UCSAAttention),
    "hybrid": (create_super_hybrid_model, SuperHybridConfig, HybridAttention),
}
FAMILIES = list(FACTORIES)


def small_kw(family, **extra):
    kw = dict(SMALL, **FAMILY_KW[family], **extra)
    if family == "dense":
        kw.pop("block_size")
    return kw


def build(family, **extra):
    torch.manual_seed(0)
    factory, _, _ = FACTORIES[family]
    return factory(**small_kw(family, **extra))


def token_ids(batch=2, n=100, seed=0):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_factory_from_config_and_keywords(family):
    factory, config_cls, attn_cls = FACTORIES[family]
    cfg = config_cls(**small_kw(family))
    torch.manual_seed(0)
    from_cfg = factory(cfg)
    torch.manual_seed(0)
    from_kw = factory(**small_kw(family))
    assert from_cfg.config == from_kw.config == cfg
    assert isinstance(from_cfg, DanonLanguageModel) and from_cfg.family == config_cls.family
    assert len(from_cfg.layers) == 2
    assert all(isinstance(layer.attention, attn_cls) for layer in from_cfg.layers)
    for (n1, p1), (n2, p2) in zip(from_cfg.state_dict().items(), from_kw.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    # a config plus keyword overrides, and a dict
    assert factory(cfg, num_layers=1).config.num_layers == 1
    assert factory(cfg.to_dict()).config == cfg
    assert create_model(cfg, num_layers=3).config.num_layers == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_shape_and_mask(family):
    model = build(family).eval()
    ids = token_ids()
    mask = torch.ones_like(ids)
    mask[1, 80:] = 0
    with torch.no_grad():
        logits = model(ids, mask)
        assert logits.shape == (2, 100, VOCAB)
        assert torch.isfinite(logits).all()
        assert torch.equal(model(ids), model(ids, torch.ones_like(ids)))


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_by_default_and_encoder_option(family):
    ids = token_ids(batch=1, n=90)
    changed = ids.clone()
    changed[0, 60:] = (changed[0, 60:] + 1) % VOCAB
    model = build(family).eval()
    assert model.config.causal
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :60], b[:, :60], atol=1e-5)  # the future does not leak
    assert not torch.allclose(a[:, 60:], b[:, 60:])
    encoder = build(family, causal=False).eval()
    assert all(not layer.attention.causal for layer in encoder.layers)
    with torch.no_grad():
        a, b = encoder(ids), encoder(changed)
    assert not torch.allclose(a[:, :60], b[:, :60], atol=1e-5)  # an encoder sees every token


def test_seed_readme_quick_start():
    torch.manual_seed(0)
    model = create_msra_model(hidden_size=64, num_heads=4, num_levels=3, num_layers=1, vocab_size=300,
                              window=32, block_size=16)
    input_ids = torch.randint(0, 300, (1, 200))
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        output = model(input_ids, attention_mask)
    assert output.shape == (1, 200, 300)


def test_factory_errors():
    with pytest.raises(TypeError, match=r"create_msra_model: config must be a MSRAConfig"):
        create_msra_model(DALAConfig())
    with pytest.raises(ValueError, match="calibration_factor"):
        create_msra_model(hidden_size=64, calibration_factor=0.1)
    with pytest.raises(ValueError, match="num_layers"):
        create_dense_model(num_layers=0)
    with pytest.raises(TypeError, match="config must be"):
        DanonLanguageModel({"hidden_size": 64})
    model = build("dense", max_sequence_length=50)
    with pytest.raises(ValueError, match="max_sequence_length=50"):
        model(token_ids(n=51))
    with pytest.raises(ValueError, match=r"input_ids must have shape \[B, N\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor of shape \[B, N\] = \[2, 10\]"):
        model(token_ids(n=10), torch.ones(2, 9))


def test_sinusoidal_position_encoding():
    pe = sinusoidal_position_encoding(50, 32)
    pos, i = 7, 5
    assert math.isclose(pe[pos, 2 * i].item(), math.sin(pos / 10000 ** (2 * i / 32)), rel_tol=1e-6)
    assert math.isclose(pe[pos, 2 * i + 1].item(), math.cos(pos / 10000 ** (2 * i / 32)), rel_tol=1e-6)
    assert sinusoidal_position_encoding(3, 5).shape == (3, 5)
    with pytest.raises(ValueError, match="dim must be an int >= 1"):
        sinusoidal_position_encoding(3, 0)


def test_weights_tied_and_initialised():
    model = build("dense")
    assert model.lm_head.weight is model.embed_tokens.weight
    assert abs(model.embed_tokens.weight.std().item() - 0.02) < 0.005
    untied = build("dense", tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.embed_tokens.weight


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_decreases_loss(family):
    model = build(family, num_layers=1)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = token_ids(batch=2, n=64, seed=1)
    losses = []
    for _ in range(6):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = token_ids(batch=1, n=64)
    grads = []
    for ckpt in (False, True):
        model = build("msra", gradient_checkpointing=ckpt).train()
        model(ids).logsumexp(-1).sum().backward()
        grads.append(model.layers[0].attention.q_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def _check_shares(row):
    for key in ("exact", "summary", "skipped"):
        assert 0.0 <= row[key] <= 1.0 + 1e-9
    assert abs(row["exact"] + row["summary"] + row["skipped"] - 1.0) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_performance_monitor(family):
    model = build(family).eval()
    empty = model.get_performance_stats()
    assert empty["computation_time"] == 0.0 and empty["attention_distribution"] == []
    ids = token_ids(batch=1, n=256)
    with torch.no_grad():
        model(ids)  # not monitored: nothing recorded
    assert all(layer.last_coverage is None and not layer.record_coverage for _, layer in attention_layers(model))
    with torch.no_grad(), model.performance_monitor() as monitor:
        model(ids)
        model(ids)
    assert isinstance(monitor, PerformanceMonitor)
    stats = model.get_performance_stats()
    assert set(stats) >= {"computation_time", "memory_usage", "attention_distribution"}
    assert stats["num_forward_calls"] == 2
    assert 0 < stats["computation_time"] < 60
    assert isinstance(stats["memory_usage"], int) and stats["memory_usage"] > 0
    assert "profiler" in stats["memory_measure"]
    dist = stats["attention_distribution"]
    assert [row["layer"] for row in dist] == [0, 1]
    assert [row["module"] for row in dist] == ["layers.0.attention", "layers.1.attention"]
    for row in dist:
        assert row["kind"] == model.family
        _check_shares(row)
        if family == "dense":
            assert row["exact"] == 1.0
        else:
            assert row["exact"] < 1.0  # N = 256 with 16-token windows: most keys are summarised
    if family == "hybrid":
        for row in dist:
            assert set(row["families"]) == {"msra", "dala", "ucsa"}
            for sub in row["families"].values():
                _check_shares(sub)
            assert abs(sum(row["gate"].values()) - 1) < 1e-6
    # monitoring is off again afterwards
    assert all(not layer.record_coverage for _, layer in attention_layers(model))


def test_monitor_options_and_restart():
    model = build("ucsa", num_layers=1).eval()
    ids = token_ids(batch=1, n=128)
    with torch.no_grad(), model.performance_monitor(track_memory=False, track_attention=False):
        model(ids)
    stats = model.get_performance_stats()
    assert stats["memory_usage"] is None and stats["attention_distribution"] == []
    assert stats["num_forward_calls"] == 1
    with torch.no_grad(), model.performance_monitor(track_computation=False):
        model(ids)
    stats = model.get_performance_stats()
    assert stats["computation_time"] == 0.0 and stats["num_forward_calls"] == 0
    assert len(stats["attention_distribution"]) == 1 and stats["memory_usage"] > 0
    with pytest.raises(ValueError, match="track_memory must be True or False"):
        PerformanceMonitor(model, track_memory="yes")


def test_kept_position_table_equals_the_encoding_within_and_beyond_its_length(monkeypatch):
    import danon.models as models
    monkeypatch.setattr(models, "POSITION_TABLE_ELEMENTS", 32 * 40)          # 40 positions at hidden 32
    torch.manual_seed(0)
    model = create_dense_model(hidden_size=32, num_heads=2, num_layers=1, vocab_size=50).eval()
    assert model.position_table.shape == (40, 32)
    assert "position_table" not in model.state_dict()
    seen = []
    model.embed_dropout.register_forward_hook(lambda m, args, out: seen.append(out))
    for n in (40, 57):                                                       # from the table / computed
        ids = torch.randint(0, 50, (1, n))
        with torch.no_grad():
            model(ids)
        expected = model.embed_tokens(ids) + models.sinusoidal_position_encoding(n, 32)
        torch.testing.assert_close(seen[-1], expected, rtol=0, atol=0)


def test_dala_training_step_with_a_sparse_plan_and_learnable_slopes():
    # The projections hand the op non-contiguous [B, H, N, D] views; N a multiple of the block size
    # means no padding copy, so the executor's backward must read those views as they are.
    torch.manual_seed(0)
    model = create_dala_model(vocab_size=VOCAB, hidden_size=32, num_heads=2, num_layers=1,
                              block_size=16, window=32, memory_size=8, decay="alibi")
    model.train()
    ids = token_ids(batch=2, n=129, seed=3)
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    slopes = [p for name, p in model.named_parameters() if name.endswith("slopes")]
    assert slopes and all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                          for p in slopes)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
