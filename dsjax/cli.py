"""How the command-line tools report errors (`experiments/train.py`, `experiments/generate.py`,
`python -m dsjax.convert` / `dsjax-convert`).

A bad input (a missing or malformed file, an invalid config value, an unknown config key, a bad flag)
is reported as one line on stderr, `error: <what>, in <where>`, with exit status 2 (`EXIT_BAD_INPUT`);
with `--verbose` the full traceback is printed instead, still with status 2. An expected failure that
is not bad input (a training run stopped by a NaN loss) is one `error:` line with status 1
(`EXIT_FAILURE`). Anything else is treated as a bug: the exception propagates with its traceback
(Python exits with status 1).

This module sits at the bottom of the package: it imports nothing from dsjax (the tools pass in
their own error types) and imports absl only when an absl app asks for it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

__all__ = [
    "ArgumentParser",
    "BAD_INPUT_ERRORS",
    "EXIT_BAD_INPUT",
    "EXIT_FAILURE",
    "error_line",
    "flag_value",
    "is_bad_input",
    "parse_absl_flags",
    "run_main",
]

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2

# ValueError covers json.JSONDecodeError, UnicodeDecodeError and dsjax's CheckpointFormatError
# (dsjax/hf/safetensors_io.py), which subclass it. KeyError is decided by `is_bad_input`.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)

_TRACEBACK = "Traceback (most recent call last):"


def _raised_in_ml_collections(error: BaseException) -> bool:
    """Whether the innermost frame of `error`'s traceback is ml_collections code (a ConfigDict
    lookup, a `--config.x=` override, a config file it could not load)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).startswith("ml_collections")


def _config_key_error(error: BaseException) -> bool:
    """A KeyError from a ConfigDict lookup (ConfigDict raises AttributeError(KeyError) for
    `config.missing`)."""
    if isinstance(error, AttributeError):
        if not (error.args and isinstance(error.args[0], KeyError)):
            return False
    elif not isinstance(error, KeyError):
        return False
    return _raised_in_ml_collections(error)


def _deliberate_key_error(error: BaseException) -> bool:
    """A KeyError raised with a sentence (`tensor 'x' not found in the checkpoint`), as opposed to
    a failed `mapping[key]` lookup, whose argument is the bare key."""
    return (isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str)
            and " " in error.args[0].strip())


def is_bad_input(error: BaseException, errors: tuple[type[BaseException], ...] = BAD_INPUT_ERRORS) -> bool:
    """Whether `error` reports bad input rather than a bug: an instance of `errors`, a KeyError for
    a config key (a ConfigDict lookup) or one raised with a message naming what is missing, or a
    config file that ml_collections could not load."""
    if isinstance(error, errors) or _config_key_error(error) or _deliberate_key_error(error):
        return True
    return isinstance(error, OSError) and _raised_in_ml_collections(error)


def _message(error: BaseException) -> str:
    if _config_key_error(error):
        key_error = error.args[0] if isinstance(error, AttributeError) else error
        text = str(key_error.args[0]) if key_error.args else ""
        # ConfigDict's message is the quoted key, maybe followed by "Did you mean ...?".
        quoted = re.match(r"'([^']*)'\s*(.*)", text, re.DOTALL)
        if quoted:
            hint = quoted.group(2).strip()
            return f"no such config key {quoted.group(1)!r}" + (f" ({hint})" if hint else "")
        return text
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]  # str(KeyError) would quote it
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        name = f"{error.filename} -> {error.filename2}" if error.filename2 is not None else f"{error.filename}"
        return f"{name}: {error.strerror[:1].lower()}{error.strerror[1:]}"
    if isinstance(error, OSError) and _raised_in_ml_collections(error) and error.__cause__ is not None:
        return _message(error.__cause__)  # "Configuration is not available because of ...": the cause
    return str(error) or type(error).__name__


def _one_line(text: str) -> str:
    """`text` on one line; an embedded traceback (ml_collections puts one in a config file's error)
    is shortened to its last line, the exception."""
    head, found, trace = text.partition(_TRACEBACK)
    if found:
        lines = [line for line in trace.splitlines() if line.strip()]
        text = head + (" " + lines[-1] if lines else "")
    return " ".join(text.split())


def _mentions(message: str, where: str) -> bool:
    """Whether `message` already names the path `where` (as given, normalised or absolute)."""
    candidates = {where, os.path.normpath(where), os.path.abspath(where), os.path.realpath(where)}
    return any(re.search(r"(?<![\w./-])" + re.escape(c) + r"(?![\w-])", message) for c in candidates if c)


def _located(message: str) -> bool:
    """Whether `message` starts by saying what it is about: a path or an option (`/out: ...`,
    `--mesh x: ...`)."""
    return re.match(r"(/|\./|\.\./|~/|--?\w)", message) is not None


def error_line(error: BaseException, where: str | None = None) -> str:
    """`error: <message>, in <where>` on one line; `where` (the config file, checkpoint or argument
    the error concerns) is left out when the message already names it, or starts with another path
    or option it is about."""
    message = _one_line(_message(error))
    if where and not _mentions(message, where) and not _located(message):
        message = f"{message.rstrip('.')}, in {where}"
    return f"error: {message}"


def run_main(main: Callable[[], int | None], *, verbose: bool, where: str | None = None,
             errors: tuple[type[BaseException], ...] = BAD_INPUT_ERRORS,
             failures: tuple[type[BaseException], ...] = ()) -> int:
    """Call `main()` and return its exit status (None: 0).

    A bad input (`is_bad_input(error, errors)`) is printed as one `error_line` on stderr, or with
    `verbose` as its traceback, and returns `EXIT_BAD_INPUT` (2). An instance of `failures` (an
    expected failure that is not bad input, such as a NaN loss) is reported the same way and returns
    `EXIT_FAILURE` (1). Any other exception propagates: it is a bug, and its traceback is wanted.
    """
    try:
        status = main()
    except Exception as e:  # noqa: BLE001 (re-raised unless it is bad input or an expected failure)
        if isinstance(e, failures):
            status = EXIT_FAILURE
        elif is_bad_input(e, errors):
            status = EXIT_BAD_INPUT
        else:
            raise
        sys.stdout.flush()
        if verbose:
            traceback.print_exception(e, file=sys.stderr)
        else:
            print(error_line(e, where), file=sys.stderr)
        sys.stderr.flush()
        return status
    return 0 if status is None else int(status)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a usage error reported as one `error: ...` line (exit status 2, as argparse
    does) instead of the usage text and `prog: error: ...`; `--help` shows the usage. Subparsers
    made with `add_subparsers` are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {_one_line(message)}\n")


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value given to `--name` (or `-name`) in `argv`, as `--name=VALUE` or `--name VALUE`; the
    last one wins; None when absent. Reads argv without parsing the flags."""
    value = None
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--":
            break
        match = re.fullmatch(r"--?" + re.escape(name) + r"(=(.*))?", arg, re.DOTALL)
        if match and match.group(1) is not None:
            value = match.group(2)
        elif match and i + 1 < len(args):
            value = args[i + 1]
    return value


def _bool_flag(argv: Sequence[str], name: str) -> bool:
    """An absl boolean flag's value in `argv` (`--name`, `--noname`, `--name=true/false`) without
    parsing the flags: what `--verbose` says before the flags are known to parse."""
    value = False
    for arg in argv:
        if arg == "--":
            break
        match = re.fullmatch(r"--?(no)?" + re.escape(name) + r"(=(.*))?", arg)
        if match and match.group(2) is not None and not match.group(1):
            value = match.group(3).lower() in ("true", "t", "1", "yes", "y")
        elif match and match.group(2) is None:
            value = not match.group(1)
    return value


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def parse_absl_flags(argv: list[str], *, config_flag: str | None = None) -> list[str]:
    """Parse absl's FLAGS from `argv` for `app.run(main, flags_parser=...)`: a bad command line is
    one `error:` line and exit status 2 (absl's own parser prints usage and exits with 1).

    Flag errors (`flags.Error`, `app.UsageError`), a bad `--config.key=value` override (an unknown key,
    a value of the wrong type) and a config file that cannot be loaded (missing, unreadable, a syntax
    error in it, its `get_config()` raising ValueError/TypeError) count as bad input; `--verbose` (read
    from argv, since the flags did not parse) prints the traceback instead. `config_flag` names an
    ml_collections config-file flag: its file must exist, and it is where errors point.
    """
    from absl import app, flags  # noqa: PLC0415 (only absl apps pay for the import)

    config_file = flag_value(argv, config_flag) if config_flag else None
    path = (config_file or "").split(":", 1)[0]  # FILE[:ARGUMENT]
    remaining: list[str] = []

    def require_config_file():
        # ml_collections defers a missing config file until the config is used (or an override is
        # applied to it); name the file instead.
        if path and not os.path.isfile(path):
            raise flags.IllegalFlagValueError(f"--{config_flag}={config_file}: no such config file")

    def parse():
        try:
            remaining.extend(flags.FLAGS(argv))
        except Exception as e:
            require_config_file()  # the root cause of whatever parsing raised
            if isinstance(e, SyntaxError) and path and e.filename and _same_path(e.filename, path):
                raise flags.IllegalFlagValueError(f"--{config_flag}={config_file}: {e}") from e
            raise
        require_config_file()

    status = run_main(parse, verbose=_bool_flag(argv[1:], "verbose"), where=config_file,
                      errors=BAD_INPUT_ERRORS + (flags.Error, app.UsageError))
    if status:
        sys.exit(status)
    return remaining
