"""torchrun helper for test_sharded_checkpoint: save or load a part as fsdp (FSDP2) or plain, any world size."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from torchx_diloco.sharded import load_sharded, save_sharded


def main() -> None:
    action, layout, url = sys.argv[1:4]
    if dist.is_torchelastic_launched():
        dist.init_process_group("gloo")
    pg = dist.group.WORLD if dist.is_initialized() else None
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
    if action == "load":
        for p in model.parameters():
            p.data.zero_()
    if layout == "fsdp":
        for block in model:
            fully_shard(block)
        fully_shard(model)
    state = {"model": model.state_dict(), "step": 0 if action == "load" else 5}
    if action == "save":
        save_sharded(url, state, pg)
    else:
        load_sharded(url, state, pg)
        torch.manual_seed(0)
        ref = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4)).state_dict()
        for k, v in state["model"].items():
            full = v.full_tensor() if isinstance(v, DTensor) else v
            assert torch.equal(full, ref[k]), k
        assert state["step"] == 5, state["step"]
        print("LOADED OK")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
