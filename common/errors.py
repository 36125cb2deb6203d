"""The one error type for mistakes a user can fix.

Every such error in `common/` (a bad config value, a missing file, an unreadable slide, a patch set
without its keys, ...) is a `UserError` or a subclass named after its module (`SlideError`,
`StainError`, ...). The command line (`common.cli.run`) prints it as one line and exits with status 2;
anything else is a bug (a traceback, exit 1).
"""


class UserError(ValueError):
    """A mistake the user can fix (bad config, missing input, unusable data): one line, exit 2."""
