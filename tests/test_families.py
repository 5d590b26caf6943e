"""Any CNN, not only the built-in five: torchvision's classification families and a user's own modules, given by
class_path, through allocation, masks, every repair preset, RR, export and reload. Small widths, 3x32x32 synthetic
images, random weights with BN statistics from data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_repair.allocation import Allocation, allocate
from lightning_repair.diagnostics import rr_profile
from lightning_repair.evaluation import evaluate
from lightning_repair.export import load_exported
from lightning_repair.graph import UntraceableModelError
from lightning_repair.layers import prunable_layers
from lightning_repair.masks import magnitude_mask
from lightning_repair.models import build_network, load_weights
from lightning_repair.operators import PRESETS, parse_recipe
from lightning_repair.pipeline import prune_and_repair

from helpers import pipeline_config, read_metrics, run_dir, run_fit, write_config

IMAGE = 32
FAMILIES = {
    "resnext": {"class_path": "user_models.SmallResNet", "init_args": {"groups": 4, "width_per_group": 16}},
    "wide_resnet": {"class_path": "user_models.SmallResNet", "init_args": {"width_per_group": 128}},
    "mobilenet_v2": {
        "class_path": "torchvision.models.MobileNetV2", "init_args": {"num_classes": 10, "width_mult": 0.25},
    },
    "mobilenet_v3_small": {"class_path": "user_models.MobileNetV3Small", "init_args": {"width_mult": 0.25}},
    "efficientnet_b0": {
        "class_path": "user_models.EfficientNetB0", "init_args": {"width_mult": 0.25, "depth_mult": 0.25},
    },
    "regnet_y": {"class_path": "user_models.SmallRegNetY"},
    "shufflenet_v2": {
        "class_path": "user_models.ShuffleNetV2",
        "init_args": {"stages_repeats": [1, 1, 1], "stages_out_channels": [8, 16, 32, 64, 128], "num_classes": 10},
    },
}  # fmt: skip
USER_MODULE = {"class_path": "user_models.GatedCNN", "init_args": {"width": 8}}


def calibrated(spec: dict, seed: int = 0) -> nn.Module:
    """The network with random weights and BN running statistics from data, so pruning really perturbs it."""
    torch.manual_seed(seed)
    model = build_network(spec).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, IMAGE, IMAGE))
    return model.eval()


@pytest.fixture(scope="module")
def dense_models() -> dict[str, nn.Module]:
    return {}


def dense_model(cache: dict, family: str) -> nn.Module:
    if family not in cache:
        cache[family] = calibrated(FAMILIES[family])
    return cache[family]


def fit_config(tmp_path, spec: dict, repair: str, **model_args):
    """A tiny ``lightning-repair fit`` run of the network ``spec`` on 3x32x32 synthetic images."""
    checkpoint = tmp_path / "dense.pt"
    torch.save(calibrated(spec).state_dict(), checkpoint)
    config = pipeline_config(tmp_path, checkpoint, network=spec, allocation="lamp", repair=repair, **model_args)
    config["data"]["synthetic_shape"] = [10, 3, IMAGE]
    return write_config(tmp_path / "config.yaml", config)


def check_run(tmp_path, spec: dict) -> dict:
    """The run's budget is exact, its accuracies finite, and its export reloads from metrics.json's network config
    with the masks holding and the same accuracy."""
    metrics = read_metrics(tmp_path)
    rows = metrics["layers"]
    total, kept = sum(r["numel"] for r in rows), sum(r["kept"] for r in rows)
    assert kept == round(0.1 * total)  # sparsity 0.9, exactly
    assert all(0.0 <= metrics["accuracy"][k] <= 1.0 for k in ("dense", "pruned", "repaired"))
    model = build_network(metrics["config"]["network"])  # rebuilt from the recorded config alone
    for file in ("repaired.pt", "repaired.sparse.pt"):
        load_weights(model, load_exported(run_dir(tmp_path) / file))
        weights = {layer.name: layer.module.weight for layer in prunable_layers(model)}
        for r in rows:
            assert int((weights[r["name"]] != 0).sum()) <= r["kept"], (file, r["name"])
    images = torch.stack([torch.randn(3, IMAGE, IMAGE) for _ in range(4)])
    assert torch.isfinite(model.eval()(images)).all()
    assert type(model).__name__ == spec["class_path"].rsplit(".", 1)[-1]
    return metrics


@pytest.mark.parametrize("repair", ["bn_recalibration", "default"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_prunes_and_repairs_through_the_cli(tmp_path, family, repair):
    spec = FAMILIES[family]
    run_fit(fit_config(tmp_path, spec, repair, rr_grid=[0.9]))
    metrics = check_run(tmp_path, spec)
    assert metrics["config"]["network"]["class_path"] == spec["class_path"]
    assert all(row["rr"] is None or row["rr"] >= 0 for row in metrics["layers"])  # RR ran on every layer


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_preset_on_every_family(dense_models, family, preset):
    """The registry's presets, whoever adds them: masks hold (prune_and_repair checks), the budget is exact and
    the repaired model gives finite logits."""
    dense = dense_model(dense_models, family)
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(32, 3, IMAGE, IMAGE, generator=g)]
    test = [(torch.randn(16, 3, IMAGE, IMAGE, generator=g), torch.randint(10, (16,), generator=g))]
    recipe = parse_recipe(preset)
    result = prune_and_repair(dense, calibration, 0.9, Allocation("erk"), recipe, lambda m, _: evaluate(m, test))
    assert sum(r["kept"] for r in result.layers) == round(0.1 * sum(r["numel"] for r in result.layers))
    assert 0.0 <= result.repaired["top1"] <= 1.0
    with torch.no_grad():
        assert torch.isfinite(result.model(test[0][0])).all()


def test_user_module_by_class_path_in_yaml(tmp_path):
    """A module from the user's own package: depthwise conv, residual add with the BN second, SE-style gate."""
    run_fit(fit_config(tmp_path, USER_MODULE, "default"))
    metrics = check_run(tmp_path, USER_MODULE)
    roles = {row["name"]: row["role"] for row in metrics["layers"]}
    assert roles == {"stem.0": "first", "depthwise": "depthwise", "gate": "conv", "head": "classifier"}


def test_model_without_batchnorm_refuses_bn_operators_naming_both(tmp_path, capsys):
    spec = {"class_path": "user_models.NoBatchNormCNN"}
    with pytest.raises(SystemExit) as info:
        run_fit(fit_config(tmp_path, spec, "bn_recalibration"))
    assert info.value.code != 0
    message = capsys.readouterr().err
    assert "NoBatchNormCNN" in message and "bn_recalibration" in message
    assert not (run_dir(tmp_path) / "metrics.json").exists()
    # an operator that needs no BatchNorm runs
    run_fit(fit_config(tmp_path, spec, [{"op": "classifier_refit"}]))
    check_run(tmp_path, spec)


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.flip, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), DataDependent(), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.flip(self.bn(self.conv(x))).mean((2, 3)))


def test_untraceable_model_gets_the_engines_error():
    batches = [torch.randn(4, 3, 8, 8)]
    test = lambda m, _: {"top1": 0.0, "top5": 0.0, "samples": 0}  # noqa: E731
    with pytest.raises(UntraceableModelError, match="Untraceable is not traceable by torch.fx"):
        prune_and_repair(Untraceable().eval(), batches, 0.5, Allocation("lamp"), parse_recipe("default"), test)


def test_rr_damage_of_grouped_and_depthwise_convs_equals_brute_force():
    """D_raw of a depthwise and a grouped conv, each pruned alone at 0.5 on its own dense input."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),  # depthwise
        nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4), nn.ReLU(),  # grouped
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10),
    ).eval()  # fmt: skip
    batches = [torch.randn(8, 3, 12, 12)]
    profile = rr_profile(model, batches, grid=[0.5])
    inputs = {}
    hooks = [model[i].register_forward_pre_hook(lambda m, x, i=i: inputs.__setitem__(i, x[0])) for i in (2, 4)]
    with torch.no_grad():
        model(batches[0])
    for h in hooks:
        h.remove()
    for index in (2, 4):
        conv = model[index]
        dense = conv(inputs[index])
        pruned = F.conv2d(inputs[index], conv.weight * magnitude_mask(conv.weight, conv.weight.numel() // 2),
                          conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)  # fmt: skip
        expected = ((pruned - dense).square().sum() / dense.square().sum()).item()
        measured = profile.d_raw[profile.layers.index(str(index)), 0].item()
        assert measured == pytest.approx(expected, rel=1e-4)


def test_every_allocation_meets_the_budget_on_a_depthwise_network(dense_models):
    """Capped ERK's role:projection selector matches nothing in MobileNetV2: the other rules still apply."""
    model = dense_model(dense_models, "mobilenet_v2")
    total = sum(layer.numel for layer in prunable_layers(model))
    capped = Allocation("erk", keep_dense=["role:first"], overrides=[
        {"select": f"role:{role}", "max_density": 0.5} for role in ("conv", "projection", "classifier")])  # fmt: skip
    for spec in [*(Allocation(m) for m in ("uniform", "global", "erk", "lamp")), capped]:
        keep = allocate(model, 0.9, spec)
        assert sum(keep.values()) == round(0.1 * total), spec.method
    first = prunable_layers(model)[0]
    assert keep[first.name] == first.numel  # capped ERK's keep_dense held


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x, scale=None):
        y = self.bn(self.conv(x)).mean((2, 3))
        return self.fc(y if scale is None else y * scale)


def test_a_forward_with_more_than_one_input_is_refused_naming_them():
    """The engine feeds one batch of images: a second input (even with a default) would silently get images too."""
    with pytest.raises(UntraceableModelError, match=r"TwoInputs.forward takes 2 inputs \(x, scale\).*wrap it"):
        prune_and_repair(TwoInputs().eval(), [torch.randn(4, 3, 8, 8)], 0.5, "lamp", "default")


class ViewFlatten(nn.Module):
    """A LeNet-style forward: ``.view`` flattens a conv activation, which a channels-last tensor cannot do."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return self.fc(y.view(y.size(0), -1))


@pytest.mark.parametrize("preset", ["default", "reconstruct"])
def test_a_model_that_cannot_run_channels_last_is_repaired_and_evaluated_in_its_own_format(preset, monkeypatch):
    """On a CPU the walks and the evaluation run channels-last; a forward that cannot (``.view`` of a conv activation)
    is run in its own memory format instead, with a warning that names the error, and gives that format's results."""
    import lightning_repair.repair as engine

    torch.manual_seed(0)
    dense = ViewFlatten().train()
    with torch.no_grad():
        dense(torch.randn(32, 3, 6, 6))
    dense.eval()
    batches = [torch.randn(16, 3, 6, 6) for _ in range(2)]
    pruned = prune_and_repair(dense, batches, 0.5, "lamp", []).model
    masks = {layer.name: layer.module.weight != 0 for layer in prunable_layers(pruned)}
    with pytest.warns(UserWarning, match=r"does not run in torch.channels_last \(view size is not compatible"):
        ours = prune_and_repair(dense, batches, 0.5, "lamp", preset).model
    monkeypatch.setattr(engine, "WALK_FORMAT", torch.contiguous_format)
    own = prune_and_repair(dense, batches, 0.5, "lamp", preset).model
    for a, b in zip(ours.state_dict().values(), own.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert all((ours.get_submodule(name).weight != 0).le(mask).all() for name, mask in masks.items())
    test = [(torch.randn(8, 3, 6, 6), torch.randint(0, 10, (8,))) for _ in range(2)]
    with pytest.warns(UserWarning, match="evaluation: the model does not run channels-last"):
        result = evaluate(ours, test)
    logits = torch.cat([ours(x) for x, _ in test])
    labels = torch.cat([y for _, y in test])
    assert result["top1"] == (logits.argmax(1) == labels).float().mean().item()
    assert all(p.is_contiguous() for p in ours.parameters())
