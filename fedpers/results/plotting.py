"""Shared plot conventions: colour-blind-safe colours, integer round ticks, binomial error bars.

Categorical colours are Paul Tol's "muted" scheme (distinguishable under the common colour-vision
deficiencies; https://personal.sron.nl/~pault/), with viridis samples past its 9 colours; continuous
values use viridis. Accuracy axes start at 0, so the height of a bar or curve is the value itself.
"""

from __future__ import annotations

import math

TOL_MUTED = ["#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255", "#AA4499"]
GREY = "#DDDDDD"  # Tol's "no data" colour: used for the 10th category so the first nine stay distinct


def categorical(n: int) -> list:
    """n colour-blind-safe colours, in a fixed order (label k always gets colour k)."""
    if n <= len(TOL_MUTED):
        return TOL_MUTED[:n]
    if n == len(TOL_MUTED) + 1:
        return TOL_MUTED + [GREY]
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / max(1, n - 1)) for i in range(n)]


def integer_ticks(axis) -> None:
    """Only whole numbers on an axis of rounds (no 2.5)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def wilson(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy measured on n examples (n = 0: the whole [0, 1])."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    # The interval contains p exactly; at p = 0 or 1 rounding would otherwise leave p an ulp outside it.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))
