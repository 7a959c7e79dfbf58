"""One kind of error for bad input: the entry points print it as one line and exit non-zero.

The same line goes into torchelastic's error file (the path in ``TORCHELASTIC_ERROR_FILE``), the "reply file"
TorchX reads a failed replica's message from: ``torchx run`` and ``torchx status`` then show the fix, not the
signal that ended the process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"


class UserError(Exception):
    """Input the user can fix; the message names the fix."""

    exit_code = 2


def write_error_file(path: str, message: str, exit_code: int) -> bool:
    """``message`` in torchelastic's error file layout (``ErrorHandler.record_exception``'s, with the exit code and
    without a traceback: bad input is not a bug); False if the file cannot be written."""
    record = {
        "message": {
            "message": message,
            "errorCode": exit_code,
            "extraInfo": {"timestamp": str(int(time.time()))},
        }
    }
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(record, f)
    except OSError:
        return False
    return True


def read_error_file(path: str) -> Optional[str]:
    """The message of a torchelastic error file (nested, as torchelastic writes it, or flat, as schedulers do)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    error = data.get("message") if isinstance(data, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return error if isinstance(error, str) else None


def report_error(prog: str, message: str, exit_code: int = UserError.exit_code) -> int:
    """Print ``<prog>: error: <message>`` on stderr, leave the message in this process's error file (when it has
    one) and return ``exit_code``."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        write_error_file(path, message, exit_code)
    return exit_code
