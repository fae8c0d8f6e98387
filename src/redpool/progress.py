"""Progress bars for long command-line work: `dead requeue`, `dead purge`, `enqueue --from`.

tqdm draws them (a well-kept library: rate, ETA, terminal width and redraw throttling
are its business, not ours), on stderr, and only where a person watches: when stderr
is a terminal and there is enough work to be worth a bar (MIN_ITEMS).  Scripts, CI and
pipes get no bar and no escape codes.  The bar is erased when the work is done
(``leave=False``), so what stays on the screen is the command's one summary line,
the same with or without a terminal.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, TextIO

MIN_ITEMS = 500   # fewer items take well under a second: a bar would only flash


def bar(total: int | None, desc: str, unit: str = "job", stream: TextIO | None = None, *,
        iterable: Iterable | None = None, delay: float = 0.0) -> Any:
    """A tqdm bar over ``total`` items (``update(n)``, ``close()``; a context manager; or
    an iterator over ``iterable``), disabled (drawing nothing) unless ``stream``
    (stderr) is a terminal.  ``total`` None: a count of unknown end, drawn only once
    the work has taken ``delay`` seconds (so a short input never flashes one)."""
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    show = (total is None or total >= MIN_ITEMS) and _is_terminal(stream)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, disable=not show,
                leave=False, dynamic_ncols=True, mininterval=0.1, delay=delay)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False
