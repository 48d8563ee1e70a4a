"""Choosing denoising steps: the one selector every API that takes ``steps=`` / ``step=`` uses.

A step index is a position on a Trace's step axis (``trace.timesteps``: one ``scheduler.step``
each), ``0 .. n_steps - 1``. A selection is one of

* ``None``: every step (every *recorded* step where only some hold data),
* an int: one step, negative counting from the end of the run (``-1``: the last step),
* a list / tuple / range / array of ints: those steps, in that order,
* a slice: ``range(n_steps)[spec]``.

Where only some steps hold data (attention maps recorded at ``RecordOptions(steps=...)``), each
chosen step must be one of them. Steering's ``(start, end)`` step window (:func:`step_window`)
is checked here too.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

FORMS = ("None (all), an int (negative counts from the end), a list/range of ints or a slice")


class StepError(ValueError, IndexError):
    """A step out of range, not recorded, or a selection that picks none. Both a ValueError and
    an IndexError (as numpy's AxisError is), so either ``except`` catches it."""


def _int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def select_steps(spec: Any, n_steps: int, recorded: Sequence[int] | None = None,
                 name: str = "steps") -> list[int]:
    """Step indices (``0 .. n_steps - 1``, in the order given) that ``spec`` chooses.

    Args:
        spec: None, an int, a list / tuple / range / array of ints, or a slice (see the module
            docstring).
        n_steps: the number of steps of the run.
        recorded: the steps that hold data; None: all of them. ``spec=None`` picks these.
        name: the argument's name, for messages.

    Raises:
        TypeError: ``spec`` is none of the allowed forms.
        StepError: a step outside ``-n_steps .. n_steps - 1``, a step not in ``recorded``, or a
            selection that picks no step.
    """
    n = int(n_steps)
    if spec is None:
        return [int(s) for s in recorded] if recorded is not None else list(range(n))
    if _int(spec):
        chosen = [int(spec)]
    elif isinstance(spec, slice):
        chosen = list(range(n))[spec]
    elif isinstance(spec, (list, tuple, range)) or hasattr(spec, "tolist"):  # arrays, tensors
        items = spec.tolist() if hasattr(spec, "tolist") else list(spec)
        items = items if isinstance(items, list) else [items]
        bad = [s for s in items if not _int(s)]
        if bad:
            raise TypeError(f"{name} must be {FORMS}; got the non-int {bad[0]!r} in {spec!r}")
        chosen = [int(s) for s in items]
    else:
        raise TypeError(f"{name} must be {FORMS}; got {type(spec).__name__} {spec!r}")
    out = []
    for s in chosen:
        if not -n <= s < n:
            raise StepError(f"{name}: step {s} is out of range for this run of {n} steps "
                            f"(0..{n - 1}, or -{n}..-1 from the end)")
        s %= n
        if recorded is not None and s not in recorded:
            raise StepError(f"{name}: step {s} was not recorded; recorded steps: "
                            f"{_show(recorded)}")
        out.append(s)
    if not out:
        raise StepError(f"{name}={spec!r} selects no step of this run of {n} steps")
    return out


def select_step(step: Any, n_steps: int, recorded: Sequence[int] | None = None,
                name: str = "step") -> int:
    """One step index: ``step`` must be an int (negative counts from the end); see
    :func:`select_steps` for the checks. TypeError for anything else."""
    if not _int(step):
        raise TypeError(f"{name} must be an int (negative counts from the end), got "
                        f"{type(step).__name__} {step!r}")
    return select_steps(step, n_steps, recorded, name)[0]


def _show(steps: Sequence[int]) -> str:
    steps = [int(s) for s in steps]
    if len(steps) <= 20:
        return str(steps)
    return f"{steps[0]}..{steps[-1]} ({len(steps)} steps)"


def step_window(spec: Any) -> tuple | None:
    """Steering's step window, checked: None (every step), or ``(start, end)`` with end
    exclusive and None for an open end, as step indices (ints ``>= 0``) or as fractions of the
    run (floats in ``[0, 1]``). Returns ``(start, end)`` with ints or floats; ValueError else."""
    if spec is None:
        return None
    try:
        start, end = spec
    except (TypeError, ValueError):
        raise ValueError(f"steps must be (start, end), e.g. (0, 10) or (0.0, 0.5); got "
                         f"{spec!r}") from None
    for v in (start, end):
        if v is not None and (isinstance(v, bool)
                              or not isinstance(v, (int, float, np.integer, np.floating))):
            raise ValueError(f"steps must be (start, end) numbers or None; got {spec!r}")
    if any(isinstance(v, (float, np.floating)) for v in (start, end)):
        start, end = (None if v is None else float(v) for v in (start, end))
        if not all(v is None or 0.0 <= v <= 1.0 for v in (start, end)):
            raise ValueError(f"steps: fractions of the run must lie in [0, 1]; got {spec!r}")
    else:
        start, end = (None if v is None else int(v) for v in (start, end))
        if (start is not None and start < 0) or (end is not None and end < 0):
            raise ValueError(f"steps: step indices must be >= 0; got {spec!r}")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"steps {spec!r}: the range is empty (end <= start)")
    return (start, end)
