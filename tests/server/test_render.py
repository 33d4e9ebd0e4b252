"""Stream text shaping: nothing sent is ever taken back, stop strings and partial characters wait."""

from __future__ import annotations

from afdserve.server.async_engine import Update
from afdserve.server.render import Choice, hold_back


def test_hold_back_partial_char_and_stop_prefix():
    assert hold_back("abc\ufffd", []) == "abc"
    assert hold_back("hello wo", ["world"]) == "hello "
    assert hold_back("hello w", ["xyz", "w!"]) == "hello "
    assert hold_back("hello", ["lo!", "o"]) == "hel"  # longest tail that can start a stop string
    assert hold_back("hello", ["zz"]) == "hello"


def _feed(texts: list[str], final_reason: str, stops: list[str]) -> tuple[str, str]:
    c = Choice(0, 0, stops)
    sent = ""
    for i, text in enumerate(texts):
        reason = final_reason if i == len(texts) - 1 else None
        sent += c.advance(Update(0, [i], [], text, reason))
    return sent, c.final_text


def test_streamed_pieces_add_up_to_the_final_text():
    # a stop string that arrives in pieces is never sent, the text before it is
    assert _feed(["ab", "abxy", "abxyST", "abxyS"], "stop", ["STOP"]) == ("abxyS", "abxyS")
    assert _feed(["ab", "ab S", "ab ST"], "stop", ["STOP"]) == ("ab ST", "ab ST")
    assert _feed(["ab", "ab\ufffd", "ab\u00e9", "ab\u00e9!"], "length", []) == ("ab\u00e9!", "ab\u00e9!")
    assert _feed(["ab", "abST", "ab"], "stop", ["STOP"]) == ("ab", "ab")


def test_finished_update_flushes_held_text():
    c = Choice(0, 0, ["zz"])
    assert c.advance(Update(0, [1], [], "xz")) == "x"
    assert c.advance(Update(0, [2], [], "xz", finish_reason="length")) == "z"
    assert (c.finish_reason, c.token_ids) == ("length", [1, 2])
