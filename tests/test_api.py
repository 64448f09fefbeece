"""The Python API: the same plan and report as the command on the same inputs, a user's own
data and loss, and the files of ``save``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers_timing import fake_ms
from torch import nn

import mdp_trt
from mdp_trt.prune import main as prune_main
from mdp_trt.report import EXIT_CODES

TINY = {"resolution": 32, "max_choices": 4, "calibration_plans": 4, "importance_batches": 2,
        "train_batch_size": 8, "train_limit": 32, "val_limit": 16, "quiet": True}
ARGV = ["--model", "test_resnet", "--resolution", "32", "--max-choices", "4", "--calibration-plans", "4",
        "--importance-batches", "2", "--train-batch-size", "8", "--train-limit", "32", "--val-limit", "16",
        "--quiet"]


def _without_timing(report: dict[str, Any]) -> dict[str, Any]:
    """The report less the job's and the solver's wall times."""
    out = {k: v for k, v in report.items() if k != "wall_s"}
    out["rounds"] = [{k: v for k, v in r.items() if k != "solve_s"} for r in report["rounds"]]
    return out


def test_api_gives_the_command_s_plan_and_report(tmp_path: Path, fake_timing: list[nn.Module]) -> None:
    table = tmp_path / "t.sqlite"
    code = prune_main([*ARGV, "--engine-target", "1.5x", "--lut", str(table), "--out", str(tmp_path / "cmd")])
    result = mdp_trt.prune("test_resnet", "1.5x", lut=table, out=tmp_path / "api", **TINY)
    # Any outcome (the fake clock is no engine the terms were profiled on), the same for both.
    assert code == EXIT_CODES[result.report.outcome]
    cmd = json.loads((tmp_path / "cmd" / "report.json").read_text())
    api = json.loads((tmp_path / "api" / "report.json").read_text())
    assert _without_timing(api) == _without_timing(cmd)
    assert _without_timing(result.report.to_dict()) == _without_timing(cmd)
    plans = [json.loads((tmp_path / d / "plan.json").read_text()) for d in ("api", "cmd")]
    for p in plans:
        del p["meta"]["solve_s"]
    assert plans[0] == plans[1]
    assert sorted(p.name for p in (tmp_path / "api").iterdir()) == sorted(p.name for p in (tmp_path / "cmd").iterdir())
    assert result.plan.widths == json.loads((tmp_path / "cmd" / "plan.json").read_text())["widths"]
    assert cmd["params_after"] < cmd["params_before"]
    # The returned model is the one saved.
    assert sum(p.numel() for p in result.model.parameters()) == cmd["params_after"]
    saved = mdp_trt.load_pruned(tmp_path / "api" / "pruned.pt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(saved(x), result.model.eval()(x), atol=1e-5)


def test_module_with_own_data_and_loss(tmp_path: Path, fake_timing: list[nn.Module]) -> None:
    """A module, a list of batches and a loss of the user's: the README's snippet."""
    # --- README: Python API ---
    import mdp_trt

    model = mdp_trt.create_model("test_resnet", num_classes=10)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(4)]

    def loss_fn(model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)

    result = mdp_trt.prune(model, "1.5x", data=batches, loss_fn=loss_fn, input_size=(3, 32, 32),
                           max_choices=4, calibration_plans=4, lut=tmp_path / "t.sqlite")
    print(result.report.speedup, result.plan.widths)
    result.save(tmp_path / "out")
    # --- end ---
    # The report's latency is the returned model's, as measured (here by the fake clock: size).
    assert result.report.pruned_ms == pytest.approx(fake_ms(result.model))
    assert result.report.params_after < result.report.params_before
    assert result.model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)  # the user's model is left as it was
    assert sum(p.numel() for p in model.parameters()) == result.report.params_before
    files = json.loads((tmp_path / "out" / "report.json").read_text())["files"]
    assert {"plan.json", "pruned.pt", "model.onnx", "report.json", "report.md"} <= set(files)
    assert all((tmp_path / "out" / f).is_file() for f in files)


def test_loss_fn_is_the_importance(tmp_path: Path, fake_timing: list[nn.Module]) -> None:
    """Importance follows the user's loss: a loss on one class only gives another plan's scores."""
    from mdp_trt.importance import taylor
    from mdp_trt.part import Subject

    model = mdp_trt.create_model("test_resnet", num_classes=10).eval()
    space = Subject(model).full_space(mdp_trt.SpaceConfig(max_choices=4, resolution=32))
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    default = taylor(model, space, batches, 2)
    own = taylor(model, space, batches, 2, loss_fn=lambda m, b: m(b[0])[:, 3].sum())
    assert any(not torch.allclose(torch.as_tensor(default.units[d.name]), torch.as_tensor(own.units[d.name]))
               for d in space.dims)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"tolerence": 3.0}, "unknown option(s) tolerence"),
    ({"input_size": (3, 32, 16)}, "square input"),
    ({"input_size": (1, 32, 32)}, "input_size has 1 channels, the model takes 3"),
    ({"loss_fn": lambda m, b: m(b).sum()}, "loss_fn= needs data="),
    ({"part": "backbone"}, "has no submodule 'backbone'"),
])
def test_bad_arguments_one_line(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(mdp_trt.MdpError, match=None) as info:
        mdp_trt.prune(mdp_trt.create_model("test_resnet"), "2x", **kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_prune_is_callable_after_the_command_module_is_imported() -> None:
    import mdp_trt.prune as command

    assert callable(mdp_trt.prune) and command.main is prune_main
    with pytest.raises(mdp_trt.MdpError, match="cannot read target"):
        mdp_trt.prune(mdp_trt.create_model("test_resnet"), "fast")
