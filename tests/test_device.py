"""Devices: no package module puts a tensor on the host outside the justified sites below; ``--device`` is checked
against the machine in one line; the process group takes the device it is given."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

from torchrec_mtl.cli import main
from torchrec_mtl.cli_args import build_parser
from torchrec_mtl.device import DEFAULT_DEVICE, DeviceError, usable_device

PACKAGE = Path(__file__).resolve().parents[1] / "torchrec_mtl"
FACTORIES = {"tensor", "zeros", "ones", "full", "arange", "empty", "rand", "randn", "randint", "linspace", "eye",
             "from_numpy", "as_tensor"}  # fmt: skip

# (module, function, what) -> why the host is right there. Everything else takes its device from the run.
ALLOWED = {
    ("device.py", "", 'literal "cpu"'): "DEFAULT_DEVICE: the serving commands' default; every machine has a host",
    ("device.py", "collective_device", 'literal "cpu"'): "gloo reduces host tensors only",
    ("train/distributed.py", "init_distributed", 'literal "cpu"'): "a gloo group runs on the host",
    ("cli_args.py", "_add_device", 'literal "cpu"'): "--device's documented default (DEFAULT_DEVICE, checked below)",
    # results written out
    ("train/loop.py", "CurveWindow.add", ".cpu()"): "the curve window is rank state in checkpoints: it must load on "
    "any machine (weights-only, no map_location) and 100 batches need not hold GPU memory",
    ("train/loop.py", "evaluate", ".cpu()"): "kept predictions are written (predictions.npz) and grouped by numpy",
    ("train/loop.py", "evaluate", ".numpy()"): "the kept host predictions, to numpy for writing",
    ("train/loop.py", "_add_grouped_auc", "torch.from_numpy"): "each kept row's group, from numpy, for grouped_auc's "
    "host grouping",
    ("run/evaluate.py", "evaluate_ensemble", ".numpy()"): "the members' kept host predictions, averaged in numpy "
    "(torchrec_mtl.ensemble.mean_predictions)",
    ("run/evaluate.py", "evaluate_ensemble", "torch.from_numpy"): "the averaged host predictions, back as tensors for "
    "TaskMetrics, which moves them to the run's device",
    ("train/metrics.py", "grouped_auc", ".cpu()"): "rows are exchanged as pickled objects and grouped on the host; "
    "the metric itself runs on the run's device",
    ("train/metrics.py", "grouped_auc", "torch.arange"): "row indices of the host grouping, then moved to the device",
    ("predict.py", "_score", ".cpu()"): "scores are written to a TSV",
    ("predict.py", "_score", ".numpy()"): "scores are written to a TSV",
    ("representations.py", "_vectors", ".cpu()"): "vectors are written to npz files",
    ("representations.py", "_vectors", ".numpy()"): "vectors are written to npz files",
    ("text/encoder.py", "TextEncoder.encode", ".cpu()"): "text vectors are written to the cache file",
    ("text/encoder.py", "TextEncoder.encode", ".numpy()"): "text vectors are written to the cache file",
    # host by nature
    ("data/loader.py", "BatchLoader.__init__", "torch.ones"): "batches are built on the host from memory-mapped "
    "shards; the pipeline copies each to the run's device (page-locked for a GPU)",
    ("data/loader.py", "BatchLoader._batch", "torch.ones"): "as above: a host batch",
    ("data/loader.py", "BatchLoader._batch", "torch.from_numpy"): "as above: a host batch",
    ("data/loader.py", "BatchLoader._jagged", "torch.from_numpy"): "as above: a host batch (its list features)",
    ("data/augment.py", "Augmentation.apply", "torch.from_numpy"): "the loader's augmentation draws, part of a host "
    "batch (as above)",
    ("data/synthetic.py", "_half_star_rating", "torch.from_numpy"): "data generation: host arrays written to files",
    ("data/synthetic.py", "_half_star_rating", ".numpy()"): "data generation: host arrays written to files",
    ("data/synthetic.py", "binary_auc", "torch.as_tensor"): "the generator's ceilings: host arrays",
    ("data/synthetic.py", "binary_auc", "torch.ones"): "the generator's ceilings: host arrays",
    ("train/checkpoint.py", "rng_state", "torch.from_numpy"): "numpy's RNG state, a host tensor in the rank file",
    ("train/checkpoint.py", "set_rng_state", ".numpy()"): "numpy's RNG state read back from the rank file",
    ("serving.py", "RawRowEncoder.__init__", "torch.from_numpy"): "serve.pt's vocabularies: raw strings are parsed by "
    "the TorchScript interpreter on the host, and the lookups run there",
    ("serving.py", "RawRowEncoder._encode", "torch.tensor"): "serve.pt's parsed rows, on the host (as above)",
    ("serving.py", "RawRowEncoder._rows", "torch.arange"): "serve.pt's vocabulary rows, on the host (as above)",
    ("serving.py", "RawRowEncoder._encode", "torch.zeros"): "serve.pt's parsed list values (none), on the host (as "
    "above)",
    ("serving.py", "RawRowEncoder._list_rows", "torch.arange"): "serve.pt's vocabulary rows of a list, on the host "
    "(as above)",
    ("serving.py", "ServingModel._score", "torch.zeros"): "serve.pt's scores of an empty batch, returned to the host",
    ("serving.py", "ServingModel._score", ".cpu()"): "serve.pt returns host tensors, wherever its model runs",
    ("pruning.py", "row_norms", ".cpu()"): "each row's norm, to numpy to rank the rows of every table together",
    ("pruning.py", "row_norms", ".numpy()"): "as above",
    ("run/prepare.py", "prepare_job", "torch.from_numpy"): "the text vectors, copied into the sharded table's shards "
    "(copy_ moves them to each shard's device)",
    # module state: built with the model on the host, moved with it (DistributedModelParallel's .to(device))
    ("build.py", "build_retrieval_loss", "torch.from_numpy"): "item counts, a buffer of the retrieval loss",
    ("weighting.py", "UncertaintyWeighting.__init__", "torch.zeros"): "a parameter of the weighting",
    ("weighting.py", "GradNormWeighting.__init__", "torch.ones"): "a buffer of the weighting",
    ("weighting.py", "GradNormWeighting.__init__", "torch.zeros"): "buffers of the weighting",
}


def host_sites(root: Path = PACKAGE) -> List[Tuple[str, str, str]]:
    """Every place a package module names the host or leaves a tensor there: a "cpu" literal that is not a
    comparison (comparisons decide, they place nothing), ``.cpu()``, ``.numpy()``, and a torch factory without a
    device that is not moved at once (``torch.from_numpy(x).to(device)`` is placed)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = str(path.relative_to(root))
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

        def scope(node: ast.AST) -> str:
            names = []
            while node in parents:
                node = parents[node]
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.append(node.name)
            return ".".join(reversed(names))

        def compared(node: ast.AST) -> bool:  # ``x == "cpu"``, ``x in ("cpu", "cuda")``
            while isinstance(parents[node], (ast.Tuple, ast.List, ast.Set)):
                node = parents[node]
            return isinstance(parents[node], ast.Compare)

        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == "cpu" and not compared(node):
                found.append((module, scope(node), 'literal "cpu"'))
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            name = node.func.attr
            if name in ("cpu", "numpy") and not node.args:
                found.append((module, scope(node), f".{name}()"))
            on_torch = isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
            moved = isinstance(parents[node], ast.Attribute) and parents[node].attr == "to"
            if on_torch and name in FACTORIES and not any(k.arg == "device" for k in node.keywords) and not moved:
                found.append((module, scope(node), f"torch.{name}"))
    return found


def test_no_package_module_puts_tensors_on_the_host_outside_the_justified_sites():
    found = set(host_sites())
    unjustified = sorted(found - set(ALLOWED))
    assert not unjustified, f"host sites without a reason in ALLOWED (take the run's device, or justify): {unjustified}"
    assert not sorted(set(ALLOWED) - found), "ALLOWED names sites that are gone: remove them"


def test_the_scan_finds_each_kind_of_host_site(tmp_path):
    (tmp_path / "m.py").write_text(
        "import torch\n"
        "def f(x, d='cpu'):\n"
        "    if d == 'cpu' or d in ('cpu', 'cuda'):\n"  # decisions: not sites
        "        pass\n"
        "    y = torch.zeros(3)\n"
        "    z = torch.zeros(3, device=x.device) + torch.from_numpy(x).to(d)\n"  # placed: not sites
        "    return x.cpu().numpy(), torch.device('cpu')\n"
    )
    assert sorted(host_sites(tmp_path)) == [("m.py", "f", '.cpu()'), ("m.py", "f", '.numpy()'),
                                            ("m.py", "f", 'literal "cpu"'), ("m.py", "f", 'literal "cpu"'),
                                            ("m.py", "f", "torch.zeros")]  # fmt: skip


def test_device_names_are_checked_against_the_machine():
    assert usable_device("cpu") == torch.device("cpu") and DEFAULT_DEVICE == "cpu"
    with pytest.raises(DeviceError, match=r"mps: not supported; allowed: cpu, cuda, cuda:N"):
        usable_device("mps")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        assert usable_device("cuda") == torch.device("cuda")
        with pytest.raises(DeviceError, match=f"this machine has {count} CUDA GPU"):
            usable_device(f"cuda:{count}")
    else:
        with pytest.raises(DeviceError, match=r"^CUDA is not available on this machine \(torch .*\); use cpu$"):
            usable_device("cuda:0")


@pytest.mark.parametrize("command", [["evaluate"], ["predict", "--checkpoint", "x", "--input", "-"],
                                     ["export", "--checkpoint", "x", "--out", "y"], ["vectors", "--checkpoint", "x",
                                                                                     "--out", "y"]])  # fmt: skip
def test_every_serving_command_takes_a_device_and_refuses_one_it_cannot_use(command, capsys):
    assert build_parser().parse_args(command).device == DEFAULT_DEVICE
    assert build_parser().parse_args([*command, "--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(SystemExit) as exit_:  # a spelling argparse refuses, as every out-of-range option
        main([*command, "--device", "gpu"])
    assert exit_.value.code == 2 and "expected cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err
    if torch.cuda.is_available():
        return  # the refusal below needs a machine without CUDA
    assert main([*command, "--device", "cuda"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("torchrec-mtl: --device cuda: CUDA is not available on this machine") and "use cpu" in line


def test_the_process_group_runs_on_the_device_it_is_given():
    """In this process the group is gloo's (tests/conftest.py opens it so on a GPU machine too)."""
    from torchrec_mtl.train.distributed import init_distributed

    assert init_distributed(device=torch.device("cpu", 0)).device == torch.device("cpu", 0)
    assert init_distributed(device=torch.device("cpu")).device == torch.device("cpu")
    assert init_distributed().device == torch.device("cpu")  # an open gloo group: the host
    with pytest.raises(DeviceError, match="already runs gloo, not nccl"):
        init_distributed(device=torch.device("cuda"))
