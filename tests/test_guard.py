"""bnlint.guard on small models trained for a few steps: what fires, what does not, and cleanup."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from bnlint.training_guard import BnlintGuardError, BnlintWarning, GuardEvent, guard  # noqa: E402


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def backbone_and_head() -> nn.Sequential:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    return nn.Sequential(backbone, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def train_steps(model: nn.Module, batches: list[Any], lr: float = 0.05) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    for x in batches:
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_batch_of_one_warns_before_pytorch_refuses_it() -> None:
    model = mlp()
    with guard(model) as g, pytest.warns(BnlintWarning, match="1 value per channel") as record:
        train_steps(model, [torch.randn(32, 6)] * 3)  # healthy steps: nothing
        assert g.events == []
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            train_steps(model, [torch.randn(1, 6)])  # PyTorch raises; the guard already warned
    assert [e.kind for e in g.events] == ["single-value"] and g.events[0].layers == ("1",)
    assert g.events[0].values["values_per_channel"] == 1
    assert len(record) == 1 and record[0].filename == __file__  # points at the user's code
    assert no_hooks(model)


def test_raise_mode_stops_the_layer_before_its_statistics_change() -> None:
    model = mlp()
    before = model[1].running_mean.clone()
    with guard(model, on="raise"), pytest.raises(BnlintGuardError) as info:
        model(torch.randn(1, 6))
    assert info.value.event.kind == "single-value"
    assert torch.equal(model[1].running_mean, before) and int(model[1].num_batches_tracked) == 0
    assert no_hooks(model)


def test_small_but_legal_batch_warns_once_per_layer() -> None:
    model = mlp()
    with guard(model) as g, pytest.warns(BnlintWarning, match="2 values per channel"):
        train_steps(model, [torch.randn(2, 6)] * 4)  # legal for PyTorch, noisy statistics
    assert [(e.kind, e.layers) for e in g.events] == [("small-batch", ("1",))]


def test_threshold_and_once_are_configurable() -> None:
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may warn at this threshold
        with guard(model, min_values_per_channel=2):
            train_steps(model, [torch.randn(2, 6)] * 2)
    events: list[GuardEvent] = []
    with guard(model, on=events.append, once=False):
        train_steps(model, [torch.randn(4, 6)] * 3)
    assert [e.kind for e in events] == ["small-batch"] * 3


def test_one_sample_conv_batch_is_per_sample_statistics() -> None:
    model = backbone_and_head()
    events: list[GuardEvent] = []
    with guard(model, on=events.append):
        train_steps(model, [torch.randn(1, 3, 8, 8)])  # 64 values per channel, but one sample
    assert [(e.kind, e.layers) for e in events] == [("small-batch", ("0.1", "0.4"))]
    assert "batch of 1 sample" in events[0].message


def test_frozen_backbone_in_train_mode_fires_once_naming_every_layer() -> None:
    model = backbone_and_head()
    for p in model[0].parameters():
        p.requires_grad = False
    model.train()  # the classic trap: train() undoes any earlier backbone.eval()
    with guard(model) as g, pytest.warns(BnlintWarning, match="frozen"):
        train_steps(model, [torch.randn(8, 3, 8, 8)] * 3)
    assert [(e.kind, e.layers) for e in g.events] == [("frozen-train", ("0.1", "0.4"))]


def test_frozen_backbone_in_eval_mode_is_quiet() -> None:
    model = backbone_and_head()
    for p in model[0].parameters():
        p.requires_grad = False
    model.train()
    model[0].eval()  # the correct freeze
    before = model[0][1].running_var.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with guard(model) as g:
            train_steps(model, [torch.randn(8, 3, 8, 8)] * 3)
    assert g.events == [] and torch.equal(model[0][1].running_var, before)


def test_train_mode_under_no_grad_fires_and_eval_does_not() -> None:
    model = mlp()
    train_steps(model, [torch.randn(32, 6)] * 3)
    with guard(model) as g:
        with torch.no_grad(), pytest.warns(BnlintWarning, match="no_grad"):
            model(torch.randn(32, 6))  # forgot model.eval() before inference
        model.eval()
        with torch.no_grad():
            model(torch.randn(32, 6))
    assert [e.kind for e in g.events] == ["no-grad-train"]


def test_update_bn_style_reestimation_is_not_reported() -> None:
    model = mlp()
    model[1].momentum = None  # what torch.optim.swa_utils.update_bn does before its no_grad passes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with guard(model), torch.no_grad():
            model(torch.randn(32, 6))


def test_hooks_are_removed_on_exit_even_when_the_body_raises() -> None:
    model = backbone_and_head()
    with pytest.raises(RuntimeError, match="boom"):
        with guard(model):
            assert not no_hooks(model)
            raise RuntimeError("boom")
    assert no_hooks(model)
    with pytest.raises(BnlintGuardError):
        with guard(model, on="raise"):
            model(torch.randn(1, 3, 8, 8))
    assert no_hooks(model)


def test_usable_as_removable_hooks_and_reenterable() -> None:
    model = mlp()
    g = guard(model, on=lambda e: None)
    assert g.attached and not no_hooks(model)
    g.remove()
    g.remove()  # idempotent
    assert not g.attached and no_hooks(model)
    with g:
        assert g.attached
    assert no_hooks(model)


@pytest.mark.parametrize("kwargs", [{"on": "explode"}, {"min_values_per_channel": 1}, {"checks": ["nope"]}])
def test_bad_options_are_rejected_without_attaching(kwargs: dict[str, Any]) -> None:
    model = mlp()
    with pytest.raises(ValueError):
        guard(model, **kwargs)
    assert no_hooks(model)
