"""torchrun helper for test_sharded_checkpoint: save or load a sharded part as fsdp (FSDP2) or plain, any world size."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from torchx_diloco.checkpoint import CheckpointStore


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
    state = {"model": model.state_dict()}
    store = CheckpointStore(url)
    if action == "save":
        store.write_sharded_part(3, "global", state, {"outer_step": 5, "manager": {}}, pg)
    else:
        ckpt = store.latest(0)  # verifies every file of the part against the manifest
        assert ckpt is not None and ckpt.step == 3 and ckpt.sharded == {"global"}, ckpt
        store.load_sharded_part(3, "global", state, pg)
        torch.manual_seed(0)
        ref = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4)).state_dict()
        for k, v in state["model"].items():
            full = v.full_tensor() if isinstance(v, DTensor) else v
            assert torch.equal(full, ref[k]), k
        assert ckpt.global_state["outer_step"] == 5, ckpt.global_state
        print("LOADED OK")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
