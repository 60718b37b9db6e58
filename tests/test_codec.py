"""Layout of a payload in a region, and the copies it costs."""
import pickle

import numpy as np
import pytest

from shmpool import CloudPickler, SubprocPickler
from shmpool.codec import CodecError, dump, load


class DumpsOnly(SubprocPickler):
    """torch's contract: only dumps/loads. Must still work, through one buffer."""

    def dumps(self, obj: object) -> bytes:
        return b"X" + pickle.dumps(obj)

    def loads(self, data: bytes) -> object:
        assert bytes(data[:1]) == b"X"
        return pickle.loads(data[1:])


def _round_trip(obj: object, pickler: SubprocPickler, copy_buffers: bool = True) -> tuple[object, bool]:
    parts = dump(obj, pickler)
    region = memoryview(bytearray(parts.size))
    parts.write_into(region)
    return load(region, pickler, copy_buffers=copy_buffers)


@pytest.mark.parametrize("pickler", [SubprocPickler(), CloudPickler(), DumpsOnly()], ids=["plain", "cloud", "dumps-only"])
def test_round_trip(pickler: SubprocPickler) -> None:
    obj = {"b": b"x" * 200_000, "s": "text", "n": [1, 2.5, None], "a": np.arange(10)}
    got, _ = _round_trip(obj, pickler)
    assert got["b"] == obj["b"] and got["s"] == "text" and got["n"] == [1, 2.5, None]
    np.testing.assert_array_equal(got["a"], obj["a"])


def test_large_bytes_are_held_by_reference_not_copied() -> None:
    payload = b"y" * (1 << 20)
    parts = dump(payload, SubprocPickler())
    assert any(chunk is payload for chunk in parts.chunks)  # the pickler handed us the object itself
    assert parts.stream_len < len(payload) + 64


def test_numpy_goes_out_of_band_and_is_used_in_place() -> None:
    arr = np.arange(1 << 16, dtype=np.float64)
    parts = dump(arr, SubprocPickler())
    assert parts.oob_bytes == arr.nbytes and parts.stream_len < 1024
    region = memoryview(bytearray(parts.size))
    parts.write_into(region)
    in_place, uses_region = load(region, SubprocPickler(), copy_buffers=False)
    assert uses_region and not in_place.flags.owndata
    region[parts.offsets[0] : parts.offsets[0] + 8] = np.float64(42).tobytes()
    assert in_place[0] == 42  # a view of the region itself
    copied, uses_region = load(region, SubprocPickler(), copy_buffers=True)
    assert not uses_region and copied[0] == 42
    region[parts.offsets[0] : parts.offsets[0] + 8] = np.float64(7).tobytes()
    assert copied[0] == 42  # its own memory
    assert parts.offsets[0] % 64 == 0


def test_lambdas_need_cloudpickle() -> None:
    with pytest.raises((pickle.PicklingError, AttributeError)):
        dump(lambda: 1, SubprocPickler())
    fn, _ = _round_trip(lambda x: x + 1, CloudPickler())
    assert fn(1) == 2


@pytest.mark.parametrize(
    "region",
    [
        b"",
        b"\0" * 8,  # shorter than the table itself
        (10**9).to_bytes(8, "little") + b"\0" * 8 + b"\0" * 64,  # stream longer than the region
        b"\0" * 8 + (1 << 20).to_bytes(4, "little") + b"\0" * 4,  # more buffers than allowed
        b"\0" * 8 + (1).to_bytes(4, "little") + b"\0" * 4 + (8).to_bytes(8, "little") + (100).to_bytes(8, "little"),  # buffer outside
    ],
    ids=["empty", "short", "stream-too-long", "too-many-buffers", "buffer-outside"],
)
def test_corrupt_tables_are_rejected(region: bytes) -> None:
    with pytest.raises(CodecError):
        load(memoryview(region), SubprocPickler(), copy_buffers=True)


@pytest.mark.parametrize("pickler", [SubprocPickler(), CloudPickler()], ids=["plain", "cloud"])
def test_big_regions_unpickle_through_the_region_file(pickler: SubprocPickler) -> None:
    """Regions of HUGE_COPY_BYTES and more are read through RegionFile (so big bytes land on
    advised memory): the objects must be exactly what pickle.loads would give."""
    from shmpool.pages import HUGE_COPY_BYTES

    rng = np.random.default_rng(1)
    big = rng.bytes(HUGE_COPY_BYTES + 12345)
    obj = {
        "big": big,
        "ba": bytearray(b"z" * 70_000),
        "small": [b"a", "é", 2**80, 1.5, None, (1, 2)],
        "arr": np.arange(1 << 20, dtype=np.float32),
        "pb": pickle.PickleBuffer(bytearray(b"q" * 5000)),
    }
    got, _ = _round_trip(obj, pickler)
    assert type(got["big"]) is bytes and got["big"] == big
    assert got["ba"] == obj["ba"] and type(got["ba"]) is bytearray
    assert got["small"] == obj["small"]
    np.testing.assert_array_equal(got["arr"], obj["arr"])
    assert bytes(got["pb"]) == b"q" * 5000


def test_region_file_reads_like_a_file() -> None:
    from shmpool.pages import RegionFile, copy_out

    data = b"line one\nline two\n" + b"x" * (9 << 20)
    f = RegionFile(memoryview(data))
    assert f.readline() == b"line one\n"
    assert f.read(5) == b"line "
    assert f.readline() == b"two\n"
    dest = bytearray(6 << 20)
    assert f.readinto(memoryview(dest)) == 6 << 20 and dest == b"x" * (6 << 20)
    rest = bytearray(4 << 20)
    assert f.readinto(memoryview(rest)) == 3 << 20  # short read at the end, as a file gives
    assert f.read() == b"" and f.readline() == b""
    copied = copy_out(memoryview(data))
    assert type(copied) is bytearray and copied == data
