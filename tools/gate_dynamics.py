"""How far each gate's logits move per training step, against what Adam allows: why gates saturate.

Adam moves each weight by about its learning rate a step whatever the gradient's scale (the update is the gradient's
running mean over the root of its running square). When a weight's gradient keeps its sign, every weight of a gate
row moves by about ``lr`` in the direction that raises the row's logit, so the logit of an input ``x`` moves by up
to ``lr * ||x||_1``: with a tower input hundreds of features wide (embeddings and pairwise dots), one step can move
the gap between two experts' logits by more than a unit, and a few steps saturate the softmax. This tool measures,
at every training step of a normal run and for every gate:

- ``spread``: the mean over the batch's rows of the gap between the largest and smallest expert logit (after the
  temperature), the quantity a softmax saturates on;
- ``move``: how much the step's weight update changed that gap on the same rows (``(W_t - W_{t-1}) x``, the
  per-row range over experts, mean over rows);
- ``bound``: ``lr * mean ||x||_1`` times 2 (two experts moving opposite ways), the most Adam's step allows;
- ``input_l1``: the mean L1 norm of the gate's input rows;
- ``entropy``: the gate's mean entropy over the batch, over ``log(num_experts)`` (1: uniform, 0: one expert).

``move / bound`` near 1 means the gate's weights move coherently at Adam's full rate, so its logits grow with the
input's width. Its JSON holds every step; it prints the first steps and a summary per gate.

    .venv/bin/python tools/gate_dynamics.py --config configs/mmoe_ali_ccp.yaml --out runs/gate_dynamics_ali.json \\
        model.tower.gate_temperature=1 training.seed=0
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torchrec_mtl.config import load_config  # noqa: E402
from torchrec_mtl.modules.tower_parts import Gate  # noqa: E402
from torchrec_mtl.run.train import run_job  # noqa: E402


class GateRecorder:
    """A global forward hook that records, for every gate's training forward, the quantities in the docstring."""

    def __init__(self, learning_rate: float) -> None:
        self.learning_rate = learning_rate
        self.steps: Dict[str, List[Dict[str, float]]] = {}
        self._previous: Dict[int, tuple] = {}
        self._names: Dict[int, str] = {}

    def __call__(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if not isinstance(module, Gate) or not module.training or not torch.is_grad_enabled():
            return  # validation, and the diagnostics' own no-grad look at the gates
        with torch.no_grad():
            x = args[0].detach()
            logits = F.linear(x, module.weight, module.bias) / module.temperature
            record = {
                "spread": float((logits.max(dim=1).values - logits.min(dim=1).values).mean()),
                "bound": 2 * self.learning_rate * float(x.abs().sum(dim=1).mean()) / module.temperature,
                "entropy": float(-(output * output.clamp_min(1e-12).log()).sum(dim=1).mean())
                / math.log(output.shape[1]),
                "move": float("nan"),
                "input_l1": float(x.abs().sum(dim=1).mean()),
            }
            previous = self._previous.get(id(module))
            if previous is not None:
                moved = F.linear(x, module.weight - previous[0], module.bias - previous[1]) / module.temperature
                record["move"] = float((moved.max(dim=1).values - moved.min(dim=1).values).mean())
            self._previous[id(module)] = (module.weight.detach().clone(), module.bias.detach().clone())
        name = self._names.setdefault(id(module), f"gate{len(self._names)}")
        self.steps.setdefault(name, []).append(record)


def compute_gates_apart(module: torch.nn.Module, args: tuple) -> None:
    """A global pre-hook: an MMoE computes each gate on its own (``fuse_gates`` False, the same function), so that
    every gate's forward sees its input, which the recorder's bound needs; fused, the gates' logits come out of the
    experts' first-layer product."""
    if getattr(module, "fuse_gates", False):
        module.fuse_gates = False


def summarise(steps: List[Dict[str, float]], first: int = 20) -> Dict[str, float]:
    """The mean move / bound ratio over the first steps, and the step where the entropy first fell under 5%."""
    ratios = [s["move"] / s["bound"] for s in steps[1:first] if s["bound"] > 0 and not math.isnan(s["move"])]
    saturated = next((i + 1 for i, s in enumerate(steps) if s["entropy"] < 0.05), None)
    return {
        "steps": len(steps),
        "mean_move_over_bound_first_steps": sum(ratios) / max(len(ratios), 1),
        "spread_at_step_1": steps[0]["spread"],
        f"spread_at_step_{min(first, len(steps))}": steps[min(first, len(steps)) - 1]["spread"],
        "final_spread": steps[-1]["spread"],
        "final_entropy": steps[-1]["entropy"],
        "first_step_under_5pct_entropy": saturated,
        "input_l1_at_step_1": steps[0]["input_l1"],
        "final_input_l1": steps[-1]["input_l1"],
    }


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="JSON file: every step of every gate, and a summary")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as run_dir:  # the run's own folder: only its gates' dynamics are kept
        config = load_config(args.config, [*args.overrides, f"out_dir={run_dir}/run", "training.progress=false"])
        recorder = GateRecorder(config.training.dense_lr)
        # the lr bound divides by the input's scale only where every weight moves at lr: Adam's case, our optimizer
        handle = torch.nn.modules.module.register_module_forward_hook(recorder)
        unfuse = torch.nn.modules.module.register_module_forward_pre_hook(compute_gates_apart)
        try:
            run_job(config)
        finally:
            handle.remove()
            unfuse.remove()
    summary = {name: summarise(steps) for name, steps in recorder.steps.items()}
    for name, row in summary.items():
        print(name, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "steps": recorder.steps}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
