"""Confusion matrix and per-class accuracy of classifiers (cls, linprobe): known values on hand-made predictions, in
eval.json after a run, drawn as a PNG, printed by tools/eval.py."""
import json

import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

from pixelformer.cli.eval import main as eval_main
from pixelformer.data import DataInfo
from pixelformer.engine import fit
from pixelformer.task import EvalContext, evaluate_classifier, save_confusion_matrix
from conftest import tiny_cfg


class FixedLogits(nn.Module):
    """A "classifier" whose logits are one-hot on a prediction looked up by the image's value."""

    def __init__(self, predictions: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.predictions, self.num_classes = predictions, num_classes

    def forward(self, batch):
        images, labels = batch
        logits = nn.functional.one_hot(self.predictions[images.long()], self.num_classes).float()
        return {"loss": torch.zeros(()), "logits": logits}


def test_hand_made_predictions_give_the_known_matrix_and_per_class_accuracy():
    # 4 classes; class 3 has no test image. True -> predicted:
    #   0: 0 0 1      (2 of 3 right)
    #   1: 1 1 1 1    (4 of 4)
    #   2: 0 2        (1 of 2)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
    predicted = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 2])
    images = torch.arange(len(labels))  # image i "shows" its index; the module looks its prediction up
    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]  # over two batches: counts accumulate
    info = DataInfo("hand", num_classes=4, in_chans=1, img_size=1, mean=(0.0,), std=(1.0,),
                    class_names=["zero", "one", "two", "three"])
    ctx = EvalContext(Fabric(accelerator="cpu", devices=1), None, info, {"test": batches})

    metrics = evaluate_classifier(FixedLogits(predicted, 4), ctx)

    assert ctx.details["confusion_matrix"] == [[2, 1, 0, 0], [0, 4, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert ctx.details["per_class_acc1"] == pytest.approx([200 / 3, 100.0, 50.0, None])
    assert ctx.details["class_names"] == ["zero", "one", "two", "three"]
    assert metrics["test/acc1"] == pytest.approx(100 * 7 / 9)  # the matrix's trace over its sum
    assert json.loads(json.dumps(ctx.details)) == ctx.details  # plain JSON values


def test_confusion_matrix_picture(tmp_path):
    details = {"confusion_matrix": [[3, 1], [0, 2]], "per_class_acc1": [75.0, 100.0], "class_names": ["a", "b"]}
    path = save_confusion_matrix(details, tmp_path / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert save_confusion_matrix({}, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


@pytest.mark.slow
def test_a_classifier_run_records_its_confusion_matrix_and_eval_prints_per_class_accuracy(run_dir, capsys):
    metrics = fit(tiny_cfg(run_dir, "trainer.max_steps=3", "data.limit_train=64", "data.limit_test=40"))
    report = json.loads((run_dir / "eval.json").read_text())
    matrix = torch.tensor(report["details"]["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 40
    assert 100 * matrix.trace() / 40 == pytest.approx(metrics["test/acc1"])
    per_class = report["details"]["per_class_acc1"]
    support = matrix.sum(dim=1)
    assert [a is None for a in per_class] == (support == 0).tolist()
    assert all(a == pytest.approx(100 * matrix[i, i] / support[i]) for i, a in enumerate(per_class) if a is not None)
    assert (run_dir / "confusion_matrix.png").stat().st_size > 0

    capsys.readouterr()
    assert eval_main([f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", f"out={run_dir / 'again.json'}"]) == 0
    printed = capsys.readouterr().out
    assert "per-class top-1 (test split):" in printed
    assert json.loads((run_dir / "again.json").read_text())["details"] == report["details"]
