"""Setting one of the library's environment variables for a block (the backend override, debug
mode): both are read on every call, so a block sees its value and the caller's comes back after."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def environment_variable(name: str, value: str | None):
    """Run the block with os.environ[name] = value (None: unset), then restore what was there."""
    before = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
