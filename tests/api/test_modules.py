"""danon.nn: attention layers (shapes, gradients, the dense limit, padding, errors)."""
import pytest
import torch

from danon.config import DALAConfig, DenseConfig, MSRAConfig, SuperHybridConfig, UCSAConfig
from danon.nn import (
    DALAAttention,
    HybridAttention,
    MSRAAttention,
    SelfAttention,
    UCSAAttention,
    alibi_slopes,
    attention_class_for,
)

HIDDEN, HEADS, KV_HEADS, N, BS = 64, 4, 2, 150, 16

# Small windows: the sparse machinery (summaries, routing, top-k) is active at N = 150.
SPARSE_KW = {
    MSRAAttention: dict(window=16, num_levels=2, compression_factor=2, block_size=BS),
    DALAAttention: dict(window=16, memory_size=8, block_size=BS),
    UCSAAttention: dict(local_window_size=16, global_tokens=16, top_k_blocks=2, block_size=BS),
    HybridAttention: dict(window=16, num_levels=2, compression_factor=2, memory_size=8, local_window_size=16,
                          global_tokens=16, top_k_blocks=2, block_size=BS),
}
# Windows covering the whole sequence: every family is exact attention.
DENSE_LIMIT_KW = {
    MSRAAttention: dict(window=N, block_size=BS),
    DALAAttention: dict(window=N, memory_size=0, decay="none", block_size=BS),
    UCSAAttention: dict(local_window_size=N, global_tokens=0, top_k_blocks=0, block_size=BS),
    HybridAttention: dict(window=N, memory_size=0, decay="none", local_window_size=N, global_tokens=0,
                          top_k_blocks=0, block_size=BS),
}
FAMILIES = list(SPARSE_KW)
ALL_LAYERS = [SelfAttention] + FAMILIES


def make(cls, causal=False, kw=None, num_kv_heads=KV_HEADS):
    kw = (SPARSE_KW.get(cls, {}) if kw is None else kw)
    return cls(HIDDEN, HEADS, num_kv_heads, causal=causal, **kw)


def inputs(seed=0, batch=2, n=N):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, HIDDEN, generator=g)


def padding_mask(batch=2, n=N, lengths=(N, 101)):
    mask = torch.zeros(batch, n, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, :length] = 1
    return mask


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def copy_projections(src, dst):
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(dst, name).load_state_dict(getattr(src, name).state_dict())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cls", ALL_LAYERS)
def test_shape_forward_backward_finite(cls, causal):
    torch.manual_seed(0)
    layer = make(cls, causal)
    x = inputs().requires_grad_(True)
    mask = padding_mask()
    out = layer(x, mask)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        grad = getattr(layer, name).weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_dala_router_slopes_and_gradients():
    torch.manual_seed(0)
    layer = make(DALAAttention, causal=True)
    assert torch.allclose(layer.slopes.detach(), torch.tensor([2.0 ** (-8 * (h + 1) / HEADS) for h in range(HEADS)]))
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** (-(h + 1)) for h in range(8)]))
    x = inputs()
    imp = layer.importance(x)
    assert imp.shape == (2, KV_HEADS, N) and not imp.requires_grad
    layer(x).sum().backward()
    assert layer.slopes.grad is not None and torch.isfinite(layer.slopes.grad).all()
    assert layer.slopes.grad.abs().sum() > 0  # learnable decay
    # Top-k routing is a selection: no gradient reaches the router (documented).
    assert all(p.grad is None for p in layer.router.parameters())
    assert DALAAttention(HIDDEN, HEADS, decay="none", block_size=BS).slopes is None


def test_hybrid_gate():
    torch.manual_seed(0)
    layer = make(HybridAttention, causal=True)
    gate = layer.gate()
    assert gate.shape == (HEADS, 3)
    assert torch.allclose(gate.sum(-1), torch.ones(HEADS))
    assert torch.allclose(gate, torch.full((HEADS, 3), 1 / 3))
    layer(inputs()).square().sum().backward()
    assert layer.beta.grad is not None and torch.isfinite(layer.beta.grad).all() and layer.beta.grad.abs().sum() > 0
    sharp = HybridAttention(HIDDEN, HEADS, router_temperature=0.01, block_size=BS)
    with torch.no_grad():
        sharp.beta.copy_(torch.tensor([[1.0, 0.0, 0.0]] * HEADS))
    assert torch.allclose(sharp.gate()[:, 0], torch.ones(HEADS))


@pytest.mark.parametrize("num_kv_heads", [KV_HEADS, HEADS])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cls", FAMILIES)
def test_large_windows_equal_dense_self_attention(cls, causal, num_kv_heads):
    torch.manual_seed(1)
    dense = SelfAttention(HIDDEN, HEADS, num_kv_heads, causal=causal)
    layer = cls(HIDDEN, HEADS, num_kv_heads, causal=causal, **DENSE_LIMIT_KW[cls])
    copy_projections(dense, layer)
    x, mask = inputs(seed=2), padding_mask()
    with torch.no_grad():
        assert rel_err(layer(x), dense(x)) < 1e-5
        got, ref = layer(x, mask), dense(x, mask)
    keep = mask.bool()
    assert rel_err(got[keep], ref[keep]) < 1e-5


def test_dense_self_attention_matches_a_reference_and_handles_empty_rows():
    torch.manual_seed(0)
    layer = SelfAttention(HIDDEN, HEADS, KV_HEADS, causal=True)
    x = inputs(n=40)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :5] = False  # left padding: causal rows 0..4 of batch 1 see no key
    with torch.no_grad():
        out = layer(x, mask)
        b, n, _ = x.shape
        q = layer.q_proj(x).view(b, n, HEADS, -1).transpose(1, 2).double()
        k = layer.k_proj(x).view(b, n, KV_HEADS, -1).transpose(1, 2).double().repeat_interleave(2, 1)
        v = layer.v_proj(x).view(b, n, KV_HEADS, -1).transpose(1, 2).double().repeat_interleave(2, 1)
        s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        vis = mask[:, None, None, :] & torch.ones(n, n, dtype=torch.bool).tril()
        p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
        ref = layer.o_proj((p @ v).transpose(1, 2).reshape(b, n, -1).float())
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-5
    # rows without a visible key: attention output 0, so the layer returns o_proj's bias (None here) -> 0
    assert out[1, :5].abs().max() == 0


@pytest.mark.parametrize("cls", ALL_LAYERS)
def test_padding_content_does_not_leak(cls):
    """causal=False: outputs at real positions ignore what the padded positions hold."""
    torch.manual_seed(3)
    kw = dict(SPARSE_KW.get(cls, {}))
    if cls in (UCSAAttention, HybridAttention):
        # UCSA scores blocks with the mean query of *every* position of the query block
        # (DESIGN.md section 3), padding included; see test_ucsa_selection_with_padding below.
        kw["top_k_blocks"] = 64
    layer = make(cls, causal=False, kw=kw)
    mask = padding_mask(lengths=(123, 101))
    x1 = inputs(seed=4)
    x2 = torch.where(mask.bool()[..., None], x1, 5 * inputs(seed=5))
    with torch.no_grad():
        o1, o2 = layer(x1, mask), layer(x2, mask)
    keep = mask.bool()
    assert torch.allclose(o1[keep], o2[keep], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(o1[~keep], o2[~keep])  # the padded rows themselves did change


@pytest.mark.parametrize("cls", [SelfAttention, MSRAAttention])
def test_attention_mask_dtypes_agree(cls):
    torch.manual_seed(0)
    layer = make(cls, causal=True)
    x, mask = inputs(), padding_mask()
    with torch.no_grad():
        ref = layer(x, mask.bool())
        assert torch.equal(layer(x, mask), ref)
        assert torch.equal(layer(x, mask.float()), ref)
        assert torch.equal(layer(x, torch.ones_like(mask)), layer(x))


@pytest.mark.parametrize(
    "cls, config",
    [
        (SelfAttention, DenseConfig(hidden_size=HIDDEN, num_heads=HEADS, num_kv_heads=KV_HEADS)),
        (MSRAAttention, MSRAConfig(hidden_size=HIDDEN, num_heads=HEADS, window=32, num_levels="auto", block_size=BS)),
        (DALAAttention, DALAConfig(hidden_size=HIDDEN, num_heads=HEADS, window=32, memory_size=4, block_size=BS,
                                   router_hidden_size=24)),
        (UCSAAttention, UCSAConfig(hidden_size=HIDDEN, num_heads=HEADS, sparsity_factor=0.25, block_size=BS,
                                   attention_dropout=0.1, bias=True)),
        (HybridAttention, SuperHybridConfig(hidden_size=HIDDEN, num_heads=HEADS, router_temperature=0.5,
                                            block_size=BS)),
    ],
)
def test_from_config(cls, config):
    layer = cls.from_config(config)
    assert attention_class_for(config) is cls
    assert (layer.num_heads, layer.num_kv_heads, layer.causal) == (config.num_heads, config.kv_heads, config.causal)
    assert layer.dropout.p == config.attention_dropout
    assert (layer.q_proj.bias is not None) == config.bias
    if cls is DALAAttention:
        assert layer.router.fc1.out_features == 24
    if cls is HybridAttention:
        assert layer.router_temperature == 0.5
    layer.eval()
    with torch.no_grad():
        assert layer(inputs(n=70)).shape == (2, 70, HIDDEN)


def test_from_config_wrong_type():
    with pytest.raises(TypeError, match="MSRAConfig"):
        MSRAAttention.from_config(UCSAConfig())
    with pytest.raises(TypeError, match="SuperHybridConfig"):
        HybridAttention.from_config(MSRAConfig())


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match=r"MSRAAttention: window must be an int >= 0, got -1"):
        MSRAAttention(HIDDEN, HEADS, window=-1)
    with pytest.raises(ValueError, match=r"block_size must be a power of two >= 16"):
        UCSAAttention(HIDDEN, HEADS, block_size=24)
    with pytest.raises(ValueError, match=r"decay must be one of"):
        DALAAttention(HIDDEN, HEADS, decay="linear")
    with pytest.raises(ValueError, match=r"hidden_size \(64\) must be divisible by num_heads \(5\)"):
        SelfAttention(HIDDEN, 5)
    with pytest.raises(ValueError, match=r"num_kv_heads \(3\) must divide num_heads \(4\)"):
        SelfAttention(HIDDEN, HEADS, 3)
    layer = make(MSRAAttention)
    with pytest.raises(ValueError, match=r"hidden_states must have shape \[B, N, hidden_size=64\]"):
        layer(torch.randn(2, 10, 32))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, N\] = \[2, 10\]"):
        layer(torch.randn(2, 10, HIDDEN), torch.ones(2, 11))
    with pytest.raises(TypeError, match="attention_mask"):
        layer(torch.randn(2, 10, HIDDEN), [[1] * 10] * 2)


@pytest.mark.parametrize("cls", ALL_LAYERS)
def test_no_coverage_recorded_unless_monitoring(cls):
    layer = make(cls)
    with torch.no_grad():
        layer(inputs(n=40))
    assert layer.record_coverage is False and layer.last_coverage is None
    layer.record_coverage = True
    with torch.no_grad():
        layer(inputs(n=40))
    cov = layer.last_coverage
    assert cov["kind"] == cls.kind
    assert abs(cov["exact"] + cov["summary"] + cov["skipped"] - 1) < 1e-6
