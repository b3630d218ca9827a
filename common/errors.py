"""Errors that mean "the user's input is wrong", shown as one line with exit code 2.

Raised anywhere in patchscope; the command line (`patchscope.cli.common.user_errors`) turns
every `InputError` into a message without a traceback.
"""


class InputError(ValueError):
    """Bad user input: a missing path, an empty folder, an unreadable image, a wrong file kind."""


class CheckpointError(InputError):
    """A checkpoint that is missing, of an unknown format, truncated, or refused as unsafe."""


class DatasetError(InputError):
    """A dataset folder or its inputs that cannot be used as asked: a manifest that disagrees with
    the request (other generator, options, seed or size), a missing source, no readable images."""
