"""The exception for input nbflash cannot take. Every layer that checks input raises it (the
shared checks in nbflash.inputs, each kernel family's own in its plan module), before any kernel
runs; it is importable as nbflash.InputError."""


class InputError(ValueError):
    """An input nbflash cannot take; the message names the argument and the problem."""
