"""What rank 0 shows of a run as it trains: each curve point as a line above the progress bar, and TensorBoard event
files in ``out_dir/tensorboard`` when tensorboard is installed (the ``tensorboard`` extra): the loss, the
learning-rate scale and each task's windowed metrics at every curve point, the test metrics at the end.

Example::

    >>> board = RunBoard(Path("runs/main"), total_steps=2343)  # doctest: +SKIP
    >>> train(..., on_curve_point=board.curve_point); board.test_metrics(results["tasks"], 2343); board.close()  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from tqdm import tqdm

from torchrec_mtl.train.loop import curve_line


class RunBoard:
    def __init__(self, out_dir: Path, total_steps: int, tensorboard: bool = True) -> None:
        self.total_steps = total_steps
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                pass
            else:
                self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    @property
    def event_dir(self) -> Optional[str]:
        return self.writer.log_dir if self.writer is not None else None

    def curve_point(self, point: Dict) -> None:
        tqdm.write(curve_line(point, self.total_steps))
        if self.writer is None:
            return
        step = point["step"]
        self.writer.add_scalar("train/loss", point["loss"], step)
        self.writer.add_scalar("train/lr_scale", point.get("lr_scale", 1.0), step)
        for task, values in point.items():
            if isinstance(values, dict) and task != "gates":
                for metric, value in values.items():
                    self.writer.add_scalar(f"train/{task}/{metric}", value, step)
        for task, gates in (point.get("gates") or {}).items():
            self.writer.add_scalar(f"gates/{task}/entropy", gates["entropy"], step)

    def test_metrics(self, tasks: Dict[str, Dict[str, float]], step: int) -> None:
        if self.writer is not None:
            for task, values in tasks.items():
                for metric, value in values.items():
                    self.writer.add_scalar(f"test/{task}/{metric}", value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
