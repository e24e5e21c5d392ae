"""``evadlab demo`` on real video files: annotated mp4, AVA-format CSV, odd sizes and frame rates, bad input."""

import subprocess
import sys
from pathlib import Path

import av
import decord
import numpy as np
import pytest
import torch
import yaml

from evadlab.cli import main
from evadlab.config import load_config
from evadlab.models.checkpoints import save_training_checkpoint
from evadlab.pipelines.ava import read_boxes_csv
from evadlab.platform.modeling import build_model

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model whose person threshold is 0, so every proposal is drawn and written."""
    cfg = load_config(QUICKSTART, ["model.person_threshold=0.0", "model.act_fc_dim=64"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("demo") / "model.pt"
    save_training_checkpoint(path, model_state=build_model(cfg.model).state_dict(), optimizer_state={}, epoch=0,
                             config_yaml=yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def write_video(path: Path, *, width: int, height: int, fps: int, seconds: float) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(int(fps * seconds)):
            frame = np.full((height, width, 3), (index * 7) % 255, np.uint8)
            frame[height // 4: 3 * height // 4, width // 3: width // 2] = (200, 40, 40)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_demo_annotates_a_video_of_any_size_and_rate(tmp_path, checkpoint):
    video = tmp_path / "clip.mp4"
    write_video(video, width=212, height=150, fps=25, seconds=3.2)
    out = tmp_path / "out" / "annotated.mp4"
    assert main(["demo", str(video), "--checkpoint", str(checkpoint), "--out", str(out), "--fps", "1"]) == 0

    source, annotated = decord.VideoReader(str(video)), decord.VideoReader(str(out))
    assert len(annotated) == len(source)
    assert annotated[0].shape == (150, 212, 3)
    assert not np.array_equal(annotated[10].asnumpy(), source[10].asnumpy()), "boxes must be drawn"
    rows = read_boxes_csv(out.with_suffix(".csv"), is_detection=True)
    keys = set(rows["key"].to_pylist())
    assert keys == {"clip,0000", "clip,0001", "clip,0002", "clip,0003"}
    assert rows.num_rows == 4 * 10 * 80, "10 proposals x 80 actions on each of 4 keyframes"


def test_demo_names_an_unreadable_video(tmp_path, checkpoint):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 4096)
    with pytest.raises(ValueError, match="cannot read video .*broken.mp4"):
        from evadlab.platform.demo import run_demo

        run_demo(str(broken), checkpoint=str(checkpoint), config=None, out=str(tmp_path / "o.mp4"), fps=1)
    assert main(["demo", str(tmp_path / "missing.mp4"), "--checkpoint", str(checkpoint)]) == 2


# A Python whose import system refuses Ray, as on a laptop where only the demo's dependencies are installed.
WITHOUT_RAY = """
import sys
class RefuseRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, RefuseRay())
from evadlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_demo_runs_where_ray_cannot_be_imported(tmp_path, checkpoint):
    video = tmp_path / "short.mp4"
    write_video(video, width=96, height=64, fps=10, seconds=1.2)
    out = tmp_path / "annotated.mp4"
    done = subprocess.run([sys.executable, "-c", WITHOUT_RAY, "demo", str(video), "--checkpoint", str(checkpoint),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.is_file() and out.with_suffix(".csv").is_file()
