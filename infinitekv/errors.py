"""The one exception type users see.

Every failure a user can cause or fix (bad path, foreign archive, unsupported model, full disk) is raised as
`IKVError` with a one-line message naming the problem and the fix; the CLI prints it without a traceback.
"""


class IKVError(Exception):
    """A problem the user can act on; `str(err)` is one line saying what went wrong and what to do."""
