"""What a group's log holds: torchx_diloco's INFO lines and the libraries' warnings, not their chatter.

Left alone, torchft's Rust side logs every quorum and commit at INFO (56 of the 81 lines of a short run of your
own loop), its HTTP checkpoint server writes a web-server access line per heal to stderr, and a CPU run repeats
two harmless messages at every heal. Asking for more is one environment variable:

- ``TORCHX_DILOCO_LOGLEVEL``: torchx_diloco's own lines (default INFO).
- ``LOGLEVEL``: the libraries' (torch, torchft's Python and Rust sides; default WARNING), the variable torchrun
  and TorchX read too. ``LOGLEVEL=INFO`` shows torchft's quorum lines, ``LOGLEVEL=DEBUG`` also its HTTP
  access lines. ``RUST_LOG``, when set, still rules torchft's Rust side.

:func:`configure_logging` is for programs (the trainer calls it first thing); :func:`quiet_libraries` is the
part a library may do inside someone else's program: it leaves the root logger alone. Both must run before
torchft is first imported: its Rust side reads ``RUST_LOG`` once, at import.
"""

from __future__ import annotations

import logging
import os
import warnings
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Union

LOGLEVEL_ENV = "TORCHX_DILOCO_LOGLEVEL"
LIBRARIES_LOGLEVEL_ENV = "LOGLEVEL"
_RUST_LEVELS = {"CRITICAL": "error", "FATAL": "error", "ERROR": "error", "WARN": "warn", "WARNING": "warn"}
_quiet = False


def libraries_level() -> str:
    return os.environ.get(LIBRARIES_LOGLEVEL_ENV, "WARNING").upper()


def quiet_libraries() -> None:
    """torchft's Rust side at the libraries' level, its HTTP access lines at DEBUG through :mod:`logging`, and
    the two harmless messages of a heal on CPU filtered. Idempotent."""
    global _quiet
    os.environ.setdefault("RUST_LOG", _RUST_LEVELS.get(libraries_level(), libraries_level().lower()))
    if _quiet:
        return
    _quiet = True
    BaseHTTPRequestHandler.log_request = _log_request  # type: ignore[method-assign]
    # torchft, after every quorum change on a torch built without NCCL (the CPU wheel): no NCCL trace to reset
    logging.getLogger("torchft.manager").addFilter(lambda r: "NCCL flight recorder" not in r.getMessage())
    # torch, on reading a healing peer's weights: they are only read (copied into our global weights)
    warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def configure_logging() -> None:
    """:func:`quiet_libraries`, then one format on stderr: our lines at ``TORCHX_DILOCO_LOGLEVEL``, the rest at
    ``LOGLEVEL``."""
    quiet_libraries()
    logging.basicConfig(level=libraries_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("torchx_diloco").setLevel(os.environ.get(LOGLEVEL_ENV, "INFO").upper())


_stdlib_log_request = BaseHTTPRequestHandler.log_request


def _log_request(self: BaseHTTPRequestHandler, code: Union[int, str] = "-", size: Union[int, str] = "-") -> None:
    """torchft's checkpoint server (a handler class it defines inside ``HTTPTransport``, with the standard
    library's access log on stderr): the line goes to torchft's logger at DEBUG. Other servers keep theirs."""
    module = type(self).__module__
    if not module.startswith("torchft."):
        _stdlib_log_request(self, code, size)
        return
    status: Any = code.value if isinstance(code, HTTPStatus) else code
    logging.getLogger(module).debug('%s "%s" %s %s', self.address_string(), self.requestline, status, size)
