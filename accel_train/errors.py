"""The one exception type a user should ever see from the trainer."""


class TrainError(Exception):
    """Bad input or an unusable checkpoint: printed as one paragraph, exit status 1, no traceback.

    Raise it with a message that says what is wrong and what to do about it.
    """

    exit_code = 1


class UsageError(TrainError):
    """A command line or config the parser rejects (unknown flag, bad value): exit status 2, like argparse."""

    exit_code = 2


class Preempted(TrainError):
    """Stopped on SIGTERM/SIGUSR1 after writing a checkpoint: exit status 75 (EX_TEMPFAIL), "requeue me".

    launch/*.slurm requeue the job on this status; the rerun continues with --resume_from_checkpoint latest.
    """

    exit_code = 75
