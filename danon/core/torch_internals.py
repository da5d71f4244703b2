"""Every private torch API danon uses, in one place: checked against torch 2.13.0 (TORCH_CHECKED).

torch names with a leading underscore (torch._dynamo, torch._inductor, torch._functorch, torch._C, ...)
carry no compatibility promise. Each one danon needs is wrapped here, with why it is needed and the
upstream issue where one applies, so that a torch upgrade is checked in one file. The rest of danon
imports these names and never reaches into `torch._*` itself (tests/test_layers.py checks it).
Heavy modules (Inductor, the partitioners) are imported inside the functions: `import danon` stays fast.

Example:
    >>> import torch
    >>> from danon.core import torch_internals
    >>> torch_internals.TORCH_CHECKED
    '2.13.0'
    >>> torch_internals.LINEAR_TARGETS[0] is torch.nn.functional.linear
    True
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch
import torch.nn.functional as F

TORCH_CHECKED = "2.13.0"

# --- callables Dynamo's graphs hold, which the recognisers match by identity --------------------------------
# F.linear and F.scaled_dot_product_attention are these C functions; a graph may hold either name
LINEAR_TARGETS = (F.linear, torch._C._nn.linear)
SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
# nn.TransformerEncoderLayer / nn.MultiheadAttention fast paths (eval, no_grad) call these fused kernels
TRANSFORMER_ENCODER_LAYER_FWD = torch._transformer_encoder_layer_fwd
NATIVE_MULTI_HEAD_ATTENTION = torch._native_multi_head_attention
SYM_SQRT = torch._sym_sqrt   # math.sqrt of a symbolic size, as Dynamo records it


# --- pytrees (torch has no public pytree module) ----------------------------------------------------------------------
from torch.utils._pytree import tree_leaves, tree_unflatten  # noqa: E402,F401
# whether a tensor is a wrapper subclass (torchao's quantized weights are): such weights must stay parameters
from torch.utils._python_dispatch import is_traceable_wrapper_subclass  # noqa: E402,F401


def fake_tensor_type() -> type:
    """torch._subclasses.FakeTensor: the example values Dynamo's graphs carry (their fake_mode is needed to
    make more of them)."""
    from torch._subclasses.fake_tensor import FakeTensor
    return FakeTensor


# --- dispatcher -------------------------------------------------------------------------------------------------
def autograd_inside_op():
    """Re-enable autograd recording inside a custom op's kernel (the dispatcher excludes the autograd keys below
    the op). torch.library offers no VJP of a composite inside an opaque kernel; the guard is the one functorch
    uses (torch._C._ForceDispatchKeyGuard). Used by `danon::plan_backward`."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradCPU, torch._C.DispatchKey.AutogradOther,
                torch._C.DispatchKey.ADInplaceOrView):
        excluded = excluded.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded)


# --- symbolic shapes ----------------------------------------------------------------------------------------------
def backed_size_oblivious():
    """torch.fx.experimental._config.patch(backed_size_oblivious=True): trace sizes size-obliviously, so that
    a stride's "is this size 1" does not guard a symbolic length to the values where it is (used by the plan
    op's fake impl and the ONNX export)."""
    import torch.fx.experimental._config as fx_config
    return fx_config.patch(backed_size_oblivious=True)


# --- Dynamo ----------------------------------------------------------------------------------------------------
def dynamo_reset() -> None:
    """torch._dynamo.reset(): forget compiled code, so the next call traces afresh (benchmarks, explain)."""
    torch._dynamo.reset()


def dynamo_config_patch(**changes):
    """torch._dynamo.config.patch, restricted to the settings this torch has (others are skipped)."""
    return torch._dynamo.config.patch(**{k: v for k, v in changes.items() if hasattr(torch._dynamo.config, k)})


def dynamo_export_graph(model, dynamic_shapes, args, kwargs) -> torch.fx.GraphModule:
    """torch._dynamo.export's graph: the torch-level graph the attention pass rewrites (torch.export's is ATen)."""
    return torch._dynamo.export(model, dynamic_shapes=dynamic_shapes)(*args, **kwargs).graph_module


@contextlib.contextmanager
def sizes_not_remembered() -> Iterator[None]:
    """Dynamo's automatic-dynamic memory (torch._dynamo.pgo's code state) as it was before the block.

    Dynamo makes a size dynamic when a later compile of the same code sees another value. Without this, a
    capture's example length turns the user's first compile at any other length into a dynamic-shape compile,
    and AOTAutograd's tracing of a DTensor training graph with symbolic sizes recurses without end in torch
    2.13 (RecursionError; pytorch/pytorch#152954). Where the private state is missing, nothing is saved.
    """
    import copy
    try:
        from torch._dynamo import pgo
        saved = (copy.deepcopy(pgo._CODE_STATE), copy.deepcopy(pgo._INIT_CODE_STATE))
    except (ImportError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        pgo._CODE_STATE, pgo._INIT_CODE_STATE = saved


# --- AOTAutograd and its partitioner -----------------------------------------------------------------------------
def partitioners():
    """torch._functorch.partitioners (min_cut_rematerialization_partition, _size_of, estimate_runtime), imported
    on first use: it costs ~1.5 s of `import danon` otherwise."""
    from torch._functorch import partitioners as module
    return module


def functorch_config_patch(**changes):
    """torch._functorch.config.patch: the partitioner's memory budget and runtime estimator, and
    force_non_lazy_backward_lowering (compile the backward now, under the same workaround as the forward)."""
    from torch._functorch import config as functorch_config
    return functorch_config.patch(**changes)


def node_storage(node) -> object:
    """torch._inductor.fx_utils.get_node_storage: the storage a node's value lives in (views share one)."""
    from torch._inductor.fx_utils import get_node_storage
    return get_node_storage(node)


def aot_eager(partition_fn):
    """torch._dynamo.backends.common.aot_autograd with no-op compilers: a backend that partitions the joint graph
    with `partition_fn` and runs both halves as they are (the "eager" target under checkpointing)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop
    return aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=partition_fn,
                        keep_inference_input_mutations=True)


def aot_function_nop(fn, partition_fn):
    """torch._functorch.aot_autograd.aot_function with no-op compilers (the partitioner's doctests)."""
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._functorch.aot_autograd import aot_function
    return aot_function(fn, fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=partition_fn)


# --- Inductor ------------------------------------------------------------------------------------------------------
def inductor_with_partitioner(partitioner):
    """torch._inductor.config.patch(custom_partitioner_fn=...): Inductor partitions the joint graph with
    `partitioner` (a callable like AOTAutograd's partition functions) while the patch is active."""
    import torch._inductor.config
    from torch._inductor.custom_graph_pass import CustomPartitionerFn

    class InductorPartitioner(CustomPartitionerFn):
        def __call__(self, gm, joint_inputs, **kwargs):
            return partitioner(gm, joint_inputs, **kwargs)

        def uuid(self):
            # None: Inductor skips its caches for this compile, so the partitioner (and its report) always runs
            return None
    return torch._inductor.config.patch(custom_partitioner_fn=InductorPartitioner())


def compile_with_inductor(gm: torch.fx.GraphModule, example_inputs: List):
    """torch._inductor.compile_fx.compile_fx: the function a torch.compile backend hands a graph to Inductor with."""
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, example_inputs)


@contextlib.contextmanager
def no_cpu_loop_split_on_symbolic_sizes() -> Iterator[None]:
    """Skip the C++ codegen's loop split (an optional optimization) where a loop size is symbolic.

    torch 2.13's split of a loop whose index is divided by a constant (the plan builders' t // c^l) gives the
    outer loop the size floor(n / c^l); when the traced range of n lets that be 0, Inductor's bounds analysis
    fails with "ValueRangeError: Invalid ranges [0:-1]" (pytorch/pytorch#188422). Patches
    torch._inductor.codegen.cpp.CppScheduling.try_loop_split for the block only.
    """
    try:
        from torch._inductor.codegen.cpp import CppScheduling
    except ImportError:     # another Inductor layout: nothing to patch
        yield
        return
    original = getattr(CppScheduling, "try_loop_split", None)
    if original is None:
        yield
        return

    def try_loop_split(self, nodes):
        if any(getattr(size, "free_symbols", None) for node in nodes for sizes in node.group[1] for size in sizes):
            return nodes
        return original(self, nodes)

    CppScheduling.try_loop_split = try_loop_split
    try:
        yield
    finally:
        CppScheduling.try_loop_split = original


# --- collectives with autograd (danon/parallel) ---------------------------------------------------------------
# torch.distributed's differentiable collectives live in the private torch.distributed._functional_collectives
# (the public torch.distributed.nn.functional.all_gather is deprecated in their favour). Their backward is the
# matching collective: a reduce-scatter for the all-gather, the reverse all-to-all for the all-to-all.
def all_gather_autograd(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's `x` stacked along dim 0 ([world * x.shape[0], ...]), differentiable: the backward
    reduce-scatters the gradient. Waits for the result.

    Example (a group of one rank):
        >>> import torch, torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> all_gather_autograd(torch.ones(2, 3), dist.group.WORLD).shape
        torch.Size([2, 3])
        >>> dist.destroy_process_group()
    """
    import torch.distributed._functional_collectives as funcol
    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    return funcol.wait_tensor(gather(x.contiguous(), 0, group))


def all_to_all_autograd(x: torch.Tensor, output_split_sizes: List[int], input_split_sizes: List[int],
                        group) -> torch.Tensor:
    """`dist.all_to_all_single` along dim 0, differentiable: the backward sends each row's gradient back to the
    rank the row came from. Waits for the result.

    Example (a group of one rank):
        >>> import torch, torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> all_to_all_autograd(torch.arange(3.0), [3], [3], dist.group.WORLD).tolist()
        [0.0, 1.0, 2.0]
        >>> dist.destroy_process_group()
    """
    import torch.distributed._functional_collectives as funcol
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(x.contiguous(), output_split_sizes,
                                                                input_split_sizes, group))


# --- the vector ISA Inductor compiles CPU kernels for (danon/kernels/native_cpu.py builds with the same flags) --
def cpu_vector_isa_flags():
    """(name, compiler flags, macros) of the vector ISA Inductor picks on this CPU, or None without one.

    at::vec picks its vector width from the CPU_CAPABILITY_* macro; Inductor's `pick_vec_isa` is what tests
    the CPU and compiler for it (no public API does).
    """
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    if not isa:
        return None
    return str(isa), isa.build_arch_flags().split(), list(isa.build_macro())
