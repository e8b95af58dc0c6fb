"""training/report.py: progress off a terminal."""

from training import report


def test_progress_off_a_terminal_prints_plain_lines(capsys):
    bar = report.progress(range(3), desc="epoch 1/2", every=0)  # every step, for the test
    for _ in bar:
        bar.set_postfix(loss="0.5")
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1].startswith("epoch 1/2: step 3/3, ") and "loss 0.5" in err
