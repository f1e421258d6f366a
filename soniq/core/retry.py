"""Retry back-off: a pure function from the attempt number to a delay in seconds.

Randomness is passed in (a ``random.Random`` or any callable returning a float in
[0, 1)), so tests can pin it.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs


def _non_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen
class Backoff:
    """Exponential back-off with jitter: ``base * factor ** (attempt - 1)``, capped at
    ``cap`` seconds, then spread by up to ``jitter`` (a fraction) either way."""

    base: float = attrs.field(default=1.0, validator=_non_negative)
    factor: float = attrs.field(default=2.0, validator=_non_negative)
    cap: float = attrs.field(default=3600.0, validator=_non_negative)
    jitter: float = attrs.field(default=0.1, validator=_non_negative)

    def delay(self, attempt: int, random: Callable[[], float]) -> float:
        """Seconds to wait before run ``attempt + 1``, after run ``attempt`` failed.

        ``attempt`` counts from 1 (the first run). ``random()`` returns [0, 1).
        """
        if attempt < 1:
            raise ValueError(f"attempt counts from 1, got {attempt!r}")
        # Cap the exponent so huge attempt counts cannot overflow a float.
        raw = min(self.cap, self.base * self.factor ** min(attempt - 1, 64))
        spread = raw * self.jitter * (2.0 * random() - 1.0)
        return max(0.0, min(self.cap, raw + spread))


DEFAULT_BACKOFF = Backoff()
