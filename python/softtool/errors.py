"""User-facing errors: bad input that the command line reports in one line, without a traceback."""


class SofttoolError(Exception):
    """An error the user can fix (a bad path, a malformed file, a mismatched adapter).

    The message must name the offending file or option and say what to do; the CLI prints it as
    ``error: <message>`` and exits with status 2.
    """


class SofttoolWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it as ``warning: <message>``)."""


def written_by(version: object) -> str:
    """'written by softtool X', from the version a refused file recorded, for the refusal message. Every file
    of softtool up to 0.2.0 recorded its version; a file without one is not softtool's, or was edited."""
    if isinstance(version, str) and version:
        return f"written by softtool {version}"
    return "no softtool version recorded"
