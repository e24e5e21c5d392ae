"""What a command prints of its progress: durations and the training's line per epoch."""

from evadlab.console import duration, epoch_line


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (0, 44.6, 60, 723, 3600, 7530)] == ["0s", "45s", "1m00s", "12m03s", "1h00m", "2h05m"]


def test_an_epoch_line_has_the_loss_terms_the_rate_the_time_left_and_the_map_when_evaluated():
    message = {"epoch": 9, "epochs": 30, "step": 140, "lr": 1e-4, "clips_per_s": 5.06, "seconds": 13.2,
               "losses": {"loss": 0.9351, "loss_ce": 0.809, "loss_giou": 1.279, "loss_bbox": 1.644, "loss_bce": 0.552,
                          "loss_ce_0": 2.0}}
    assert epoch_line(message, seconds_left=220) == (
        "epoch 10/30 step 140: loss 0.935 (ce 0.809 giou 1.279 bbox 1.644 bce 0.552), lr 1.0e-04, 5.1 clips/s, 13s, "
        "3m40s left")
    evaluated = message | {"mAP": 0.0695, "best_mAP": 0.0695, "best_epoch": 9}
    assert epoch_line(evaluated, seconds_left=220).endswith("3m40s left; frame-mAP 0.0695 (best 0.0695 at epoch 10)")
