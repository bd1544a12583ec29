"""Peak memory of the library on long sequences, measured in a fresh process (ru_maxrss).

The release's TSU recipe trains on crops of 2500 features; with activation checkpointing
(`MSTembaConfig.checkpoint_blocks`) a training step of the default model at that length, batch 1,
must fit in 2 GB on CPU with nothing but `import ms_temba` (no allocator tuning of `pipelines`).
No timings are asserted; benchmarks/bench_model.py measures those.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

STEP = """
import json, resource, sys
import torch
import torch.nn.functional as F
import ms_temba

torch.set_num_threads(2)
torch.manual_seed(0)
model = ms_temba.create_model("ms_temba", in_dim=1024, num_classes=157, checkpoint_blocks=True).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
features = torch.randn(1, 2500, 1024)
targets = (torch.rand(1, 2500, 157) < 0.05).float()
for _ in range(2):  # the second step has AdamW's state and the gradients allocated
    optimizer.zero_grad(set_to_none=True)
    out = model(features)
    loss = sum(F.binary_cross_entropy_with_logits(logits, targets)
               for logits in [out.logits, *out.block_logits])
    loss.backward()
    optimizer.step()
print(json.dumps({"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "pipelines_imported": "pipelines" in sys.modules}))
"""


def test_checkpointed_training_step_at_2500_features_fits_in_2_gb():
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", STEP], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["pipelines_imported"]
    assert result["peak_bytes"] <= 2e9, f"peak RSS {result['peak_bytes'] / 1e9:.2f} GB"
