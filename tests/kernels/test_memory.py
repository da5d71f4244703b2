"""The CPU executor never holds an N x N tensor for the sparse families (DESIGN.md section 4:
"Memory O(N * keys per query), never O(N^2) for sparse plans").

At N = 16384 an fp32 N x N tensor is 1 GiB. Each family runs in a subprocess whose address space
is capped (RLIMIT_AS) at its current size + CAP_MIB after a small warm-up; the same cap is shown to
make naive dense attention (q @ k^T) fail, so the cap really bites.
"""

import os
import subprocess
import sys
import textwrap

import pytest

N = 16384
CAP_MIB = 700

SCRIPT = textwrap.dedent(r"""
    import math, resource, sys
    import torch
    torch.set_num_threads(2)
    import danon

    kind, n, cap_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    D = 32

    def inputs(n):
        g = torch.Generator().manual_seed(0)
        return [torch.randn(1, 1, n, D, generator=g) for _ in range(3)]

    def run(q, k, v):
        with torch.no_grad():
            if kind == "naive":
                s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
                s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
                return torch.softmax(s, dim=-1) @ v
            return getattr(danon, f"{kind}_attention")(q, k, v, causal=True)

    def vmsize_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1])

    run(*inputs(2048))          # warm-up: thread pool, lazy imports, allocator arenas
    q, k, v = inputs(n)
    base = vmsize_kib()
    limit = (base + cap_mib * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        out = run(q, k, v)
    except (RuntimeError, MemoryError) as e:
        print("OOM", type(e).__name__, str(e).splitlines()[0][:200])
        sys.exit(3)
    assert out.shape == q.shape and torch.isfinite(out).all()
    # the first 256 queries (4 blocks of 64, inside the default windows 512 / 256) equal exact attention
    m = 256
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, :m].double(), k[:, :, :m].double(), v[:, :, :m].double(),
        attn_mask=(torch.ones(m, m, dtype=torch.bool).tril() if kind != "dala" else
                   (-(2.0 ** -8) * (torch.arange(m)[:, None] - torch.arange(m)[None, :]).abs().double())
                   .masked_fill(~torch.ones(m, m, dtype=torch.bool).tril(), float("-inf"))))
    err = ((out[:, :, :m].double() - ref).norm() / ref.norm()).item()
    assert err < 1e-5, err
    print("OK peak_rss_growth_mib=%.0f" % ((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024))
""")


def run_capped(kind):
    env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-c", SCRIPT, kind, str(N), str(CAP_MIB)],
                          capture_output=True, text=True, timeout=300, env=env)


def test_cap_bites_naive_dense():
    r = run_capped("naive")
    assert r.returncode == 3 and "OOM" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


@pytest.mark.parametrize("kind", ["ucsa", "msra", "dala"])
def test_sparse_cpu_executor_memory(kind):
    r = run_capped(kind)
    assert r.returncode == 0 and "OK" in r.stdout, (
        f"{kind} at N={N} failed under an address-space cap of +{CAP_MIB} MiB "
        f"(an fp32 N x N tensor is 1024 MiB): rc={r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}")


# --- memory per token stays constant as N grows (no hidden O(N^2 / b) table) ------------------------------
# Peak extra resident memory of one forward + backward in a fresh process (VmHWM reset after a warm-up, minus
# the resident size once the inputs exist). Small heads and a small block make any table of size Tq x Tk (or
# N x Tk) a large share of the total at the larger N.
GROWTH_SCRIPT = textwrap.dedent(r"""
    import sys
    import torch
    import danon

    kind, n = sys.argv[1], int(sys.argv[2])

    def status_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    def step(n):
        g = torch.Generator().manual_seed(n)
        q = torch.randn(1, 2, n, 8, generator=g, requires_grad=True)
        k, v = (torch.randn(1, 1, n, 8, generator=g, requires_grad=True) for _ in range(2))
        if kind == "dense-scores":   # the control: a [N, N] score matrix, what the check must catch
            return lambda: ((q[:, :1] @ k.transpose(-1, -2)).softmax(-1) @ v).sum().backward()
        # MSRA with a fixed level count lists Tk / c^L top-level summaries per query block, by definition a plan
        # that grows with N; "auto" levels keep the top level bounded (O(log N) summaries per query)
        levels = dict(num_levels="auto") if kind == "msra" else {}
        return lambda: danon.attention(q, k, v, kind=kind, causal=True, block_size=16, window=32,
                                       **levels).sum().backward()

    step(2048)()                       # warm-up: thread pool, lazy imports
    run = step(n)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                   # VmHWM := VmRSS
    base = status_kib("VmRSS")
    run()
    print((status_kib("VmHWM") - base) * 1024 / n)
""")


def _bytes_per_token(kind: str, n: int) -> float:
    # every allocation above 64 KiB its own mmap, returned at free: the resident peak follows the live tensors
    env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="2", MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    r = subprocess.run([sys.executable, "-c", GROWTH_SCRIPT, kind, str(n)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return float(r.stdout.split()[-1])


@pytest.mark.slow   # about 15 s: it checks the checker; the constant-per-token tests run by default
def test_peak_memory_check_sees_quadratic_growth():
    small, large = (_bytes_per_token("dense-scores", n) for n in (1024, 8192))
    assert large > 4 * small, (small, large)


@pytest.mark.parametrize("kind", ["msra", "dala"])
def test_peak_memory_per_token_is_constant(kind):
    small, large = (_bytes_per_token(kind, n) for n in (8192, 65536))
    # 8x the tokens: O(N) memory keeps the bytes per token. DALA's routing tree adds O(log N) lists (measured:
    # about +120 B/token per doubling from 1280 B/token at 8k). A Tq x Tk int64 table (b = 16) alone would add
    # 2 KiB/token at 64k (MSRA's plan before its candidate tables went: 1060 -> 3744 B/token), an N x Tk one more
    assert large <= 1.5 * small, f"{kind}: {small:.0f} B/token at N = 8192, {large:.0f} at N = 65536"
