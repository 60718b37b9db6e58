import pytest

from shmpool import wire


def test_round_trip() -> None:
    data = wire.encode(wire.MsgKind.JOB, 7, 1 << 40, 12345, wire.Flag.ONEOFF)
    assert len(data) == wire.HEADER_SIZE == 32
    header = wire.decode(data)
    assert header == wire.Header(wire.MsgKind.JOB, 7, 1 << 40, 12345, wire.Flag.ONEOFF)
    assert type(header.kind) is wire.MsgKind


def test_layout_is_little_endian_with_magic_first() -> None:
    data = wire.encode(wire.MsgKind.RESULT, 0x0102, 3, 4)
    assert data[:4] == b"SHMP"
    assert data[4] == wire.VERSION
    assert data[5] == wire.MsgKind.RESULT
    assert data[8:10] == b"\x02\x01"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d[:-1], "header of 31 bytes"),
        (lambda d: d + b"\0", "header of 33 bytes"),
        (lambda d: b"XXXX" + d[4:], "bad magic"),
        (lambda d: d[:4] + bytes([wire.VERSION + 1]) + d[5:], "wire version"),
        (lambda d: d[:5] + bytes([99]) + d[6:], "unknown message kind 99"),
        (lambda d: d[:6] + b"\x00\x80" + d[8:], "unknown flags"),
        (lambda d: d[:16] + b"\xff" * 16, "overflows"),
    ],
)
def test_bad_headers_are_rejected_clearly(mutate, message: str) -> None:
    good = wire.encode(wire.MsgKind.JOB, 1, 0, 10)
    with pytest.raises(wire.WireError, match=message):
        wire.decode(mutate(good))
