"""Elastic training keeps the optimisation of the full worker group: ``train.num_workers=[min, max]`` accumulates
more micro-batches per step on fewer workers, so the global batch, and with it the learning-rate recipe, stays as
configured. Fast: the arithmetic, and the accumulated gradient of real torch code against the DDP mean."""

from pathlib import Path

import pytest
import torch

from evadlab.config import ConfigError, load_config
from evadlab.platform.ingest import MicroBatch
from evadlab.platform.train import Progress, Worker, forward_backward, optimizer_step

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


@pytest.mark.parametrize(("workers", "grad_accum", "expected"), [
    ([1, 2], 1, {1: 2, 2: 1}),
    ([2, 4], 1, {1: 4, 2: 2, 3: 2, 4: 1}),  # 3 workers: 6 micro-batches per step, the next multiple of 3 above 4
    ([1, 4], 3, {1: 12, 2: 6, 3: 4, 4: 3}),
    (4, 2, {4: 2}),
])
def test_global_batch_stays_batch_size_times_max_workers(workers, grad_accum, expected):
    cfg = load_config(QUICKSTART, [f"train.num_workers={workers}", f"train.grad_accum={grad_accum}"]).train
    assert {world: cfg.effective_grad_accum(world) for world in expected} == expected
    target = cfg.batch_size * grad_accum * cfg.max_workers
    for world, accum in expected.items():
        assert target <= cfg.batch_size * world * accum < target + cfg.batch_size * world
    with pytest.raises(ValueError, match="outside 1..4"):
        load_config(QUICKSTART, ["train.num_workers=[1, 4]"]).train.effective_grad_accum(5)


@pytest.mark.parametrize(("override", "message"), [
    ("train.num_workers=[2, 1]", "'train.num_workers': must be >= 1, a range [min, max]"),
    ("train.num_workers=[1, 2, 3]", "'train.num_workers': must be a whole number or a range"),
    ("train.num_workers=true", "'train.num_workers': must be a whole number or a range"),
    ("train.resources_per_worker={CPU: 1}", "'train.resources_per_worker': 'CPU' is no custom resource"),
])
def test_bad_worker_settings_name_their_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(QUICKSTART, [override])


class Regression(torch.nn.Module):
    """A model with the detector's calling convention: clips and targets in, a dict of losses out."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, clips, targets):
        inputs, wanted = torch.stack(clips), torch.stack([t["y"] for t in targets])
        return {"loss": ((self.linear(inputs) - wanted) ** 2).mean()}


def test_one_worker_accumulating_steps_like_the_ddp_mean_of_two():
    """Two DDP workers average their gradients; the elastic run shrunk to one worker accumulates both micro-batches
    (effective_grad_accum(1) == 2) and must take the same step."""
    cfg = load_config(QUICKSTART, ["train.num_workers=[1, 2]"])
    generator = torch.Generator().manual_seed(0)
    micro = [MicroBatch([torch.randn(3, generator=generator) for _ in range(4)],
                        [{"y": torch.randn(1, generator=generator)} for _ in range(4)], [], 1.0, False)
             for _ in range(2)]
    model = Regression()
    reference = Regression()
    reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    worker = Worker(cfg=cfg, rank=0, world=1, device=torch.device("cpu"), model=model, optimizer=optimizer,
                    progress=Progress(), train_rows=8, run_path="", logger=None, progress_channel=None, gflops=0.0,
                    grad_accum=cfg.train.effective_grad_accum(1))
    for index, batch in enumerate(micro):
        forward_backward(worker, batch, synchronise=index == 1)
    optimizer_step(worker, micro_batches=2)

    per_worker = [torch.autograd.grad(reference(b.clips, b.targets)["loss"], list(reference.parameters()))
                  for b in micro]
    with torch.no_grad():
        for param, *grads in zip(reference.parameters(), *per_worker):
            param -= 0.1 * (grads[0] + grads[1]) / 2
    for trained, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(trained, expected)
    assert worker.progress.step == 1
