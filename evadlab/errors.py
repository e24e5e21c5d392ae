"""What a user sees of an error: its original cause, in one line.

Ray wraps an exception raised in a worker, actor or task: ``ray.get`` raises a ``RayTaskError`` whose ``cause`` is the
original, Ray Train raises a ``WorkerGroupError`` holding each failed worker's exception, and Ray Data wraps a failed
function in a ``UserCodeException`` whose own cause does not survive the trip back to the driver (only its text
does). :func:`original_error` digs the original out of all of them, so the command line can print the message the
code raised, as it would without Ray. :func:`is_user_error` and :func:`is_lost_process` tell bad input and a Ray
process that went away (killed, out of memory, a lost node) from a fault of evadlab. Ray is never imported here: an
error can only be Ray's when Ray is loaded.
"""

from __future__ import annotations

import re
import sys

# The line Python writes between two tracebacks of a chain; the text before it ends with the original error.
_CAUSE_SEPARATOR = "The above exception was the direct cause of the following exception:"
# "module.Class: message" (or "Class: message"), the last line of a formatted traceback.
_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(?P<kind>\w+): (?P<message>.*)$")
# Errors that mean bad input rather than a fault of evadlab (exit code 2): ValueError, OSError and evadlab's own kinds,
# by name, for errors of which only the text came back from Ray. tests/test_cli.py checks the names against the classes.
USER_ERROR_KINDS = frozenset({"ValueError", "OSError", "FileNotFoundError", "PermissionError", "IsADirectoryError",
                              "ConfigError", "TrackingError", "CheckpointError", "UnpreparedDataError"})
# Errors that mean a process or a machine went away under the command (a worker killed, out of memory, a node lost),
# neither bad input nor a fault of evadlab: Ray's own kinds (ray.exceptions, their subclasses by their MRO) and Ray
# Train's failed health check of a worker. tests/test_cli_errors.py kills real Ray workers.
LOST_PROCESS_KINDS = frozenset({"RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError",
                                "NodeDiedError", "LocalRayletDiedError", "OutOfMemoryError", "ObjectLostError",
                                "OwnerDiedError", "WorkerHealthCheckFailedError"})
# What Ctrl-C raises in the driver: KeyboardInterrupt, or, under Ray Train's own SIGINT handler, Ray's SystemExit.
INTERRUPTIONS = (KeyboardInterrupt, SystemExit)
# ANSI colour codes (ESC [ ... m), as Ray writes process names in its errors.
_TERMINAL_COLOURS = re.compile(r"\x1b\[[0-9;]*m")
# "pid: 11906" and "ip: 10.0.0.7" in the text of Ray's ActorDiedError.
_PROCESS_FIELDS = re.compile(r"\b(?P<key>pid|ip): (?P<value>\S+)")


class RemoteError(Exception):
    """An error raised in a Ray process of which only the text came back: ``kind`` is its class name."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def original_error(error: BaseException) -> BaseException:
    """The exception the code raised, out of the wrappers Ray puts around it (nested ones included); ``error`` itself
    when it is not Ray's."""
    for _ in range(20):  # wrappers nest a few deep; the bound only guards against a cycle
        inner = _wrapped(error)
        if inner is None or inner is error:
            return error
        error = inner
    return error


def _wrapped(error: BaseException) -> BaseException | None:
    """The exception directly inside one Ray wrapper, None for an exception that is not a wrapper."""
    failures = getattr(error, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return failures[min(failures)]  # Ray Train: the lowest failed rank
    if isinstance(getattr(error, "health_check_failure", None), BaseException):
        return error.health_check_failure  # Ray Train: the worker's process is gone (ActorDiedError)
    if isinstance(getattr(error, "controller_failure", None), BaseException):
        return error.controller_failure
    if getattr(error, "actor_init_failed", False):
        return _last_error_line(str(error))  # an actor's constructor raised: Ray keeps only its traceback's text
    ray_exceptions = sys.modules.get("ray.exceptions")
    if ray_exceptions is None:
        return None
    if isinstance(error, ray_exceptions.RayTaskError):
        if isinstance(error.cause, ray_exceptions.UserCodeException) and error.cause.__cause__ is None:
            return _error_in_text(str(error)) or error.cause
        return error.cause
    if isinstance(error, ray_exceptions.UserCodeException):
        return error.__cause__
    return None


def _error_in_text(text: str) -> RemoteError | None:
    """The original error named in the text of a chained traceback: the last line before Python's "direct cause"
    separator."""
    before, separator, _ = text.partition(_CAUSE_SEPARATOR)
    return _last_error_line(before) if separator else None


def _last_error_line(traceback_text: str) -> RemoteError | None:
    """The error a formatted traceback ends with ("module.Class: message"), None when its last line is none."""
    lines = [line.strip() for line in traceback_text.splitlines() if line.strip()]
    match = _ERROR_LINE.match(lines[-1]) if lines else None
    return RemoteError(match["kind"], match["message"]) if match else None


def one_line(error: BaseException) -> str:
    """The error's message on one line (whitespace runs and terminal colour codes, which Ray puts in its errors'
    texts, removed); the class name when the message is empty."""
    text = " ".join(_TERMINAL_COLOURS.sub("", str(error)).split())
    return text or type(error).__name__


def kind_of(error: BaseException) -> str:
    """The class name of the original error, also for one of which only the text came back."""
    return error.kind if isinstance(error, RemoteError) else type(error).__name__


def is_lost_process(error: BaseException) -> bool:
    """A Ray worker, actor or node that went away (killed, out of memory, its machine lost) rather than an error the
    code raised; an actor whose constructor raised is the constructor's error."""
    if getattr(error, "actor_init_failed", False):
        return False
    if isinstance(error, RemoteError):
        return error.kind in LOST_PROCESS_KINDS
    return any(kind.__name__ in LOST_PROCESS_KINDS for kind in type(error).__mro__)


def lost_process_line(error: BaseException) -> str:
    """``a Ray process was lost (ActorDiedError: The actor died unexpectedly before finishing this task; pid 11906,
    ip 10.0.0.7)``: the first sentence of Ray's message (the rest is its advice on the OOM killer, ``ray stop`` and
    log files, which Ray's own log line before it repeats) with the process and node it names."""
    text = " ".join(str(error).split())
    first = re.split(r"(?<=\.) ", text)[0].rstrip(".") if text else kind_of(error)
    where = ", ".join(f"{match['key']} {match['value']}" for match in _PROCESS_FIELDS.finditer(text))
    return f"a Ray process was lost ({kind_of(error)}: {first}{'; ' + where if where else ''})"


def is_user_error(error: BaseException) -> bool:
    """Bad input (a file, a value, a service the user named) rather than a fault of evadlab."""
    if isinstance(error, RemoteError):
        return error.kind in USER_ERROR_KINDS
    return any(kind.__name__ in USER_ERROR_KINDS for kind in type(error).__mro__)
