"""PIN copies as bytearrays: made without intermediate copies, wiped in place."""

from __future__ import annotations

from ._errors import PinError


def wipe(pin: bytearray | None) -> None:
    """Overwrite a PIN copy with zeros, in place (its size does not change,
    so the buffer is not moved)."""
    if pin is not None:
        pin[:] = bytes(len(pin))


def utf8_into(text: str, *, nul: bool = False) -> bytearray:
    """``text`` encoded as UTF-8 straight into one bytearray of the exact
    size (one more, a NUL, with ``nul``): ``str.encode`` would leave a bytes
    copy that cannot be wiped.  A lone surrogate raises PinError."""
    codes = [ord(c) for c in text]
    size = sum(1 if c < 0x80 else 2 if c < 0x800 else 3 if c < 0x10000 else 4 for c in codes)
    out = bytearray(size + 1 if nul else size)
    i = 0
    for c in codes:
        if c < 0x80:
            out[i] = c
            i += 1
        elif c < 0x800:
            out[i : i + 2] = bytes((0xC0 | c >> 6, 0x80 | c & 0x3F))
            i += 2
        elif c < 0x10000:
            if 0xD800 <= c < 0xE000:
                wipe(out)
                raise PinError("the PIN contains a lone surrogate character, which is not Unicode text")
            out[i : i + 3] = bytes((0xE0 | c >> 12, 0x80 | c >> 6 & 0x3F, 0x80 | c & 0x3F))
            i += 3
        else:
            out[i : i + 4] = bytes((0xF0 | c >> 18, 0x80 | c >> 12 & 0x3F, 0x80 | c >> 6 & 0x3F, 0x80 | c & 0x3F))
            i += 4
    codes[:] = [0] * len(codes)
    return out
