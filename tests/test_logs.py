"""What a group's log holds by default (torchx_diloco.logs): no HTTP access line per heal, no torchft INFO lines
unless LOGLEVEL asks for them."""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import pytest
import torch

from torchx_diloco import logs


def test_the_checkpoint_servers_access_line_goes_to_logging_at_debug_not_to_stderr(capfd, caplog):
    """A real heal's transfer through torchft's HTTP transport: the state arrives, stderr stays empty, and the
    access line is a DEBUG record of torchft's logger (shown with LOGLEVEL=DEBUG)."""
    from torchft.checkpointing import HTTPTransport

    logs.quiet_libraries()
    caplog.set_level(logging.DEBUG, logger="torchft")
    server = HTTPTransport(timeout=timedelta(seconds=10), num_chunks=0)
    try:
        state = {"w": torch.arange(4.0)}
        server.send_checkpoint(dst_ranks=[], step=3, state_dict=state, timeout=timedelta(seconds=10))
        got = server.recv_checkpoint(src_rank=0, metadata=server.metadata(), step=3, timeout=timedelta(seconds=10))
    finally:
        server.shutdown()
    assert torch.equal(got["w"], state["w"])
    assert "GET /checkpoint" not in capfd.readouterr().err
    access = [r for r in caplog.records if '"GET /checkpoint/3/full HTTP/1.1" 200' in r.getMessage()]
    assert access and all(r.levelno == logging.DEBUG and r.name.startswith("torchft.") for r in access), [
        (r.name, r.levelname, r.getMessage()) for r in caplog.records
    ]


@pytest.mark.parametrize(
    "loglevel, rust_log, expected",
    [
        (None, None, "warn"),
        ("INFO", None, "info"),
        ("debug", None, "debug"),
        ("ERROR", None, "error"),
        ("INFO", "off", "off"),
    ],
)
def test_torchfts_rust_side_follows_loglevel_unless_rust_log_is_set(monkeypatch, loglevel, rust_log, expected):
    for name, value in (("LOGLEVEL", loglevel), ("RUST_LOG", rust_log)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    logs.quiet_libraries()
    assert os.environ["RUST_LOG"] == expected
