"""Errors that mean "the user's input is wrong", shown as one line with exit code 2.

Raised anywhere in the core; `cli.py` turns them into a message without a traceback.
"""


class InputError(ValueError):
    """Bad user input: a missing path, an empty folder, an unreadable image, a wrong file kind."""
