"""Newton–Schulz coefficient schedules.

A schedule is the list of quintic coefficients ``(a, b, c)`` applied one per iteration,
plus how the input is normalised before the first iteration:
``X / (‖X‖_F · norm_scale + eps)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

# Keller Jordan's quintic, also torch.optim.Muon's default: maximises the slope at zero.
QUINTIC = (3.4445, -4.7750, 2.0315)

# Amsel et al. 2025, "The Polar Express", 5-step table with safety factor 2e-2 as used by
# modded-nanogpt. Each step is optimal for the interval left by the previous one.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

NAMED_METHODS = ("quintic", "polar_express")

Method = Union[str, Sequence[Sequence[float]]]


@dataclass(frozen=True)
class Schedule:
    coefficients: tuple[tuple[float, float, float], ...]
    norm_scale: float
    eps: float

    @property
    def steps(self) -> int:
        return len(self.coefficients)


def resolve_schedule(method: Method, steps: int) -> Schedule:
    """Turn a method name (or a custom list of triples) and a step count into a Schedule.

    ``polar_express`` repeats its last (converged) triple when more than 5 steps are asked
    for. A custom list is used as given; ``steps`` must then equal its length or be None-like.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"ns_steps must be a positive integer, got {steps!r}")
    if isinstance(method, str):
        if method == "quintic":
            return Schedule((QUINTIC,) * steps, norm_scale=1.0, eps=1e-7)
        if method == "polar_express":
            table = POLAR_EXPRESS[:steps] + (POLAR_EXPRESS[-1],) * max(0, steps - len(POLAR_EXPRESS))
            return Schedule(table, norm_scale=1.02, eps=1e-6)
        raise ValueError(
            f"unknown ns_method {method!r}: use one of {NAMED_METHODS} or a list of (a, b, c) triples"
        )
    triples = tuple(_as_triple(t) for t in method)
    if not triples:
        raise ValueError("ns_method: a custom schedule needs at least one (a, b, c) triple")
    return Schedule(triples, norm_scale=1.0, eps=1e-7)


def _as_triple(t) -> tuple[float, float, float]:
    try:
        a, b, c = (float(x) for x in t)
    except (TypeError, ValueError) as e:
        raise ValueError(f"ns_method: custom schedule entries must be (a, b, c) triples, got {t!r}") from e
    if not all(math.isfinite(x) for x in (a, b, c)):
        raise ValueError(f"ns_method: coefficients must be finite, got {t!r}")
    return (a, b, c)
