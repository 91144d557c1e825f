import io

from fake_streams import TTY, Clock

from mechscope.bench.progress import Progress, bar, estimate_left, format_seconds




ROW = {"metric": "iia", "value": 0.5, "threshold": {"op": ">=", "value": 0.9}, "passed": False}


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 4.6, 59, 61, 3599, 3661)] == ["0s", "5s", "59s", "1m01s", "59m59s", "1h01m"]


def test_estimate_left_and_bar():
    assert estimate_left(10.0, 0, 4) is None
    assert estimate_left(10.0, 2, 4) == 10.0
    assert bar(1, 4, width=8) == "##------"


def test_tty_redraws_one_bar_line_with_eta():
    stream, clock = TTY(), Clock()
    progress = Progress(stream, 2, clock=clock)
    progress.begin("alpha/das/iia")
    assert stream.getvalue().endswith("1/2 alpha/das/iia  elapsed 0s, left ?")
    clock.now = 30.0
    progress.finish([ROW], 30.0)
    progress.begin("beta/sae/mse")
    text = stream.getvalue()
    assert "[1/2] alpha/das/iia: FAIL iia 0.5 >= 0.9 (30s; elapsed 30s, left ~30s)\n" in text
    assert text.endswith("2/2 beta/sae/mse  elapsed 30s, left ~30s")
    progress.note("a log line")
    assert "\r\x1b[2Ka log line\n[" in stream.getvalue()


def test_not_a_tty_prints_plain_lines():
    stream, clock = io.StringIO(), Clock()
    progress = Progress(stream, 1, clock=clock)
    progress.begin("alpha/das/iia")
    clock.now = 2.0
    progress.finish([{**ROW, "error": "ValueError: boom", "passed": False}], 2.0)
    assert stream.getvalue() == ("[1/1] alpha/das/iia ...\n"
                                 "[1/1] alpha/das/iia: ERROR iia: ValueError: boom (2s; elapsed 2s, left ~0s)\n")
