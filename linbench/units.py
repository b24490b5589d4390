"""Every parser and formatter of lengths, counts, bytes and times, in one place.

Two conventions, kept apart on purpose:
- token *counts* (budgets) are decimal: 50k = 50,000, 2M = 2,000,000;
- sequence *lengths* are binary: 2k = 2,048, 2M = 2,097,152 (the field's 2K..2M sweeps).

Imports nothing of linbench and no torch, so the CLI can parse flags with it.
"""
from __future__ import annotations

import re

_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
_COUNT = re.compile(r"^(\d+(?:\.\d+)?)([kmbg]?)$", re.IGNORECASE)
_BINARY = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_LENGTH = re.compile(r"^(\d+)([kmg]?)$", re.IGNORECASE)
SEQLEN_FORMS = "e.g. '2k,8k,1M', '4096' or a power-of-two range '2k..2M'"


def parse_count(text: str) -> int:
    """'50000', '50k', '1.5M', '2B' -> a decimal count. Raises ValueError(text)."""
    m = _COUNT.match(text.strip())
    if not m:
        raise ValueError(text)
    return int(round(float(m.group(1)) * _DECIMAL[m.group(2).lower()]))


def parse_length(token: str) -> int:
    """'4096', '2k', '1M' -> a binary sequence length (k = 1024)."""
    m = _LENGTH.match(token.strip())
    if not m or int(m[1]) == 0:
        raise ValueError(f"malformed sequence length {token.strip()!r}: expected a positive "
                         f"integer with an optional k/M/G suffix (x1024), {SEQLEN_FORMS}")
    return int(m[1]) * _BINARY[m[2].lower()]


def parse_lengths(text: str) -> list[int]:
    """'2k,8k,1M' -> [2048, 8192, 1048576]; 'a..b' -> the powers of two from a to b.

    Suffixes are binary (k = 1024, M = 1024**2). Raises ValueError naming the bad part.
    """
    if not text or not text.strip():
        raise ValueError(f"empty sequence length list: {SEQLEN_FORMS}")
    out: list[int] = []
    for item in text.split(","):
        if ".." in item:
            lo_s, _, hi_s = item.partition("..")
            lo, hi = parse_length(lo_s), parse_length(hi_s)
            if lo & (lo - 1) or hi & (hi - 1):
                raise ValueError(f"range {item.strip()!r}: both ends must be powers of two "
                                 f"({SEQLEN_FORMS})")
            if lo > hi:
                raise ValueError(f"range {item.strip()!r}: start is larger than end "
                                 f"({SEQLEN_FORMS})")
            out += [1 << e for e in range(lo.bit_length() - 1, hi.bit_length())]
        else:
            out.append(parse_length(item))
    return list(dict.fromkeys(out))  # drop repeats, keep order


def fmt_len(T: int) -> str:
    """Exact binary lengths: 2048 -> 2K, 1048576 -> 1M, 1536 -> 1536."""
    for unit, n in (("M", 1 << 20), ("K", 1 << 10)):
        if T >= n and T % n == 0:
            return f"{T // n}{unit}"
    return str(T)


def fmt_len_short(n: int) -> str:
    """Axis labels: 1024 -> 1k, 1536 -> 1.5k, 100 -> 100."""
    return f"{n / 1024:g}k" if n >= 1024 and (n * 2) % 1024 == 0 else str(n)


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def fmt_count(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.4g}" if isinstance(n, float) else str(n)


def fmt_rate(x: float) -> str:
    """Throughputs: 12345 -> 12.3K."""
    for unit, n in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= n:
            return f"{x / n:.3g}{unit}"
    return f"{x:.3g}"


def fmt_ms(ms: float) -> str:
    return f"{ms:,.0f} ms" if ms >= 1000 else f"{ms:.3g} ms"


def fmt_duration(seconds: float) -> str:
    """Estimates and elapsed times: 42 s, 35 min, 2.1 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
