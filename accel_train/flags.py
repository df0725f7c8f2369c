"""Reading command-line flags before draccus parses them (to choose layers, types and spellings)."""

from __future__ import annotations


def flag_value(args: list[str], name: str) -> str | None:
    """The value of `--name=V` or `--name V` in args, the last one given, if any."""
    value = None
    for arg, following in zip(args, [*args[1:], None], strict=False):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and following is not None and not following.startswith("--"):
            value = following
    return value
