"""What each codec costs the CPU: encode and decode seconds per MB of fp32 pseudo-gradient, and what it sends.

    python benchmarks/bench_codecs.py [--quick | --full] [--threads 1]

So nobody trades a fast link for a slow codec unknowingly. The tensor is pseudo-gradient-like (Student-t, 3
degrees of freedom: heavy tails) of ``--numel`` values; each codec encodes and decodes it ``--repeats`` times,
interleaved (every codec once, then again) so a slow spell of a shared machine hits all alike; the table gives
the medians per MB of fp32 input, the bits a value costs on the wire (scales and indices included), and the
relative error of one round trip (error feedback carries it into the next sync). Error feedback adds one decode
of the member's own payload and a subtraction. One thread by default, as each replica group runs in tests and
`make run`. Writes benchmarks/results/codecs.json.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List

import torch

from benchlib import median, table, write_result
from torchx_diloco.codecs import CODEC_TABLE, Codec, get_codec

MB = 1 << 20


def codecs() -> Dict[str, Codec]:
    rows = {name: codec for name, codec in CODEC_TABLE.items() if name != "topk"}
    for density in (0.01, 0.02, 0.05):
        rows[f"topk {density:g}"] = get_codec("topk", density)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4M values, 5 rounds (default)")
    p.add_argument("--full", action="store_true", help="16M values, 15 rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one group's core)")
    a = p.parse_args()
    started = time.time()
    torch.set_num_threads(a.threads)
    numel, repeats = (1 << 24, 15) if a.full else (1 << 22, 5)
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((numel,)) * 1e-3
    table_rows: Dict[str, Dict[str, Any]] = {}
    times: Dict[str, Dict[str, List[float]]] = {name: {"encode": [], "decode": []} for name in codecs()}
    for _ in range(repeats):
        for name, codec in codecs().items():
            padded = torch.cat([x, x.new_zeros(-numel % codec.align)])
            t0 = time.perf_counter()
            encoded = codec.encode(padded)
            t1 = time.perf_counter()
            decoded = codec.decode(encoded, padded.numel())
            t2 = time.perf_counter()
            times[name]["encode"].append(t1 - t0)
            times[name]["decode"].append(t2 - t1)
            table_rows[name] = {
                "bits_per_value": 8 * encoded.numel() / numel,
                "relative_error": float((decoded[:numel] - x).norm() / x.norm()),
            }
    fp32_mb = 4 * numel / MB
    results = []
    for name, row in table_rows.items():
        encode, decode = median(times[name]["encode"]), median(times[name]["decode"])
        assert encode is not None and decode is not None
        results.append(
            {
                "codec": name,
                **row,
                "encode_s_per_mb": encode / fp32_mb,
                "decode_s_per_mb": decode / fp32_mb,
                "round_trip_mb_per_s": fp32_mb / (encode + decode),
            }
        )
    print(f"codecs on {numel / 1e6:.1f}M fp32 values ({fp32_mb:.0f} MB), {a.threads} thread(s), {repeats} rounds")
    print(
        table(
            ["codec", "bits/value sent", "encode ms/MB", "decode ms/MB", "round trip MB/s", "relative error"],
            [
                [
                    r["codec"],
                    r["bits_per_value"],
                    1000 * r["encode_s_per_mb"],
                    1000 * r["decode_s_per_mb"],
                    r["round_trip_mb_per_s"],
                    r["relative_error"],
                ]
                for r in results
            ],
            digits=3,
        )
    )
    config = {"numel": numel, "repeats": repeats, "threads": a.threads, "tensor": "Student-t(3) x 1e-3"}
    write_result("codecs", {"config": config, "results": results}, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
