"""A timm backbone pruned inside a user's model: examples/backbone_segmentation.py at a tiny size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import timm
import torch
from helpers_timing import fake_ms
from torch import nn

import mdp_trt
from mdp_trt.errors import UnsupportedModelError

ROOT = Path(__file__).resolve().parents[1]


def _example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("backbone_segmentation", ROOT / "examples" / "backbone_segmentation.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_example_prunes_only_the_backbone(tmp_path: Path, fake_timing: list[nn.Module]) -> None:
    ex = _example()
    model, result = ex.run("test_resnet", side=32, n_train=64, n_val=16, target="1.5x", max_choices=4,
                           calibration_plans=4, importance_batches=2, lut=tmp_path / "t.sqlite")
    pruned = result.model
    assert isinstance(pruned, ex.SegModel) and pruned is not model
    # Latency was measured on the whole model, never on the backbone alone.
    assert fake_timing and all(isinstance(m, ex.SegModel) for m in fake_timing)
    # The head is the user's, untouched; the backbone is smaller but gives the same width.
    head, new_head = model.head.state_dict(), pruned.head.state_dict()
    assert head.keys() == new_head.keys() and all(torch.equal(head[k], new_head[k]) for k in head)
    params = [sum(p.numel() for p in m.parameters()) for m in (model.backbone, pruned.backbone)]
    assert params[1] < params[0]
    assert result.report.params_before - result.report.params_after == params[0] - params[1]
    assert any(d["kept"] is None or d["kept"] < d["size"] for d in result.report.dims)
    assert pruned.backbone.num_features == model.backbone.num_features
    x = torch.randn(2, 1, 32, 32)
    assert pruned(x).shape == model(x).shape == (2, 1, 32, 32)
    assert result.report.part == "backbone"
    assert result.report.pruned_ms == pytest.approx(fake_ms(pruned)) and result.report.dense_ms == fake_ms(model)
    assert "SegModel.backbone" in result.report.model
    # The files rebuild the whole pruned model: the part from pruned.pt, the rest from the state dict.
    result.save(tmp_path / "out")
    rebuilt = ex.SegModel("test_resnet")
    rebuilt.backbone = mdp_trt.load_pruned(tmp_path / "out" / "pruned.pt")
    rebuilt.load_state_dict(torch.load(tmp_path / "out" / "model_state.pt", weights_only=True))
    assert torch.allclose(rebuilt.eval()(x), pruned.eval()(x), atol=1e-5)
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_features_only_backbone_is_refused_in_one_line() -> None:
    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = timm.create_model("test_resnet", features_only=True, out_indices=(3,))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.backbone(x)[-1]

    with pytest.raises(UnsupportedModelError, match="features_only=True") as info:
        mdp_trt.prune(Dense(), "2x", part="backbone", data=[torch.zeros(1, 3, 32, 32)], loss_fn=lambda m, b: m(b).sum())
    assert "num_classes=0" in str(info.value) and "\n" not in str(info.value)


def test_part_needs_data() -> None:
    class Cls(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = timm.create_model("test_resnet", num_classes=0)
            self.fc = nn.Linear(self.backbone.num_features, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.backbone(x))

    with pytest.raises(mdp_trt.MdpError, match="needs data="):
        mdp_trt.prune(Cls(), "2x", part="backbone")


def test_output_width_is_kept_when_the_last_stage_is_one_block() -> None:
    # timm's test_resnet has one block per stage: its last stage's width is that block's own dim,
    # and it is the width the head reads.
    from mdp_trt.models import SpaceConfig
    from mdp_trt.part import Subject
    from mdp_trt.surface import sample_plans

    ex = _example()
    model = ex.SegModel("test_resnet").eval()
    subject = Subject(model, "backbone")
    space = subject.space(SpaceConfig(max_choices=4, resolution=32))
    assert ("layer4.res", "output width of the pruned part (the head reads it)") in space.locked
    x = torch.randn(1, 1, 32, 32)
    for plan in sample_plans(space, 12, seed=0):
        assert subject.cut(plan).eval()(x).shape == (1, 1, 32, 32)


def test_dense_rebuild_is_made_once_per_space_and_gives_the_users_outputs() -> None:
    from mdp_trt.models import SpaceConfig
    from mdp_trt.part import Subject

    ex = _example()
    model = ex.SegModel("test_resnet").eval()
    subject = Subject(model, "backbone")
    space = subject.space(SpaceConfig(max_choices=4, resolution=32))
    whole, part = subject.dense(space), subject.dense(space, whole=False)
    assert subject.dense(space) is whole and subject.dense(space, whole=False) is part  # built once
    assert whole is not model and part is not model.backbone and whole.backbone is part
    assert not whole.training and not part.training
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(whole(x), model(x), atol=1e-5)  # the rebuild runs as the user's model does
    # Keyed by the structure: a coarser grid of the same model shares it, another input size does not.
    assert subject.dense(subject.space(SpaceConfig(max_choices=2, resolution=32))) is whole
    other = subject.space(SpaceConfig(max_choices=4, resolution=64))
    assert other.space_id != space.space_id and subject.dense(other) is not whole
