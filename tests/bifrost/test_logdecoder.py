from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bifrost import LogDecoder


def test_complete_lines_only() -> None:
    d = LogDecoder()
    assert d.feed(b"one\ntw") == ["one"]
    assert d.feed(b"o\n") == ["two"]
    assert d.offset == 8


def test_utf8_split_across_chunks() -> None:
    data = "héllo → wörld\n".encode()
    d = LogDecoder()
    got: list[str] = []
    for i in range(len(data)):
        got += d.feed(data[i : i + 1])
    assert got == ["héllo → wörld"]


def test_carriage_returns_are_line_ends() -> None:
    d = LogDecoder()
    assert d.feed(b"10%\r20%\r") == ["10%"]  # a lone trailing \r waits: it may be \r\n
    assert d.feed(b"\n30%\r\n") == ["20%", "30%"]
    assert d.feed(b"40%\rdone") == ["40%"]
    assert d.flush() == ["done"]


def test_resume_at_offset_has_no_gaps_or_duplicates() -> None:
    log = "".join(f"line {i} ✓\n" for i in range(50)).encode()
    d = LogDecoder()
    got: list[str] = []
    # the connection drops at arbitrary byte positions; each reconnect resumes at d.offset
    for cut in (7, 8, 100, 101, 333):
        got += d.feed(log[d.offset : cut])
    got += d.feed(log[d.offset :])
    assert got == [f"line {i} ✓" for i in range(50)]


def test_reset() -> None:
    d = LogDecoder()
    d.feed(b"abc")
    d.reset()
    assert d.offset == 0
    assert d.feed(b"x\n") == ["x"]


@given(
    st.lists(
        st.text(
            alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
            max_size=20,
        ),
        max_size=20,
    ),
    st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=10),
)
def test_any_chunking_gives_same_lines(lines: list[str], sizes: list[int]) -> None:
    data = "".join(line + "\n" for line in lines).encode()
    d = LogDecoder()
    got: list[str] = []
    pos, i = 0, 0
    while pos < len(data):
        step = sizes[i % len(sizes)]
        got += d.feed(data[pos : pos + step])
        pos += step
        i += 1
    assert got + d.flush() == lines
