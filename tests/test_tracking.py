"""The per-class AP artifact: a CSV any class name survives, and a chart titled with the run, epoch and mAP."""

import csv
import io

from evadlab.platform.tracking import log_per_class_ap, per_class_ap_csv


class RecordingLogger:
    """Keeps what would be logged to MLflow."""

    def __init__(self):
        self.texts: dict[str, str] = {}
        self.figures: list[str] = []
        self.titles: list[str] = []

    def log_text(self, text: str, name: str) -> None:
        self.texts[name] = text

    def log_figure(self, figure, name: str) -> None:
        self.figures.append(name)
        self.titles.append(figure.axes[0].get_title())


def test_per_class_ap_csv_reads_back_any_class_name():
    per_class = {'say "hello", then wave': 0.25, "stand": None, "plain, with comma": 1.0, 'a "quoted" one': 0.123456789}
    logger = RecordingLogger()
    log_per_class_ap(logger, per_class, "quickstart_1: epoch 10/30 (step 230), frame-mAP@0.5 0.4123", prefix="eval_")

    assert logger.figures == ["eval_per_class_ap.png"]
    assert logger.titles == ["quickstart_1: epoch 10/30 (step 230), frame-mAP@0.5 0.4123"]
    text = logger.texts["eval_per_class_ap.csv"]
    assert text == per_class_ap_csv(per_class)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [row["class"] for row in rows] == list(per_class)
    assert [row["ap"] for row in rows] == ["0.250000", "", "1.000000", "0.123457"]
