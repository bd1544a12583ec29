"""The process settings that the entry points make (pipelines.process.setup_process)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

# A few rounds of elementwise ops on a 48 MiB tensor (above glibc's largest dynamic mmap threshold),
# counting the minor page faults of the rounds after the first. From fresh mmaps, every temporary
# faults in all of its pages again each round; kept in the heap, freed blocks are mostly reused.
_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    if sys.argv[1] == "pipelines":
        from pipelines.process import setup_process
        setup_process()
    import torch
    x = torch.randn(12 * 2**20)
    (x * 2 + 1).exp().sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        (x * 2 + 1).exp().sum()
    print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
""")


def _page_faults(mode: str, **env) -> int:
    environment = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env
    done = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True,
                          env=environment, check=True, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_pipelines_keep_large_tensors_on_the_heap():
    pages_per_tensor = 48 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    plain = _page_faults("plain")
    tuned = _page_faults("pipelines")
    opted_out = _page_faults("pipelines", MS_TEMBA_MALLOC_TUNING="0")
    # glibc's default: the 3 temporaries of each of the 5 rounds are all fresh pages
    assert plain >= 10 * pages_per_tensor
    assert opted_out >= 10 * pages_per_tensor
    assert tuned <= plain / 2, (plain, tuned)
