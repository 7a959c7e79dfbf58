"""One kind of error for bad input: the entry points print it as one line and exit non-zero."""


class UserError(Exception):
    """Input the user can fix; the message names the fix."""

    exit_code = 2
