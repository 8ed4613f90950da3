"""node.net.fast.pdumeter: the SCP's read limits, followed over the byte stream in pieces of
any size."""

from __future__ import annotations

import struct

import pytest

from node.net.fast.cstore import encoded_p_data, store_request
from node.net.fast.pdumeter import MAX_ASSOCIATE_PDU, PduMeter

CT = "1.2.840.10008.5.1.4.1.1.2"
RELEASE_RQ = bytes.fromhex("05000000000400000000")


def _message(data_set: bytes, max_pdu: int = 16384) -> bytes:
    command = store_request(1, CT, "1.2.3.4", 0)
    return b"".join(encoded_p_data(1, command, data_set, max_pdu))


def _feed(meter: PduMeter, stream: bytes, piece: int) -> list[str]:
    """What each piece fed got: "" or a refusal."""
    return [meter.feed(stream[i : i + piece]) for i in range(0, len(stream), piece)]


def _associate_rq(length: int = 200) -> bytes:
    return struct.pack(">BBI", 1, 0, length) + bytes(length)


@pytest.mark.parametrize("piece", [1, 5, 6, 7, 4096, 1 << 20])
def test_a_conversation_within_the_limits_passes_in_pieces_of_any_size(piece):
    stream = _associate_rq() + _message(bytes(100_000)) + _message(bytes(100_000)) + RELEASE_RQ
    assert set(_feed(PduMeter(16384, message_bytes=150_000), stream, piece)) == {""}


@pytest.mark.parametrize("piece", [1, 4096])
@pytest.mark.parametrize(
    ("stream", "refusal"),
    [
        (struct.pack(">BBI", 1, 0, 0xFFFFFFFF), "PDU of type 0x01 and 4294967295 bytes"),
        (_associate_rq(MAX_ASSOCIATE_PDU + 1), f"(limit {MAX_ASSOCIATE_PDU})"),
        (struct.pack(">BBI", 4, 0, 256 * 2**20), "PDU of type 0x04 and 268435456 bytes"),
        (struct.pack(">BBI", 5, 0, 2000), "PDU of type 0x05 and 2000 bytes (limit 1024)"),
        (struct.pack(">BBI", 9, 0, 4), "unknown PDU type 0x09"),
        (_message(bytes(300_000)), "a message growing past 150000 bytes"),
        (struct.pack(">BBIIBB", 4, 0, 10, 20, 1, 0) + bytes(4), "items do not add up"),
        (struct.pack(">BBIIBB", 4, 0, 6, 1, 1, 0), "items do not add up"),
    ],
    ids=[
        "4 GiB associate",
        "associate",
        "256 MiB P-DATA",
        "release",
        "type",
        "message",
        "item past its PDU",
        "item too short",
    ],
)
def test_too_much_is_refused_at_the_header_that_announces_it(stream, refusal, piece):
    meter = PduMeter(16384, message_bytes=150_000)
    seen = _feed(meter, _associate_rq() + stream, piece)
    assert refusal in seen[-1]
    assert meter.feed(RELEASE_RQ) == seen[-1]  # and everything after it


def test_the_limit_is_per_message_not_per_connection():
    meter = PduMeter(16384, message_bytes=150_000)
    for _ in range(10):
        assert meter.feed(_message(bytes(140_000))) == ""


def test_the_refusal_comes_before_the_body():
    """A 4 GiB header is refused on its own six bytes, a message as soon as the fragment
    header that passes the limit arrives."""
    meter = PduMeter(16384)
    assert "4294967295" in meter.feed(struct.pack(">BBI", 1, 0, 0xFFFFFFFF))
    meter = PduMeter(16384, message_bytes=100_000)
    stream = _message(bytes(200_000))
    first = next(i for i in range(0, len(stream), 6) if meter.feed(stream[i : i + 6]))
    assert first < 110_000
