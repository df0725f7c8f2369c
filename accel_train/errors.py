"""The one exception type a user should ever see from the trainer."""


class TrainError(Exception):
    """Bad input or an unusable checkpoint: printed as one paragraph, exit status 1, no traceback.

    Raise it with a message that says what is wrong and what to do about it.
    """

    exit_code = 1


class UsageError(TrainError):
    """A command line or config the parser rejects (unknown flag, bad value): exit status 2, like argparse."""

    exit_code = 2
