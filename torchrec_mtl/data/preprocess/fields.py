"""The field rules of parse.py (polars' readings of integers, tokens and numbers) as TorchScript functions, for the
exported serve.pt (torchrec_mtl.serving), which cannot call polars: change one, change the other
(tests/test_serving.py compares them on random text).

Each returns whether the text is what its column reads, and the value polars gives it. TorchScript has no
try/except and its ``int()``/``float()`` accept what polars refuses (a leading space, ``0x10``) and throw on
overflow, so every text is checked here before they see it. Strings are UTF-8 bytes in TorchScript: any non-ASCII
byte fails every check, as polars refuses non-ASCII digits.

Example::

    >>> parse_token("00ecd93f", True), parse_decimal("+007"), parse_number("1.e5")  # doctest: +SKIP
    ((True, 15521087), (True, 7), (1, 100000.0))
"""

# No "from __future__ import annotations": TorchScript compiles these functions from their annotations.
from typing import List, Tuple

# What predict reads and these functions refuse (serve.pt's manifest lists them): a row not valid, never scored apart.
NOT_VALID_HERE = [
    "a binary label written as a non-zero number below 1e-307 (polars reads some as 0: float64 underflow)",
]


def parse_decimal(text: str) -> Tuple[bool, int]:
    """A base-10 integer as polars' ``str.to_integer`` reads it (Rust's ``i64::from_str_radix``): an optional sign,
    ASCII digits only (no space, no ``_``), within int64. ``(False, 0)`` otherwise.

    >>> parse_decimal("+007"), parse_decimal(" 7"), parse_decimal("9223372036854775808")  # doctest: +SKIP
    ((True, 7), (False, 0), (False, 0))
    """
    negative = text.startswith("-")
    digits = text[1:] if negative or text.startswith("+") else text
    if not digits.isdigit():  # False for "" too; TorchScript's isdigit is ASCII-only, as Rust's radix digits
        return False, 0
    significant = digits.lstrip("0")
    limit = "9223372036854775808" if negative else "9223372036854775807"
    if len(significant) > 19 or (len(significant) == 19 and significant > limit):
        return False, 0
    return True, int(text)  # validated first: int() would accept a leading space and throw on overflow


def parse_token(text: str, hexadecimal: bool) -> Tuple[bool, int]:
    """A non-empty categorical token as preprocessing reads it: polars' ``str.to_integer`` in base 16 or 10, with no
    ``+`` and no negative value (``-0`` reads as 0 there, so it does here).

    >>> parse_token("00ecd93f", True), parse_token("+1", True), parse_token("-0", False)  # doctest: +SKIP
    ((True, 15521087), (False, 0), (True, 0))
    """
    if text.startswith("-"):
        zeros = text[1:]
        return zeros != "" and zeros.lstrip("0") == "", 0
    if text.startswith("+"):
        return False, 0
    if not hexadecimal:
        return parse_decimal(text)
    significant = text.lstrip("0")
    if text == "" or len(significant) > 16 or (len(significant) == 16 and significant[0] > "7"):
        return False, 0  # over int64 (TorchScript's len counts bytes: any non-ASCII byte fails below anyway)
    value = 0
    for digit in significant:  # bytes: a non-ASCII character is no hex digit
        position = "0123456789abcdefABCDEF".find(digit)
        if position < 0:
            return False, 0
        value = value * 16 + (position if position < 16 else position - 6)
    return True, value


# parse_list's status: the list is read, or the reason preprocessing rejects the row for it (parse.REASONS)
LIST_READ = 0
LIST_ELEMENT_EMPTY = 1  # "list element empty"
LIST_ELEMENT_NOT_TOKEN = 2  # "list element not hex" / "list element not id"


def parse_list(text: str, separator: str, hexadecimal: bool) -> Tuple[int, List[int]]:
    """A list column's field as preprocessing reads it (``parse._list_rules``): the empty field is the empty list;
    otherwise the elements between ``separator``s, each a token as ``parse_token`` reads a categorical. Returns
    (``LIST_READ``, every token, in order: truncation is the caller's, after all of them are checked, as in
    preprocessing) or the reason's status with no tokens; an empty element (``a||b``, a leading or trailing
    separator) is ``LIST_ELEMENT_EMPTY`` before any element is read as a token, as polars tries that reason first.

    >>> parse_list("", "|", True), parse_list("0a|ff", "|", True), parse_list("1||2", "|", False)  # doctest: +SKIP
    ((0, []), (0, [10, 255]), (1, []))
    """
    # the statuses as literals: TorchScript does not read the module's constants
    tokens: List[int] = []
    if text == "":
        return 0, tokens
    elements = text.split(separator)
    for element in elements:
        if element == "":
            return 1, tokens
    for element in elements:
        ok, value = parse_token(element, hexadecimal)
        if not ok:
            return 2, []
        tokens.append(value)
    return 0, tokens


def parse_number(text: str) -> Tuple[int, float]:
    """A non-empty field as polars' ``cast(pl.Float64)`` reads it, when finite: ``[+-]? (d+ [.d*] | .d+) ([eE]
    [+-]? d+)?``. Returns (0, 0.0) when it is not such a number or its magnitude is at least 1e39 (every use then
    rejects it: not finite in float32); (1, value) in float64's normal range, converted by strtod (correctly
    rounded, as polars); (2, +-0.0) below 1e-307, where strtod reports an underflow and polars gives a float64
    that is 0 once in float32. Words (``inf``, ``nan``) are (0, 0.0): no rule accepts a non-finite number.

    >>> parse_number("1.e5"), parse_number("1e39"), parse_number("-1e-400"), parse_number(" 1")  # doctest: +SKIP
    ((1, 100000.0), (0, 0.0), (2, -0.0), (0, 0.0))
    """
    lowered = text.lower()
    mantissa, exponent_text = lowered, "0"
    at = lowered.find("e")
    if at >= 0:
        mantissa, exponent_text = lowered[:at], lowered[at + 1 :]
    negative = mantissa.startswith("-")
    if negative or mantissa.startswith("+"):
        mantissa = mantissa[1:]
    signed = exponent_text.startswith("-") or exponent_text.startswith("+")
    exponent_digits = exponent_text[1:] if signed else exponent_text
    if not exponent_digits.isdigit():
        return 0, 0.0
    parts = mantissa.split(".")
    whole, fraction = parts[0], (parts[1] if len(parts) == 2 else "")
    if len(parts) > 2 or whole + fraction == "" or not (whole + fraction).isdigit():
        return 0, 0.0
    # the decimal exponent of the leading significant digit decides the range before strtod sees the text
    significant_whole, significant_fraction = whole.lstrip("0"), fraction.lstrip("0")
    if significant_whole == "" and significant_fraction == "":
        return 1, _signed_zero(negative)  # zero, whatever the exponent ("-0" is -0.0 in polars too)
    if significant_whole != "":
        leading = len(significant_whole) - 1
    else:
        leading = -(len(fraction) - len(significant_fraction)) - 1
    exponent_digits, exponent = exponent_digits.lstrip("0"), 0
    if len(exponent_digits) > 18:  # saturated (int() would throw): no field holds enough digits to make up for it
        exponent = 1_000_000_000_000_000_000
    elif exponent_digits != "":
        exponent = int(exponent_digits)
    if exponent_text.startswith("-"):
        exponent = -exponent
    if leading + exponent > 38:
        return 0, 0.0
    if leading + exponent < -307:
        return 2, _signed_zero(negative)
    return 1, float(text)


def _signed_zero(negative: bool) -> float:
    # computed: TorchScript pools equal constants, and -0.0 == 0.0, so a literal -0.0 may come out as 0.0
    return (-1.0 if negative else 1.0) * 0.0


def label_ok(text: str, binary: bool) -> bool:
    """A label that is there: 0 or 1 (any spelling polars reads as such), or a number finite in float32."""
    status, value = parse_number(text)
    if binary:
        return status == 1 and (value == 0.0 or value == 1.0)  # status 2 is the corner in NOT_VALID_HERE
    return status == 2 or (status == 1 and finite_in_float32(value))


def finite_in_float32(value: float) -> bool:
    """A finite float64 within float32's range (np.finfo(np.float32).max), as preprocessing checks: 1e39 is not."""
    return abs(value) <= 3.4028234663852886e38
