"""``core.progress``: a tqdm bar on a terminal or when asked, plain lines elsewhere, nothing when off."""

import io

from fake_streams import TTY, Clock

from mechscope.core.progress import Progress, bar_text, format_seconds




def test_not_a_terminal_prints_one_plain_line_per_update_with_speed_from_the_start():
    stream, clock = io.StringIO(), Clock()
    p = Progress(100, label="job", stream=stream, start=20, clock=clock)
    clock.now = 10.0
    p.update(70, "loss 0.5")
    p.write("a message")
    p.close()
    assert stream.getvalue() == "job:  70% 70/100 [00:10<00:06,  5.00it/s, loss 0.5]\na message\n"


def test_a_terminal_gets_a_bar_redrawn_in_place_and_messages_above_it():
    stream, clock = TTY(), Clock()
    p = Progress(10, label="job", stream=stream, clock=clock)
    clock.now = 1.0
    p.update(5, "x 1")
    p.write("note")
    p.update(10, "x 2")
    p.close()
    text = stream.getvalue()
    assert text.startswith("job:  50%|") and "5/10 [00:01<00:01,  5.00it/s, x 1]" in text
    assert "\r\x1b[2Knote\njob:  50%|" in text  # the bar erased, the message, the bar again
    assert text.endswith("10/10 [00:01<00:00, 10.00it/s, x 2]\n")  # left on screen at the end


def test_a_bar_when_asked_and_nothing_when_disabled():
    forced = io.StringIO()
    Progress(4, stream=forced, bar=True).update(1)
    assert forced.getvalue().startswith(" 25%|")
    off = TTY()
    p = Progress(4, stream=off, enabled=False)
    p.update(1, "x")
    p.write("x")
    p.close()
    assert off.getvalue() == ""
    plain, clock = TTY(), Clock()
    Progress(4, stream=plain, bar=False, clock=clock).update(1)
    assert plain.getvalue() == " 25% 1/4 [00:00<?, ?it/s]\n"


def test_bar_text_and_seconds():
    assert bar_text(1, 4, width=8) == "##------" and bar_text(0, 0, width=4) == "####"
    assert format_seconds(3661) == "1h01m"
