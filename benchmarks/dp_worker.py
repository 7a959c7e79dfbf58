"""The data-parallel baseline: one replica group whose gradients are averaged with the others every step.

Same model, data shards, inner optimizer (AdamW) and learning-rate schedule as ``torchx_diloco.train``; the
only difference is what crosses the network: a flat buffer of all gradients every step (through torchft's
Manager and ProcessGroupGloo, async quorum, as torchft runs DDP) instead of a pseudo-gradient every H steps.

Env: REPLICA_GROUP_ID, NUM_REPLICA_GROUPS, TORCHFT_LIGHTHOUSE. Writes one JSON line per step to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta

import torch


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--data", default="pydoc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inner-lr", type=float, default=4e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=0, help="steps between evals (0 = only at the end)")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: --batch-size")
    p.add_argument("--out", required=True, help="JSON lines, one per step")
    return p.parse_args()


def main() -> int:
    os.environ.setdefault("RUST_LOG", "warn")
    from torchft import Manager
    from torchft.process_group import ProcessGroupGloo

    from torchx_diloco.cluster import replica_id
    from torchx_diloco.data import Corpus, eval_batches, read_corpus
    from torchx_diloco.model import build_model
    from torchx_diloco.train import build_optimizers, inner_lr

    a = parse()
    group, groups = int(os.environ["REPLICA_GROUP_ID"]), int(os.environ["NUM_REPLICA_GROUPS"])
    corpus = Corpus.from_bytes(read_corpus(a.data), a.seq_len)
    shard = corpus.shard(group, groups, a.seq_len)
    data_seed = a.seed * 7919 + group  # as torchx_diloco.train draws batches
    torch.manual_seed(a.seed)
    model = build_model(a.model, block_size=a.seq_len)
    opt, _ = build_optimizers(model, inner_lr=a.inner_lr, outer_lr=1.0, outer_momentum=0.0, weight_decay=a.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]

    store_kwargs = {}
    if "MASTER_ADDR" not in os.environ:
        from torch.distributed import TCPStore

        store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        store_kwargs = dict(store_addr="127.0.0.1", store_port=store.port, rank=0, world_size=1)
    timeout = timedelta(seconds=600)  # (a benchmark beside other work may stall a group for minutes)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=None,
        state_dict=None,
        min_replica_size=groups,
        use_async_quorum=True,
        # the trainer's name for group g: the lighthouse launcher counts only groups so named as having joined
        # (a run of other names was ended after its --first-join-timeout, 600 s, mid-training)
        replica_id=replica_id(group),
        timeout=timeout,
        quorum_timeout=timeout,
        connect_timeout=timeout,
        **store_kwargs,
    )
    manager.register_state_dict_fn(
        "dp",
        lambda sd: (model.load_state_dict(sd["model"]), opt.load_state_dict(sd["opt"])),
        lambda: {"model": model.state_dict(), "opt": opt.state_dict()},
    )

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            losses = [
                model(x, y)[1].item()
                for x, y in eval_batches(corpus.eval, a.eval_batch_size or a.batch_size, a.seq_len, a.eval_batches)
            ]
        model.train()
        return sum(losses) / len(losses)

    out = open(a.out, "a")
    numel = sum(p.numel() for p in params)
    step = 0
    while manager.current_step() < a.steps:
        t0 = time.perf_counter()
        manager.start_quorum()  # async: overlaps the forward pass
        for g in opt.param_groups:
            g["lr"] = inner_lr(manager.current_step(), a.inner_lr, a.steps, a.warmup_steps)
        x, y = shard.batch(step, a.batch_size, a.seq_len, data_seed)
        _, loss = model(x, y)
        loss.backward()
        t1 = time.perf_counter()
        flat = torch.cat([p.grad.view(-1) for p in params])
        manager.allreduce(flat).wait()  # the average over the participating groups
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        ok = manager.should_commit()
        t2 = time.perf_counter()
        if ok:
            if a.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
            opt.step()
            step += 1
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        record = {
            "step": manager.current_step(),
            "committed": ok,
            "time": time.time(),
            "loss": loss.item(),
            "compute_s": (t1 - t0) + (t3 - t2),
            "comm_s": t2 - t1,
            "step_s": t3 - t0,
            "tokens": a.batch_size * a.seq_len,
            "grad_bytes": 4 * numel,
        }
        done = manager.current_step() >= a.steps
        if ok and (done or (a.eval_every and manager.current_step() % a.eval_every == 0)):
            record["eval_loss"] = evaluate()
        out.write(json.dumps(record) + "\n")
        out.flush()
    out.close()
    manager.shutdown(wait=False)
    print(f"dp: group {group} finished at step {manager.current_step()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
