"""The one exception type a user should ever see from the trainer."""


class TrainError(Exception):
    """Bad input or an unusable checkpoint: printed as one paragraph, exit status 1, no traceback.

    Raise it with a message that says what is wrong and what to do about it.
    """

    exit_code = 1

    def __init__(self, message: str = ""):
        # Raised in a DataLoader worker, it is re-raised in the main process by PyTorch as type(error)(text), the
        # text being the worker's traceback, whose last line is "module.Class: message": keep the message.
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def first_line(error: Exception) -> str:
    """An exception as "Type: first line of its message", to quote inside one of ours."""
    cause = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {cause}" if cause else type(error).__name__


class UsageError(TrainError):
    """A command line or config the parser rejects (unknown flag, bad value): exit status 2, like argparse."""

    exit_code = 2


class Preempted(TrainError):
    """Stopped on SIGTERM/SIGUSR1 after writing a checkpoint: exit status 75 (EX_TEMPFAIL), "requeue me".

    launch/*.slurm requeue the job on this status; the rerun continues with --resume_from_checkpoint latest.
    """

    exit_code = 75
