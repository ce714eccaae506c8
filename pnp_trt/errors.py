"""The one exception type for user mistakes: the CLI prints it as a single line and exits 2."""


class PnPError(Exception):
    """A problem the user can fix (bad input, missing file, wrong setting); the message says how."""
