"""The one exception type that means "the user asked for something that cannot be done".

The CLI turns it into a single line on stderr and exit code 2; library users catch it like
any other exception. Problems with one image are never raised: they become error rows.
"""


class ImgsentError(Exception):
    """A bad argument, input list, model file or store, described in one sentence."""


class OutputClosed(Exception):
    """The reader of our output went away (``imgsent score ... --out - | head``): end quietly."""


class ImgsentWarning(UserWarning):
    """Something the user should know that does not stop the run (a directory with no images).
    The CLI prints it as one ``imgsent: warning:`` line."""


class UselessModelWarning(ImgsentWarning):
    """A trained model that may have learnt nothing (see :func:`imgsent.training.quality_warnings`)."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one line of at most ``limit`` characters: its type when its text is empty."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def last_line(exc: BaseException, limit: int = 200) -> str:
    """An exception raised by a model, as one line: its type and the last line of its message (a
    TorchScript error's message is the interpreter's traceback; the last line is what went
    wrong), at most ``limit`` characters."""
    import re

    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    named = re.match(r"(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception)): ", text)  # "builtins.RuntimeError: ..."
    if named:
        text = text[named.start(1) :]
    else:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:limit]
