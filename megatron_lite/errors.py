"""The one base class for errors a user can fix (bad config, data, checkpoint, tokenizer, ...).

Every command and tool catches ``UserError`` once and prints ``error: <message>`` with exit code 2;
anything else is a bug and keeps its traceback. Each subclass keeps a builtin base as well
(ValueError, RuntimeError) so callers that catch those keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names what is wrong, where (file, line, key) and the fix, in one line."""
