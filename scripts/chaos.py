"""Chaos, long form: SIGKILL replica-group workers and whole jobs many times, then audit what the groups recorded.

    .venv/bin/python scripts/chaos.py --kills 20 --restarts 10 --seed 7

Part 1: three replica groups (torchrun agents, one real lighthouse, ``--min-replicas 1``) train while the harness
kills one group's worker at a time, aimed at inner steps, at the sync and at checkpoint writes; torchrun restarts
it and it resumes from the newest checkpoint and/or heals from a peer. Part 2: an uninterrupted run, then the
same run (``--min-replicas 3``) killed whole at random instants and restarted with a fresh lighthouse; it must
end with the uninterrupted weights. Prints a table, writes ``docs/fault-tolerance.json``, exits 1 on any breach of
the invariant described in ``torchx_diloco/_fleet/chaos.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import List, Optional

from torchx_diloco._fleet import chaos  # the harness, shared with tests/test_chaos.py

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/chaos.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20, help="worker SIGKILLs in part 1 (default 20)")
    p.add_argument("--restarts", type=int, default=10, help="whole-job SIGKILLs + restarts in part 2 (default 10)")
    p.add_argument("--seed", type=int, default=None, help="seeds who dies when (default: from the clock, printed)")
    p.add_argument("--groups", type=int, default=3, help="replica groups (default 3)")
    p.add_argument("--sync-every", type=int, default=40, help="H in part 1; part 2 uses H/2 (default 40)")
    p.add_argument("--outer-steps", type=int, default=None, help="part 1 length (default: 12 per kill + 40)")
    p.add_argument("--restart-steps", type=int, default=None, help="part 2 length (default: 5 per restart + 12)")
    p.add_argument(
        "--train-args",
        default="",
        help="more training flags for both parts, e.g. '--fragments 4 --overlap-steps 1 --codec int8' (H and H/2 "
        "must be multiples of the fragments)",
    )
    p.add_argument("--work", default=None, help="folder for checkpoints and logs (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep --work afterwards (always kept on failure)")
    p.add_argument(
        "--json",
        default=str(REPO / "docs" / "fault-tolerance.json"),
        help="where to write the results (default docs/fault-tolerance.json)",
    )
    p.add_argument(
        "--pause-repro",
        nargs="?",
        type=int,
        const=1,
        default=None,
        metavar="MIN_REPLICAS",
        help="only check a group frozen (SIGSTOP) until its peers finish: it must adopt their final "
        "checkpoint, not train the rest alone and rewrite it (exits 1 if it forks the history); "
        "MIN_REPLICAS for groups and lighthouse (default 1)",
    )
    args = p.parse_args(argv)
    for name in ("kills", "restarts"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0")
    if args.groups < 3:
        p.error("--groups must be >= 3: with fewer, torchft's split-brain guard cannot tell a majority")
    if args.pause_repro is not None and not 1 <= args.pause_repro <= args.groups:
        p.error(f"--pause-repro {args.pause_repro}: pass a quorum size in 1..{args.groups}")
    if args.sync_every < 2:
        p.error("--sync-every must be >= 2")
    return args


def table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pause_repro(work: Path, groups: int, min_replicas: int) -> int:
    result = chaos.pause_until_peers_finish(work, groups=groups, min_replicas=min_replicas)
    for line in result.problems[:5]:
        print(f"  {line}")
    if result.problems:
        print(
            f"chaos: the frozen group forked the history ({result.mismatches} outer steps with two results); "
            f"logs in {work}",
            file=sys.stderr,
        )
        return 1
    print("chaos: the frozen group rejoined the one history")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    command = "python scripts/chaos.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.seed is None:
        command += f"  # seed chosen: {seed}"
    print(f"chaos seed {seed} (replay with --seed {seed})", flush=True)
    rng = random.Random(seed)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.pause_repro is not None:
        return pause_repro(work, args.groups, args.pause_repro)
    extra = shlex.split(args.train_args)
    outer = args.outer_steps or 12 * args.kills + 40
    restart_steps = args.restart_steps or 5 * args.restarts + 12
    started = time.time()
    problems: List[str] = []
    kills: List[chaos.Kill] = []
    restarts: List[chaos.Restart] = []
    kill_audit = restart_audit = reference = chaos.Audit(0)
    t0 = time.monotonic()
    try:
        kills, kill_audit = chaos.worker_kills(
            work, args.kills, rng, outer, args.sync_every, args.groups, timeout=3600, extra=extra
        )
    except Exception as e:  # noqa: BLE001 - reported with the rest; part 2 still runs
        problems.append(f"worker kills: the run failed: {type(e).__name__}: {e}")
    kills_s = time.monotonic() - t0
    t0 = time.monotonic()
    try:
        restarts, restart_audit, reference = chaos.whole_job_restarts(
            work,
            args.restarts,
            rng,
            restart_steps,
            max(2, args.sync_every // 2),
            args.groups,
            timeout=3600,
            extra=extra,
        )
    except Exception as e:  # noqa: BLE001
        problems.append(f"restarts: the run failed: {type(e).__name__}: {e}")
    restarts_s = time.monotonic() - t0

    survived = [k for k in kills if k.recovered_step is not None]
    by_phase = Counter(k.phase for k in kills)
    landed = Counter(k.phase for k in kills if k.landed)
    recovery = [k.recovery_s for k in survived]
    same_final = restart_audit.final_sha is not None and restart_audit.final_sha == reference.final_sha
    retrained = sum(r.killed_at_step - r.latest_checkpoint for r in restarts)
    first_ok = all(r.first_step_after == r.latest_checkpoint + 1 for r in restarts)
    problems += (
        [f"worker kills: {p}" for p in kill_audit.problems]
        + [f"restarts: {p}" for p in restart_audit.problems]
        + [f"uninterrupted: {p}" for p in reference.problems]
    )
    if not same_final:
        problems.append(f"final weights {restart_audit.final_sha} != uninterrupted {reference.final_sha}")
    if not first_ok:
        problems.append("a restart did not resume at the newest complete checkpoint + 1")
    if len(survived) < len(kills):
        problems.append(f"{len(kills) - len(survived)} victims never committed again")

    print("\nworker kills (SIGKILL of one group's torchrun worker; --min-replicas 1)")
    rows = [
        [
            "#",
            "group",
            "aimed at",
            "seen at the kill",
            "landed",
            "died after",
            "back at",
            "after s",
            "how",
            "peers dropped",
        ]
    ]
    for k in kills:
        rows.append(
            [
                str(k.n),
                str(k.group),
                k.phase,
                k.evidence,
                "yes" if k.landed else "no",
                str(k.step),
                str(k.recovered_step),
                f"{k.recovery_s}",
                k.how,
                str(k.dropped_rounds),
            ]
        )
    print(table(rows))
    print("\nwhole-job kills (agents, workers and lighthouse at once; --min-replicas 3)")
    rows = [["#", "killed after step", "newest checkpoint", "first step after restart", "steps trained again"]]
    for r in restarts:
        rows.append(
            [
                str(r.n),
                str(r.killed_at_step),
                str(r.latest_checkpoint),
                str(r.first_step_after),
                str(r.killed_at_step - r.latest_checkpoint),
            ]
        )
    print(table(rows))
    summary = [
        ["result", "value"],
        [
            "worker kills survived",
            f"{len(survived)} of {len(kills)} ("
            + ", ".join(f"{p} {by_phase[p]}, landed {landed[p]}" for p in chaos.PHASES)
            + ")",
        ],
        [
            "recovery after a kill",
            f"median {statistics.median(recovery):.1f} s, max {max(recovery):.1f} s" if recovery else "-",
        ],
        [
            "committed outer steps",
            f"{kill_audit.committed_steps}/{outer} (kills), {restart_audit.committed_steps}/{restart_steps} (restarts)",
        ],
        ["rounds dropped and retried", str(kill_audit.uncommitted_records)],
        ["whole-job restarts", f"{len(restarts)}, each from the newest checkpoint: {'yes' if first_ok else 'NO'}"],
        [
            "steps re-trained after restarts",
            f"{retrained} ({restart_audit.recommitted_steps} distinct), all bit-identical: "
            f"{'yes' if restart_audit.redone_same == restart_audit.recommitted else 'NO'}",
        ],
        ["final weights = uninterrupted run", f"{'yes' if same_final else 'NO'} ({restart_audit.final_sha})"],
        ["committed steps lost", str(kill_audit.lost + restart_audit.lost)],
        ["mismatches", str(kill_audit.mismatches + restart_audit.mismatches)],
        ["wall time", f"{kills_s / 60:.1f} min (kills) + {restarts_s / 60:.1f} min (restarts)"],
    ]
    print("\n" + table(summary))

    result = {
        "kills_survived": len(survived),
        "kills": len(kills),
        "kills_by_phase": dict(by_phase),
        "kills_landed_by_phase": dict(landed),
        "recovery_s": {"median": statistics.median(recovery), "max": max(recovery)} if recovery else None,
        "whole_job_restarts": len(restarts),
        "restarts_resumed_from_newest_checkpoint": first_ok,
        "committed_steps": {"worker_kills": kill_audit.committed_steps, "restarts": restart_audit.committed_steps},
        "committed_steps_lost": kill_audit.lost + restart_audit.lost,
        "mismatches": kill_audit.mismatches + restart_audit.mismatches,
        "steps_retrained_after_restarts": retrained,
        "distinct_steps_retrained": restart_audit.recommitted_steps,
        "final_weights_equal_uninterrupted": same_final,
        "rounds_dropped_and_retried": kill_audit.uncommitted_records,
        "problems": problems,
        "seed": seed,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "command": command,
        "setup": {
            "groups": args.groups,
            "outer_steps_kills": outer,
            "outer_steps_restarts": restart_steps,
            "sync_every_kills": args.sync_every,
            "sync_every_restarts": max(2, args.sync_every // 2),
            "train_args_kills": chaos.train_args(outer, args.sync_every),
            "train_args_restarts": chaos.train_args(restart_steps, max(2, args.sync_every // 2), chaos.RESTART_EXTRA),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "wall_s": {"worker_kills": round(kills_s, 1), "restarts": round(restarts_s, 1)},
        "worker_kill_log": [vars(k) for k in kills],
        "restart_log": [vars(r) for r in restarts],
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    print(f"\nwrote {out}")
    if problems:
        print("chaos: FAILED\n  " + "\n  ".join(problems), file=sys.stderr)
        print(f"logs and checkpoints kept in {work}", file=sys.stderr)
        return 1
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print("chaos: every invariant held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
