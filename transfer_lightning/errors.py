"""The one exception type for mistakes a user can fix (bad paths, files, names, values)."""


class UserInputError(ValueError):
    """Something in the user's config, data or files is wrong.

    The message says what was wrong and how to fix it; the command line prints it alone, without a
    traceback, and exits with status 2.
    """
