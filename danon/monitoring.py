"""Performance monitoring of danon models: time, memory and attention coverage.

:class:`PerformanceMonitor` watches any ``nn.Module`` while it is active (use it
as a context manager or call :meth:`~PerformanceMonitor.start` /
:meth:`~PerformanceMonitor.stop`). :class:`PerformanceMonitorMixin` gives a model
``model.performance_monitor()`` and ``model.get_performance_stats()``;
:class:`danon.models.DanonLanguageModel` has it.

The statistics (``get_stats()``) are a dict:

``computation_time``
    seconds spent in the monitored module's forward calls (wall clock, summed over
    the calls; on CUDA the device is synchronised before and after each call).
``num_forward_calls``
    how many forward calls were timed.
``memory_usage``
    peak bytes, in the monitored block (forward, and backward if you run one):

    * CUDA: ``torch.cuda.max_memory_allocated`` after the peak counter was reset
      on entry, i.e. the peak of all tensors on the device (weights included).
    * CPU: the peak, over the monitored block, of the bytes of tensors allocated
      inside the block and still alive, as recorded by ``torch.profiler``
      (``profile_memory=True``) allocation events. Tensors that existed before the
      block (weights, inputs) are not counted. The profiler adds overhead to the
      timed calls; pass ``track_memory=False`` for clean timings.

    ``None`` when memory tracking is off or unavailable (another profiler active).
``memory_measure``
    a sentence saying which of these measures ``memory_usage`` is.
``attention_distribution``
    one dict per danon attention layer, in module order: ``layer`` (index),
    ``module`` (qualified name), ``kind`` and the shares ``exact``, ``summary``,
    ``skipped`` (summing to 1) of the visible keys that the queries of the layer's
    *last* monitored forward saw exactly, through summaries, or not at all
    (``danon.plan_coverage`` of the layer's plan). Dense layers are all exact.
    Layers compute this only while a monitor with ``track_attention`` is active.

Example:
    >>> import torch
    >>> from danon.models import create_dense_model
    >>> model = create_dense_model(hidden_size=32, num_heads=2, num_layers=2, vocab_size=100)
    >>> with model.performance_monitor():
    ...     logits = model(torch.randint(0, 100, (1, 16)))
    >>> stats = model.get_performance_stats()
    >>> sorted(stats)
    ['attention_distribution', 'computation_time', 'memory_measure', 'memory_usage', 'num_forward_calls']
    >>> stats["attention_distribution"][0]["exact"]
    1.0
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["PerformanceMonitor", "PerformanceMonitorMixin", "attention_layers"]

_CUDA_MEASURE = "peak bytes allocated on the CUDA device during the monitored block (torch.cuda.max_memory_allocated)"
_CPU_MEASURE = (
    "peak bytes of CPU tensors allocated inside the monitored block and alive at the same time "
    "(torch.profiler allocation events)"
)
_CPU_FALLBACK_MEASURE = (
    "total bytes of CPU tensors allocated inside the monitored block (torch.profiler; "
    "an upper bound of the peak)"
)


def attention_layers(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The danon attention layers inside ``module`` as ``(qualified name, layer)``, in order.

    Example:
        >>> from danon.models import create_msra_model
        >>> m = create_msra_model(hidden_size=32, num_heads=2, num_layers=2, vocab_size=50, block_size=16)
        >>> [name for name, _ in attention_layers(m)]
        ['layers.0.attention', 'layers.1.attention']
    """
    return [(name, m) for name, m in module.named_modules() if getattr(type(m), "_danon_attention", False)]


def _module_device(module: nn.Module) -> Optional[torch.device]:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return None


def _profiler_peak_bytes(prof) -> Tuple[Optional[int], str]:
    """Peak of the running sum of CPU allocation sizes, in time order."""
    try:
        tree = prof.profiler.kineto_results.experimental_event_tree()
        events = []
        stack = list(tree)
        while stack:
            node = stack.pop()
            extra = node.extra_fields
            if type(extra).__name__ == "_ExtraFields_Allocation" and extra.device.type == "cpu":
                events.append((node.start_time_ns, int(extra.alloc_size)))
            stack.extend(node.children)
        events.sort(key=lambda e: e[0])
        live = peak = 0
        for _, size in events:
            live += size
            peak = max(peak, live)
        return peak, _CPU_MEASURE
    except Exception:  # private profiler API moved: fall back to the public totals
        try:
            total = sum(max(0, int(e.cpu_memory_usage)) for e in prof.events())
            return total, _CPU_FALLBACK_MEASURE
        except Exception as err:  # pragma: no cover - depends on torch internals
            return None, f"unavailable ({type(err).__name__}: {err})"


class PerformanceMonitor:
    """Measure a module's forward time, peak memory and attention coverage while active.

    Args:
        model: the ``nn.Module`` to watch (its forward calls are timed; its danon
            attention layers record their coverage).
        track_memory: measure peak memory (see :mod:`danon.monitoring`).
        track_computation: time the forward calls.
        track_attention: record each danon attention layer's plan coverage.

    Use it as a context manager (or ``start()`` / ``stop()``); ``get_stats()``
    returns the statistics described in :mod:`danon.monitoring`, also while active.
    Starting it again resets the statistics.

    Example:
        >>> import torch
        >>> from danon.models import create_ucsa_model
        >>> from danon.monitoring import PerformanceMonitor
        >>> model = create_ucsa_model(hidden_size=32, num_heads=2, num_layers=1, vocab_size=50,
        ...                           block_size=16, local_window_size=16, global_tokens=16, top_k_blocks=1)
        >>> with PerformanceMonitor(model, track_memory=False) as mon:
        ...     _ = model(torch.randint(0, 50, (1, 128)))
        >>> stats = mon.get_stats()
        >>> stats["num_forward_calls"], stats["memory_usage"]
        (1, None)
        >>> round(sum(stats["attention_distribution"][0][k] for k in ("exact", "summary", "skipped")), 6)
        1.0
    """

    def __init__(
        self,
        model: nn.Module,
        track_memory: bool = True,
        track_computation: bool = True,
        track_attention: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, value in (
            ("track_memory", track_memory),
            ("track_computation", track_computation),
            ("track_attention", track_attention),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.model = model
        self.track_memory = track_memory
        self.track_computation = track_computation
        self.track_attention = track_attention
        self.active = False
        self._hooks: list = []
        self._profiler = None
        self._cuda_device: Optional[torch.device] = None
        self._reset()

    # -- state --------------------------------------------------------------------
    def _reset(self):
        self._time = 0.0
        self._calls = 0
        self._t0: List[float] = []
        self._memory: Optional[int] = None
        self._measure = "memory tracking off" if not self.track_memory else "not measured yet"
        self._distribution: List[Dict[str, Any]] = []

    def _sync(self):
        if self._cuda_device is not None:
            torch.cuda.synchronize(self._cuda_device)

    def _pre_hook(self, module, args):
        self._sync()
        self._t0.append(time.perf_counter())

    def _post_hook(self, module, args, output):
        self._sync()
        if self._t0:
            self._time += time.perf_counter() - self._t0.pop()
            self._calls += 1

    # -- control ------------------------------------------------------------------
    def start(self) -> "PerformanceMonitor":
        """Reset the statistics and start monitoring. Returns ``self``.

        Example:
            >>> from torch import nn
            >>> from danon.monitoring import PerformanceMonitor
            >>> mon = PerformanceMonitor(nn.Linear(4, 4), track_memory=False).start()
            >>> mon.active
            True
            >>> _ = mon.stop()
        """
        if self.active:
            raise RuntimeError("this PerformanceMonitor is already active; stop() it first")
        self._reset()
        device = _module_device(self.model)
        self._cuda_device = device if device is not None and device.type == "cuda" else None
        if self.track_computation:
            self._hooks.append(self.model.register_forward_pre_hook(self._pre_hook))
            self._hooks.append(self.model.register_forward_hook(self._post_hook))
        if self.track_attention:
            for _, layer in attention_layers(self.model):
                layer.last_coverage = None
                layer.record_coverage = True
        if self.track_memory:
            if self._cuda_device is not None:
                torch.cuda.synchronize(self._cuda_device)
                torch.cuda.reset_peak_memory_stats(self._cuda_device)
                self._measure = _CUDA_MEASURE
            else:
                try:
                    from torch.profiler import ProfilerActivity, profile

                    self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                    self._profiler.start()
                    self._measure = _CPU_MEASURE
                except Exception as err:  # e.g. another profiler is already running
                    self._profiler = None
                    self._measure = f"unavailable ({type(err).__name__}: {err})"
        self.active = True
        return self

    def stop(self) -> Dict[str, Any]:
        """Stop monitoring and return the statistics (see :meth:`get_stats`).

        Example:
            >>> from torch import nn
            >>> from danon.monitoring import PerformanceMonitor
            >>> mon = PerformanceMonitor(nn.Linear(4, 4), track_memory=False).start()
            >>> mon.stop()["num_forward_calls"]
            0
        """
        if not self.active:
            return self.get_stats()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._t0.clear()
        if self.track_attention:
            self._distribution = self._collect_distribution()
            for _, layer in attention_layers(self.model):
                layer.record_coverage = False
        if self.track_memory:
            if self._cuda_device is not None:
                torch.cuda.synchronize(self._cuda_device)
                self._memory = int(torch.cuda.max_memory_allocated(self._cuda_device))
            elif self._profiler is not None:
                try:
                    self._profiler.stop()
                    self._memory, self._measure = _profiler_peak_bytes(self._profiler)
                finally:
                    self._profiler = None
        self.active = False
        return self.get_stats()

    def _collect_distribution(self) -> List[Dict[str, Any]]:
        rows = []
        for i, (name, layer) in enumerate(attention_layers(self.model)):
            cov = getattr(layer, "last_coverage", None)
            if cov is None:
                continue
            row = {"layer": i, "module": name}
            row.update(cov)
            rows.append(row)
        return rows

    def get_stats(self) -> Dict[str, Any]:
        """The statistics so far: ``computation_time``, ``num_forward_calls``,
        ``memory_usage``, ``memory_measure`` and ``attention_distribution``.

        While active, ``memory_usage`` on CPU is ``None`` (the profiler's events are
        read when it stops); on CUDA it is the peak so far.

        Example:
            >>> from torch import nn
            >>> from danon.monitoring import PerformanceMonitor
            >>> PerformanceMonitor(nn.Linear(4, 4)).get_stats()["computation_time"]
            0.0
        """
        memory = self._memory
        if self.active and self.track_memory and self._cuda_device is not None:
            memory = int(torch.cuda.max_memory_allocated(self._cuda_device))
        distribution = self._collect_distribution() if (self.active and self.track_attention) else self._distribution
        return {
            "computation_time": float(self._time),
            "num_forward_calls": int(self._calls),
            "memory_usage": memory,
            "memory_measure": self._measure,
            "attention_distribution": distribution,
        }

    def __enter__(self) -> "PerformanceMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class PerformanceMonitorMixin:
    """Adds ``performance_monitor()`` and ``get_performance_stats()`` to an ``nn.Module``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from danon.monitoring import PerformanceMonitorMixin
        >>> class Net(nn.Module, PerformanceMonitorMixin):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return self.lin(x)
        >>> net = Net()
        >>> with net.performance_monitor(track_memory=False):
        ...     _ = net(torch.randn(2, 4))
        >>> net.get_performance_stats()["num_forward_calls"]
        1
    """

    @contextlib.contextmanager
    def performance_monitor(
        self,
        track_memory: bool = True,
        track_computation: bool = True,
        track_attention: bool = True,
    ) -> Iterator[PerformanceMonitor]:
        """Monitor the forward calls made inside the ``with`` block (see :mod:`danon.monitoring`).

        Yields the :class:`PerformanceMonitor`; afterwards
        :meth:`get_performance_stats` returns its statistics.

        Example:
            >>> import torch
            >>> from danon.models import create_dense_model
            >>> model = create_dense_model(hidden_size=32, num_heads=2, num_layers=1, vocab_size=50)
            >>> with model.performance_monitor() as mon:
            ...     _ = model(torch.randint(0, 50, (1, 8)))
            >>> model.get_performance_stats()["computation_time"] > 0
            True
        """
        monitor = PerformanceMonitor(
            self, track_memory=track_memory, track_computation=track_computation, track_attention=track_attention
        )
        self.__dict__["_danon_last_monitor"] = monitor
        monitor.start()
        try:
            yield monitor
        finally:
            monitor.stop()

    def get_performance_stats(self) -> Dict[str, Any]:
        """Statistics of the latest ``performance_monitor()`` block (or the running one).

        Before any monitoring it returns zeros: ``computation_time`` 0.0,
        ``memory_usage`` ``None`` and an empty ``attention_distribution``.

        Example:
            >>> from danon.models import create_dense_model
            >>> create_dense_model(hidden_size=32, num_heads=2, num_layers=1, vocab_size=50).get_performance_stats()["attention_distribution"]
            []
        """
        monitor = self.__dict__.get("_danon_last_monitor")
        if monitor is None:
            return {
                "computation_time": 0.0,
                "num_forward_calls": 0,
                "memory_usage": None,
                "memory_measure": "not monitored yet: use `with model.performance_monitor(): ...`",
                "attention_distribution": [],
            }
        return monitor.get_stats()
