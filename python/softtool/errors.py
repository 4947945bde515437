"""User-facing errors: bad input that the command line reports in one line, without a traceback."""


class SofttoolError(Exception):
    """An error the user can fix (a bad path, a malformed file, a mismatched adapter).

    The message must name the offending file or option and say what to do; the CLI prints it as
    ``error: <message>`` and exits with status 2.
    """
