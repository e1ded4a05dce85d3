"""Errors that are the user's to fix: the command-line tools print their message without a traceback."""


class UserError(Exception):
    """A mistake in configuration, data or checkpoints, with a message that names the problem and the fix."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not match the model it is loaded into."""
