"""Pictures of attention: which key blocks each query block sees (plans), and real attention weights.

A plan picture is a grid of query blocks (rows) by key blocks (columns), each cell coloured by how
the plan treats that block for that query block: exact (near window, or the dense plan), selected
(listed exact blocks: UCSA's global and top-k blocks, DALA's routed tokens), summary (seen through
a mean key/value), skipped (visible but not attended), or masked (future keys under causal masking).

Example:
    >>> import torch, danon
    >>> q = torch.randn(1, 1, 256, 8)
    >>> plan = danon.attention_plan(q, q, kind="ucsa", causal=True, block_size=32, local_window_size=32,
    ...                             global_tokens=32, top_k_blocks=1)
    >>> grid = plan_grid(plan)
    >>> tuple(grid.shape), CATEGORIES[int(grid[7, 0])], CATEGORIES[int(grid[0, 7])]
    ((8, 8), 'selected', 'masked')
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Optional

import torch

from danon.core import Plan
from danon.core.torch_internals import dynamo_reset

__all__ = ["CATEGORIES", "COLORS", "plan_grid", "plot_plan", "capture_plans", "AttentionVisualizer"]

CATEGORIES = ("masked", "skipped", "summary", "selected", "exact")   # later ones win where a block is both
COLORS = ("#ffffff", "#d9d9d9", "#f4a742", "#4c9be8", "#1f4e9c")


def _summary_blocks(plan: Plan, b: int, h: int, compression_factor: int) -> Dict[int, List[int]]:
    """summary row -> the key blocks it averages (family specific: the plan keeps only the row index)."""
    tk = plan.num_key_blocks
    rows = plan.summary_count.shape[-1]
    if plan.kind == "ucsa":       # one summary per key block
        return {s: [s] for s in range(rows)}
    if plan.kind == "msra":       # level l holds ceil(Tk / c^l) spans of c^l blocks, levels stacked in order
        for c in dict.fromkeys([compression_factor, 2, 3, 4, 5, 6, 7, 8]):
            sizes, n = [], tk
            while sum(sizes) < rows:
                sizes.append(n)
                n = -(-n // c)
            if sum(sizes) == rows:
                out, offset = {}, 0
                for level, size in enumerate(sizes):
                    for s in range(size):
                        out[offset + s] = list(range(s * c ** level, min(tk, (s + 1) * c ** level)))
                    offset += size
                return out
        raise ValueError(f"cannot map the MSRA plan's {rows} summaries onto {tk} key blocks; pass compression_factor")
    return {}


def plan_grid(plan: Plan, batch: int = 0, kv_head: int = 0, compression_factor: int = 4) -> torch.Tensor:
    """[Tq, Tk] int tensor of indices into CATEGORIES for one (batch, kv head) of a plan.

    DALA's summary is "every other visible key" (one per query block), so its summary cells are the
    visible blocks that are neither exact nor selected. Example: see the module docstring.
    """
    tq, tk, bs = plan.num_query_blocks, plan.num_key_blocks, plan.block_size
    cat = {name: i for i, name in enumerate(CATEGORIES)}
    t_q = torch.arange(tq)[:, None]
    t_k = torch.arange(tk)[None, :]
    visible = (t_k <= t_q) if plan.causal else torch.ones(tq, tk, dtype=torch.bool)
    grid = torch.where(visible, cat["skipped"], cat["masked"])

    def mark(mask: torch.Tensor, name: str) -> None:
        nonlocal grid
        grid = torch.where(mask & visible & (grid < cat[name]), cat[name], grid)

    if plan.is_dense:
        mark(torch.ones(tq, tk, dtype=torch.bool), "exact")
        return grid
    if plan.window is not None:
        d = t_q - t_k
        mark((d >= 0) & (d <= plan.window) if plan.causal else d.abs() <= plan.window, "exact")
    if plan.band is not None:   # the exact family's sliding window: blocks the band touches
        d = (t_q - t_k).abs() * bs
        mark(d < plan.band + bs, "exact")
    if plan.summary_idx is not None and plan.kind == "dala":
        has = (plan.summary_idx[batch, kv_head, :, 0] >= 0)[:, None]
        mark(has.expand(tq, tk), "summary")
    elif plan.summary_idx is not None:
        rows = _summary_blocks(plan, batch, kv_head, compression_factor)
        summary = torch.zeros(tq, tk, dtype=torch.bool)
        for i, idx in enumerate(plan.summary_idx[batch, kv_head].tolist()):
            for s in idx:
                if s >= 0:
                    summary[i, rows[s]] = True
        mark(summary, "summary")
    selected = torch.zeros(tq, tk, dtype=torch.bool)
    if plan.block_idx is not None:
        for i, idx in enumerate(plan.block_idx[batch, kv_head].tolist()):
            selected[i, [j for j in idx if j >= 0]] = True
    if plan.token_idx is not None:
        for i, idx in enumerate(plan.token_idx[batch, kv_head].tolist()):
            selected[i, [j // bs for j in idx if j >= 0]] = True
    mark(selected, "selected")   # mark() only raises a cell's category, so the order of the marks is free
    return grid


def plot_plan(plan: Plan, path: str, title: str = "", batch: int = 0, kv_head: int = 0,
              compression_factor: int = 4) -> str:
    """Write the plan picture of one (batch, kv head) to `path` (PNG); returns the path.

    Example:
        >>> import tempfile, torch, danon
        >>> q = torch.randn(1, 1, 128, 8)
        >>> plan = danon.attention_plan(q, q, kind="msra", causal=True, block_size=16, window=16, num_levels=2)
        >>> path = plot_plan(plan, tempfile.mkdtemp() + "/msra.png", "msra")
        >>> path.endswith("msra.png")
        True
    """
    import matplotlib
    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    grid = plan_grid(plan, batch, kv_head, compression_factor)
    size = min(9.0, 3.0 + 0.06 * max(grid.shape))
    fig, ax = plt.subplots(figsize=(size + 2.2, size))
    ax.imshow(grid.numpy(), cmap=ListedColormap(COLORS), vmin=0, vmax=len(CATEGORIES) - 1, interpolation="nearest")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"key block ({plan.block_size} tokens)")
    ax.set_ylabel(f"query block ({plan.block_size} tokens)")
    share = {name: float((grid == i).float().mean()) for i, name in enumerate(CATEGORIES)}
    ax.set_title(title or f"{plan.kind} plan, N={plan.seq_len_q}", fontsize=10)
    ax.legend(handles=[Patch(facecolor=c, edgecolor="#888888", label=f"{n} ({share[n]:.0%})")
                       for n, c in zip(CATEGORIES, COLORS)],
              loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@contextlib.contextmanager
def capture_plans():
    """Record every plan the families build at run time (not while Dynamo traces) inside the block.

    Every plan built on real tensors reaches danon.core.plan_op.observers: the sparse families' from
    `danon::plan`, the exact family's and `attention_plan`'s from danon/core/run.py.

    Example:
        >>> import torch, danon
        >>> q = torch.randn(1, 1, 64, 8)
        >>> with capture_plans() as plans:
        ...     _ = danon.msra_attention(q, q, q, causal=True, block_size=16, window=16, num_levels=1)
        >>> [p.kind for p in plans]
        ['msra']
    """
    from danon.core import plan_op
    plans: List[Plan] = []
    plan_op.observers.append(plans.append)
    try:
        yield plans
    finally:
        plan_op.observers.remove(plans.append)


def _danon_attention_layers(model: torch.nn.Module) -> list:
    from danon.nn import _AttentionBase
    return [m for m in model.modules() if isinstance(m, _AttentionBase)]


class AttentionVisualizer:
    """Pictures of a model's attention: its plans (`plot_plans`) and its real attention weights.

    Example:
        >>> import tempfile, danon
        >>> model = danon.create_msra_model(hidden_size=32, num_heads=2, num_layers=2, vocab_size=50,
        ...                                 block_size=16, window=16, num_levels=1)
        >>> viz = AttentionVisualizer(model)
        >>> w = viz.attention_weights(layer_idx=1, head_idx=0, seq_len=32)
        >>> w.shape, bool(torch.allclose(w.sum(-1), torch.ones(32, dtype=w.dtype)))
        (torch.Size([32, 32]), True)
        >>> viz.plot_attention_weights(1, 0, path=tempfile.mkdtemp() + "/w.png").endswith("w.png")
        True
    """

    def __init__(self, model: torch.nn.Module):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model

    # ---------------------------------------------------------------------------------------- plans
    def plans(self, input_ids: torch.Tensor, **options) -> List[Plan]:
        """The plans of one forward on `input_ids`: the model's own danon layers (run eagerly) and the
        attention sites the danon backend rewrites (compiled with `options`, target "eager")."""
        self.model.eval()
        with torch.no_grad(), capture_plans() as plans:
            if options.get("attention", "exact") == "keep":
                self.model(input_ids)                               # danon attention layers plan at run time
            else:
                # compiled, both plan at run time: the model's own danon layers in danon::plan, the rewritten
                # sites in the eager target's calls; nothing is recorded while Dynamo traces
                dynamo_reset()
                opts = {**options, "target": "eager"}
                torch.compile(self.model, backend="danon", options=opts)(input_ids)
                dynamo_reset()
        return plans

    def plot_plans(self, input_ids: torch.Tensor, out_dir: str, **options) -> List[str]:
        """One PNG per attention site's plan (batch 0, kv head 0) under `out_dir`; returns the paths."""
        plans = self.plans(input_ids, **options)
        c = int(options.get("compression_factor", 4))
        paths = []
        for i, plan in enumerate(plans):
            title = f"attention site {i}: {plan.kind}, N={plan.seq_len_q}, block {plan.block_size}"
            paths.append(plot_plan(plan, os.path.join(out_dir, f"plan_{i:02d}_{plan.kind}.png"), title,
                                   compression_factor=c))
        return paths

    # -------------------------------------------------------------------------------------- weights
    def attention_weights(self, layer_idx: int, head_idx: int, input_ids: Optional[torch.Tensor] = None,
                          seq_len: int = 64, batch_idx: int = 0) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) [N, N] of one head, from the layer's own projections on `input_ids`
        (default: random ids of `seq_len`). These are the dense weights; a sparse family approximates them."""
        layers = _danon_attention_layers(self.model)
        if not layers:
            return self._hf_weights(layer_idx, head_idx, input_ids, seq_len, batch_idx)
        if not 0 <= layer_idx < len(layers):
            raise ValueError(f"layer_idx must be in 0..{len(layers) - 1} (the model has {len(layers)} attention "
                             f"layers), got {layer_idx}")
        layer = layers[layer_idx]
        if not 0 <= head_idx < layer.num_heads:
            raise ValueError(f"head_idx must be in 0..{layer.num_heads - 1}, got {head_idx}")
        input_ids = self._ids(input_ids, seq_len)
        seen = {}

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            seen["qkv"] = module._project(hidden, mask)
        handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                self.model.eval()(input_ids)
        finally:
            handle.remove()
        q, k, _, kpm = seen["qkv"]
        kv = head_idx // (layer.num_heads // layer.num_kv_heads)
        q, k = q[batch_idx, head_idx].double(), k[batch_idx, kv].double()
        logits = q @ k.T / layer.head_dim ** 0.5
        n = logits.shape[0]
        if layer.causal:
            logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        if kpm is not None:
            logits = logits.masked_fill(~kpm[batch_idx].bool()[None, :], float("-inf"))
        return torch.softmax(logits, -1)

    def _ids(self, input_ids, seq_len):
        if input_ids is not None:
            return input_ids
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if vocab is None:
            raise ValueError("input_ids is needed: the model has no config.vocab_size")
        return torch.randint(0, vocab, (1, seq_len))

    def _hf_weights(self, layer_idx, head_idx, input_ids, seq_len, batch_idx):
        # transformers models return their weights with output_attentions=True (eager attention only)
        config = getattr(self.model, "config", None)
        if config is None or not hasattr(config, "_attn_implementation"):
            raise ValueError("AttentionVisualizer.attention_weights needs a danon model (danon.nn attention layers) "
                             "or a transformers model")
        input_ids = self._ids(input_ids, seq_len)
        saved = config._attn_implementation
        config._attn_implementation = "eager"
        try:
            with torch.no_grad():
                out = self.model.eval()(input_ids=input_ids, output_attentions=True)
        finally:
            config._attn_implementation = saved
        attentions = out.attentions
        if not 0 <= layer_idx < len(attentions):
            raise ValueError(f"layer_idx must be in 0..{len(attentions) - 1}, got {layer_idx}")
        return attentions[layer_idx][batch_idx, head_idx]

    def plot_attention_weights(self, layer_idx: int, head_idx: int, input_ids: Optional[torch.Tensor] = None,
                               seq_len: int = 64, path: Optional[str] = None):
        """Plot one head's attention weights (query rows, key columns). With `path`, writes a PNG and returns
        the path; without, returns the matplotlib Figure."""
        import matplotlib
        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        w = self.attention_weights(layer_idx, head_idx, input_ids, seq_len).float().cpu()
        fig, ax = plt.subplots(figsize=(6, 5))
        im = ax.imshow(w.numpy(), cmap="viridis", interpolation="nearest")
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        ax.set_title(f"layer {layer_idx}, head {head_idx}: attention weights (N={w.shape[0]})", fontsize=10)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        if path is None:
            return fig
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
