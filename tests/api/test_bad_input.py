"""Bad arguments raise ValueError (TypeError for wrong types) whose message names the offending
argument (DESIGN.md section 7, docs/api_contract.md)."""

import pytest
import torch

import danon

ERR = (ValueError, TypeError)
KINDS = ["exact", "ucsa", "msra", "dala"]
SPARSE = ["ucsa", "msra", "dala"]
WINDOW_ARG = {"ucsa": "local_window_size", "msra": "window", "dala": "window"}


def fn(kind):
    return getattr(danon, f"{kind}_attention")


def qkv(B=1, H=4, Hkv=2, N=64, D=8, Nk=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    Nk = N if Nk is None else Nk
    return (torch.randn(B, H, N, D, generator=g).to(dtype),
            torch.randn(B, Hkv, Nk, D, generator=g).to(dtype),
            torch.randn(B, Hkv, Nk, D, generator=g).to(dtype))


def kw_for(kind):
    return {} if kind == "exact" else {"block_size": 16}


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_wrong_rank(kind, which):
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v}
    args[which] = args[which][0]  # 3-D
    with pytest.raises(ERR, match=rf"\b{which}\b"):
        fn(kind)(args["q"], args["k"], args["v"], **kw_for(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_mismatched_batch(kind):
    q, k, v = qkv()
    with pytest.raises(ERR, match=r"\b[qkv]\b|batch"):
        fn(kind)(q, torch.cat([k, k]), torch.cat([v, v]), **kw_for(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_mismatched_head_dim(kind):
    q, k, v = qkv()
    with pytest.raises(ERR, match=r"\b[qkv]\b|head_dim|\bD\b"):
        fn(kind)(q, k[..., :4], v[..., :4], **kw_for(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_k_v_shape_mismatch(kind):
    q, k, v = qkv()
    with pytest.raises(ERR, match=r"\b[kv]\b"):
        fn(kind)(q, k, v[:, :1], **kw_for(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_heads_not_divisible(kind):
    q, k, v = qkv(H=4, Hkv=3)
    with pytest.raises(ERR, match=r"\b[qkv]\b|Hkv|head"):
        fn(kind)(q, k, v, **kw_for(kind))


@pytest.mark.parametrize("kind", SPARSE)
def test_sparse_needs_self_attention(kind):
    q, k, v = qkv(N=64, Nk=96)
    with pytest.raises(ERR, match=r"\b[qk]\b|Nq|Nk"):
        fn(kind)(q, k, v, block_size=16)


@pytest.mark.parametrize("kind", KINDS)
def test_key_padding_mask_wrong_shape(kind):
    q, k, v = qkv()
    with pytest.raises(ERR, match="key_padding_mask"):
        fn(kind)(q, k, v, key_padding_mask=torch.ones(1, 63, dtype=torch.bool), **kw_for(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_integer_inputs(kind):
    q, k, v = qkv()
    with pytest.raises(ERR, match=r"\bq\b|dtype"):
        fn(kind)(q.long(), k.long(), v.long(), **kw_for(kind))


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("kind", SPARSE)
@pytest.mark.parametrize("bs", [48, 24, 8, 0, -16])
def test_block_size(kind, bs):
    q, k, v = qkv()
    with pytest.raises(ERR, match="block_size"):
        fn(kind)(q, k, v, block_size=bs)


@pytest.mark.parametrize("kind", SPARSE)
def test_negative_window(kind):
    q, k, v = qkv()
    name = WINDOW_ARG[kind]
    with pytest.raises(ERR, match=name):
        fn(kind)(q, k, v, block_size=16, **{name: -1})


@pytest.mark.parametrize("kind", ["banana", "Exact_", "", "flash"])
def test_bad_kind(kind):
    q, k, v = qkv()
    with pytest.raises(ERR, match="kind"):
        danon.attention(q, k, v, kind=kind)


def test_bad_kind_in_plan():
    q, k, v = qkv()
    with pytest.raises(ERR, match="kind"):
        danon.attention_plan(q, k, kind="banana")


@pytest.mark.parametrize("decay", ["linear", "exponential", ""])
def test_bad_decay(decay):
    q, k, v = qkv()
    with pytest.raises(ERR, match="decay"):
        danon.dala_attention(q, k, v, block_size=16, decay=decay)


def test_bad_slopes_shape():
    q, k, v = qkv(H=4)
    with pytest.raises(ERR, match="slopes"):
        danon.dala_attention(q, k, v, block_size=16, slopes=torch.ones(3))


def test_bad_importance_shape():
    q, k, v = qkv(Hkv=2)
    with pytest.raises(ERR, match="importance"):
        danon.dala_attention(q, k, v, block_size=16, importance=torch.ones(1, 1, 64))


def test_negative_memory_size():
    q, k, v = qkv()
    with pytest.raises(ERR, match="memory_size"):
        danon.dala_attention(q, k, v, block_size=16, memory_size=-1)


@pytest.mark.parametrize("levels", [-1, "many", 1.5])
def test_bad_num_levels(levels):
    q, k, v = qkv()
    with pytest.raises(ERR, match="num_levels"):
        danon.msra_attention(q, k, v, block_size=16, num_levels=levels)


@pytest.mark.parametrize("c", [0, -2])
def test_bad_compression_factor(c):
    q, k, v = qkv()
    with pytest.raises(ERR, match="compression_factor"):
        danon.msra_attention(q, k, v, block_size=16, compression_factor=c)


def test_negative_top_k_blocks():
    q, k, v = qkv()
    with pytest.raises(ERR, match="top_k_blocks"):
        danon.ucsa_attention(q, k, v, block_size=16, top_k_blocks=-1)


@pytest.mark.parametrize("sf", [-0.5])
def test_bad_sparsity_factor(sf):
    q, k, v = qkv()
    with pytest.raises(ERR, match="sparsity_factor"):
        danon.ucsa_attention(q, k, v, block_size=16, sparsity_factor=sf)


def test_negative_global_tokens():
    q, k, v = qkv()
    with pytest.raises(ERR, match="global_tokens"):
        danon.ucsa_attention(q, k, v, block_size=16, global_tokens=-16)


def test_exact_attn_mask_not_broadcastable():
    q, k, v = qkv(N=64)
    with pytest.raises(ERR, match="attn_mask"):
        danon.exact_attention(q, k, v, attn_mask=torch.ones(64, 63, dtype=torch.bool))
