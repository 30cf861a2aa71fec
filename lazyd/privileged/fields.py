"""What a well-formed field of the helper's protocol is, and the one error a
malformed message raises.

Shared by `lazyd.privileged.entries` (the table's entries) and
`lazyd.privileged.protocol` (the messages), on both sides of the socket.
JSON has no integer type of its own and Python's bool is an int, so every
check here is by exact type: ``true`` never passes for 1.  Standard library
only, and not even `typing` (see `lazyd.privileged`).
"""

from __future__ import annotations

TYPE_CHECKING = False  # not from typing, which the helper would have to import
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping


class ProtocolError(Exception):
    """A message that breaks the protocol; the text says which field and what is wrong.

    `request_id` is the id of the request it came in, once that was read
    (None before): the helper's error reply carries it.
    """

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def integer(value: object, what: str, low: int, high: int) -> int:
    """`value`, which must be an int (not a bool) in low..high."""
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"{what} must be an integer in {low}..{high}")
    return value


def optional_integer(value: object, what: str, low: int, high: int) -> int | None:
    """`value`, which must be None or an int (not a bool) in low..high."""
    return None if value is None else integer(value, what, low, high)


def text(value: object, what: str) -> str:
    """`value`, which must be a non-empty string without NUL (it ends up in C strings)."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise ProtocolError(f"{what} must be a non-empty string without NUL")
    return value


def boolean(value: object, what: str) -> bool:
    """`value`, which must be true or false."""
    if not isinstance(value, bool):
        raise ProtocolError(f"{what} must be true or false")
    return value


def only(message: Mapping[str, object], allowed: Iterable[str]) -> None:
    """Refuse a field of `message` that is not `allowed`: nothing unknown is ignored."""
    unknown = set(message) - set(allowed)
    if unknown:
        raise ProtocolError(f"unknown field {sorted(unknown)[0]!r}")
