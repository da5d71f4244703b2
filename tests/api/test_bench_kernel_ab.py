"""bench/kernel_ab_cpu.py: the two builds it compares get their own library names, and a whole run (slow: two
extension builds) reports both builds on the same outputs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:   # bench/ is not an installed package
    sys.path.insert(0, ROOT)

from bench import kernel_ab_cpu  # noqa: E402


def test_the_working_trees_source_is_renamed_to_its_own_library():
    text = kernel_ab_cpu.renamed_source(kernel_ab_cpu._source(None), "danon_cpu_ab_tree")
    assert "#define DANON_LIBRARY danon_cpu_ab_tree" in text
    assert '#include "danon_library.h"' not in text and "TORCH_LIBRARY(DANON_LIBRARY" in text


def test_a_source_from_before_the_shared_header_is_renamed_too():
    """Before fef6b1a the kernel defined its library name itself (the profiling build another one)."""
    text = kernel_ab_cpu._source("fef6b1a~1")
    assert "danon_library.h" not in text
    renamed = kernel_ab_cpu.renamed_source(text, "danon_cpu_ab_base")
    assert "#define DANON_LIBRARY danon_cpu_ab_base\n" in renamed and "#define DANON_LIBRARY danon_cpu\n" not in renamed


def test_a_source_without_a_known_library_name_is_refused():
    with pytest.raises(ValueError, match="names no library"):
        kernel_ab_cpu.renamed_source("int main() {}", "danon_cpu_ab_base")


def test_the_source_at_a_revision_is_gits():
    if subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.fail("the tests run from a git checkout (the A/B script reads revisions from it)")
    shown = subprocess.run(["git", "-C", ROOT, "show", f"HEAD:{kernel_ab_cpu.KERNEL}"], capture_output=True,
                           text=True, check=True).stdout
    assert kernel_ab_cpu._source("HEAD") == shown


@pytest.mark.slow
def test_a_whole_run_reports_both_builds(tmp_path):
    out = tmp_path / "ab.md"
    kernel_ab_cpu.main(["--base", "HEAD", "--kind", "msra", "--seq-len", "1024", "--calls", "2",
                        "--build-dir", str(tmp_path), "--out", str(out)])
    text = out.read_text()
    assert "| base |" in text and "| tree |" in text and "tree / base (medians):" in text
    from danon.kernels import fused_cpu, native_cpu
    assert fused_cpu.native_cpu is native_cpu, "the A/B left its switch in place of the working tree's build"
