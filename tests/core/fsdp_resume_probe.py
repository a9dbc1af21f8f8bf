"""Run by tests/core/test_checkpoint.py under torch.distributed.run: two gloo processes, a model sharded by FSDP2;
checkpoint at step 3, continue to 6; a fresh sharded model resumed from the checkpoint must reach the same weights."""

import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from difftune.core import checkpoint as ck

dist.init_process_group("gloo")
rank = dist.get_rank()
out = Path(sys.argv[1])


class Acc:  # the part of accelerate.Accelerator that core.checkpoint uses
    distributed_type = types.SimpleNamespace(value="FSDP")
    is_main_process = rank == 0

    def wait_for_everyone(self):
        dist.barrier()


def make():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    for layer in m:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(m)
    return m


def step(m, opt, i):
    g = torch.Generator().manual_seed(100 * i + rank)
    x = torch.randn(4, 8, generator=g)
    m(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


m = make()
opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
for i in range(3):
    step(m, opt, i)
ck.save(out, 3, {"net": m}, [opt], accelerator=Acc())
for i in range(3, 6):
    step(m, opt, i)
straight = {k: v.full_tensor().clone() for k, v in m.state_dict().items()}
m2 = make()
opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
ck.load(ck.resolve("latest", out), {"net": m2}, [opt2], accelerator=Acc())
for i in range(3, 6):
    step(m2, opt2, i)
resumed = {k: v.full_tensor() for k, v in m2.state_dict().items()}
same = all(torch.equal(straight[k], resumed[k]) for k in straight)
saved = ck.load_tree(ck.resolve("latest", out), "optimizer")[0]["state"]
if rank == 0:
    print("RESULT", same, sorted(saved)[:2], tuple(saved["net.0.weight"]["exp_avg"].shape), flush=True)
# Both processes finish their work before either tears gloo down: tearing down while the other still reads aborted
# one process ("terminate called without an active exception") in one CI run.
dist.barrier()
dist.destroy_process_group()
