"""Control socket frames: any line gets a Request or a one-line ProtocolError, never another
exception (1,000-deep JSON included); authorize is total."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agent.control import protocol as p
from tests.fuzz.conftest import FUZZ

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=25,
)
ops = st.sampled_from(sorted(p.ALL_OPS)) | st.text(max_size=10)


def parse(line: bytes) -> p.Request | str:
    try:
        return p.parse_request(line, max_bytes=4096, max_depth=16)
    except p.ProtocolError as err:
        message = str(err)
        assert message and "\n" not in message
        return message


@FUZZ
@given(line=st.binary(max_size=5000))
def test_random_bytes(line: bytes) -> None:
    parse(line)


@FUZZ
@given(op=ops, args=st.dictionaries(st.text(max_size=12), json_values, max_size=6), v=json_values)
def test_random_requests(op: str, args: dict[str, Any], v: Any) -> None:
    parse(json.dumps({"v": v, "op": op, **args}).encode())
    parse(json.dumps({"v": 1, "op": op, **args}).encode())


@FUZZ
@given(depth=st.integers(min_value=17, max_value=5000), opener=st.sampled_from(["[", '{"a":']))
def test_deep_nesting_is_a_protocol_error(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    result = parse((opener * depth + "1" + closer * depth).encode())
    assert isinstance(result, str) and ("deep" in result or "too large" in result)


@FUZZ
@given(
    op=ops, uid=st.integers(-1, 2**32), gid=st.integers(-1, 2**32), groups=st.frozensets(st.integers(0, 99))
)
def test_authorize_is_total_and_reads_only_for_strangers(
    op: str, uid: int, gid: int, groups: frozenset[int]
) -> None:
    peer = p.PeerCred(pid=1, uid=uid, gid=gid, groups=groups)
    allowed = p.authorize(op, peer, frozenset({1000}))
    if op not in p.ALL_OPS or (op in p.WRITE_OPS and uid != 0 and 1000 not in ({gid} | groups)):
        assert allowed is False
