"""The one exception type the CLI turns into a clear one-line message and exit code 2."""


class LayergeoError(Exception):
    """Bad input from the user: the message says what is wrong and how to fix it."""
