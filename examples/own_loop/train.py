"""Your own loop under DiLoCo: a tiny Hugging Face Llama on the bytes of a text file, one replica group.

Launched per group by ``torchx run diloco.diloco --script examples/own_loop/train.py -- <these flags>``; saves
every outer step and resumes from the newest checkpoint when started again (README.md next to this file).
"""

import argparse
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the model is built from a config
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from torchx_diloco import GLOBAL_PART, CheckpointStore, DiLoCo, group_manager, group_part  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--outer-steps", type=int, default=4)
parser.add_argument("--sync-every", type=int, default=5, help="H: inner steps between syncs")
parser.add_argument("--checkpoint-dir", default="checkpoints/own_loop", help="any fsspec URL")
parser.add_argument("--text", default=str(Path(__file__).with_name("README.md")), help="text to train on")
parser.add_argument("--seq-len", type=int, default=64)
parser.add_argument("--batch-size", type=int, default=8)
args = parser.parse_args()

group = int(os.environ.get("REPLICA_GROUP_ID", "0"))
writer = group == 0 and int(os.environ.get("RANK", "0")) == 0  # one process writes the global part
torch.manual_seed(0)  # every group starts from the same weights
data = torch.tensor(list(Path(args.text).read_bytes()), dtype=torch.long)  # byte tokens: vocabulary 256
config = LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=args.seq_len,
)
model = LlamaForCausalLM(config)
inner = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)

manager = group_manager("cpu")  # from REPLICA_GROUP_ID, NUM_REPLICA_GROUPS, TORCHFT_LIGHTHOUSE, ...
diloco = DiLoCo(manager, model, inner, outer, sync_every=args.sync_every)
store = CheckpointStore(args.checkpoint_dir, keep=3)
ckpt = store.latest(group)
if ckpt is not None:
    manager.load_state_dict(ckpt.global_state["manager"])
    diloco.load_state_dict(ckpt.global_state["diloco"])
    if ckpt.group_state is not None:
        inner.load_state_dict(ckpt.group_state["inner_optimizer"])
    print(f"group {group} resumed from {store.step_dir(ckpt.step)}", flush=True)

rng = torch.Generator().manual_seed(1000 * group + manager.current_step())  # each group its own batches
while manager.current_step() < args.outer_steps:
    starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size,), generator=rng)
    batch = torch.stack([data[s : s + args.seq_len] for s in starts.tolist()])
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    inner.step()
    inner.zero_grad()
    if diloco.step():  # an outer step committed: save it
        step = manager.current_step()
        if int(os.environ.get("RANK", "0")) == 0:
            store.write_part(step, group_part(group), {"inner_optimizer": inner.state_dict()})
        if writer:
            store.write_part(step, GLOBAL_PART, {"manager": manager.state_dict(), "diloco": diloco.state_dict()})
            store.prune()
        print(f"group {group}: outer step {step}, loss {loss.item():.3f}", flush=True)
print(f"group {group} done at outer step {manager.current_step()}", flush=True)
manager.shutdown(wait=False)
