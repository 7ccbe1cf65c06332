"""The two kinds of failure the CLI reports as one line instead of a traceback.

`UserError`: the input is wrong (a config key or value, a data set, a model or checkpoint
file); the message names the file or key and the fix; exit status 2. `RunError`: the input
was fine but the run cannot go on (a training loss that became non-finite); exit status 1.
Anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input; the message names the file or key and the fix."""


class RunError(RuntimeError):
    """A run that stopped for a reason that is not the user's input; nothing was written."""
