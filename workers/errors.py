"""Errors the engine raises. Their messages are shown to users as-is, so they say what to fix."""


class QuantFleetError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidSpecError(QuantFleetError, ValueError):
    """The job specification cannot be run (bad bits, group size, unknown architecture, ...)."""


class InputError(QuantFleetError):
    """An input (model directory, calibration or evaluation file) is missing, unsafe or unreadable."""


class JobCancelled(QuantFleetError):
    """The caller asked the job to stop; raised at the next layer boundary."""
