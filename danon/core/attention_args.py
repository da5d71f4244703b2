"""The arguments of `danon::attention` and its backward, written once (DESIGN.md section 2).

`ARGUMENTS` is the only place the op's argument list is written: the op's schema, its backward's
schema, the named tuples every executor unpacks (`AttentionArgs`, `BackwardArgs`) and the plan
tensors' positions that graph passes look up (`PLAN_TENSORS`) are all derived from it.

Example:
    >>> import torch
    >>> from danon.core.attention_args import attention_args, AttentionArgs
    >>> q = torch.randn(1, 2, 32, 8)
    >>> a = attention_args(q, q, q, scale=0.3, causal=True, block_size=16)
    >>> a.window, a.band, len(a) == len(AttentionArgs._fields)
    (-1, -1, True)
"""
from __future__ import annotations

from collections import namedtuple
from typing import Optional

from torch import Tensor

# (name, schema type) of every argument of danon::attention, in order
ARGUMENTS = (
    ("q", "Tensor"), ("k", "Tensor"), ("v", "Tensor"),
    # the plan's tensors (danon/core/plan.py Plan): which key blocks, tokens and summaries each query block sees
    ("block_idx", "Tensor?"), ("token_idx", "Tensor?"), ("summary_idx", "Tensor?"), ("summary_k", "Tensor?"),
    ("summary_v", "Tensor?"), ("summary_count", "Tensor?"), ("summary_pos", "Tensor?"),
    ("key_padding_mask", "Tensor?"), ("attn_mask", "Tensor?"), ("slopes", "Tensor?"),
    ("scale", "float"), ("causal", "bool"), ("block_size", "SymInt"), ("window", "SymInt"), ("band", "SymInt"),
    ("softcap", "float?"),
)
# what the backward takes besides the forward's arguments: before them the output's gradients and the
# forward's results, after them which optional gradients are wanted
BACKWARD_LEADING = (("grad_out", "Tensor"), ("grad_lse", "Tensor"), ("out", "Tensor"), ("lse", "Tensor"))
BACKWARD_TRAILING = (("need_summary_grad", "bool"), ("need_mask_grad", "bool"), ("need_slopes_grad", "bool"))
GRADIENTS = ("q", "k", "v", "summary_k", "summary_v", "attn_mask", "slopes")   # the backward's outputs, in order

AttentionArgs = namedtuple("AttentionArgs", [name for name, _ in ARGUMENTS])
BackwardArgs = namedtuple("BackwardArgs", [name for name, _ in BACKWARD_LEADING + BACKWARD_TRAILING])
PLAN_TENSORS = AttentionArgs._fields[AttentionArgs._fields.index("block_idx"):
                                     AttentionArgs._fields.index("summary_pos") + 1]


def _schema(arguments, outputs: int) -> str:
    return "(" + ", ".join(f"{kind} {name}" for name, kind in arguments) + ") -> (" + \
        ", ".join(["Tensor"] * outputs) + ")"


FORWARD_SCHEMA = _schema(ARGUMENTS, 2)
BACKWARD_SCHEMA = _schema(BACKWARD_LEADING + ARGUMENTS + BACKWARD_TRAILING, len(GRADIENTS))


def split_backward(args: tuple):
    """(BackwardArgs, AttentionArgs) from the backward op's flat arguments."""
    lead, n = len(BACKWARD_LEADING), len(ARGUMENTS)
    return BackwardArgs(*args[:lead], *args[lead + n:]), AttentionArgs(*args[lead:lead + n])


def backward_call(g: BackwardArgs, a: AttentionArgs) -> tuple:
    """The backward op's flat arguments from its two parts (the inverse of `split_backward`)."""
    lead = len(BACKWARD_LEADING)
    return (*g[:lead], *a, *g[lead:])


def attention_args(q: Tensor, k: Tensor, v: Tensor, plan=None, *, scale: float, causal: Optional[bool] = None,
                   block_size: Optional[int] = None, key_padding_mask: Optional[Tensor] = None,
                   attn_mask: Optional[Tensor] = None, slopes: Optional[Tensor] = None,
                   softcap: Optional[float] = None) -> AttentionArgs:
    """The op's arguments for `plan` (a Plan; None: the dense plan), with Python scalars.

    causal and block_size default to the plan's (without a plan: not causal, blocks of 64); slopes to the
    plan's ALiBi slopes. A causal value that contradicts the plan is an error: the plan was built for one
    masking.
    """
    if plan is not None and causal is not None and bool(causal) != bool(plan.causal):
        raise ValueError(f"causal={causal} contradicts the plan, which was built with causal={plan.causal}: "
                         f"build the plan with the masking you run it with (or pass causal=None)")
    tensors = {name: None if plan is None else getattr(plan, name) for name in PLAN_TENSORS}
    window = None if plan is None else plan.window
    band = None if plan is None else plan.band
    return AttentionArgs(
        q=q, k=k, v=v, **tensors, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
        slopes=slopes if slopes is not None or plan is None else plan.slopes, scale=float(scale),
        causal=bool(plan.causal if plan is not None else causal),
        block_size=int(plan.block_size if plan is not None else (block_size or 64)),
        window=-1 if window is None else int(window), band=-1 if band is None else int(band),
        softcap=None if softcap is None else float(softcap))
