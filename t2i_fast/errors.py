"""The one exception type for mistakes a user can fix: the CLI prints it as a single line and exits 2."""


class UserError(Exception):
    """Bad input (a missing folder, a corrupt image, an unknown option). The message names the culprit
    and the fix, in one sentence."""
