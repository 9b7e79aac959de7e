"""One ValueError that lists everything wrong with a user's data at once."""

from __future__ import annotations

LISTED = 20  # problems named in the message, then how many more there are


def listing_error(header: str, problems: list[str]) -> ValueError:
    """``header`` (e.g. "3 bad annotation(s) in DIR"), the first ``LISTED`` problems one per
    line, and what to do."""
    lines = [f"  {p}" for p in problems[:LISTED]]
    if len(problems) > LISTED:
        lines.append(f"  ... and {len(problems) - LISTED} more")
    return ValueError(f"{header}:\n" + "\n".join(lines) + "\nFix or remove them, then run again.")
