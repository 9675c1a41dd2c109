import numpy as np
import pytest
import torch
from torch import nn

from adaptune.errors import PlanError
from adaptune.optim import build_optimizer, param_groups, warmup_linear_schedule
from adaptune.plans import Plan, TensorPlan
from adaptune.settings import OPTIMIZERS, TrainSettings


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def plan_for(model: nn.Module, frozen=(), multipliers=None) -> Plan:
    multipliers = multipliers or {}
    return Plan(
        strategy="test",
        kind="test",
        tensors=[
            TensorPlan(
                n,
                "l",
                0,
                p.numel(),
                n in frozen,
                0.0 if n in frozen else multipliers.get(n, 1.0),
                "",
            )
            for n, p in model.named_parameters()
        ],
    )


def test_groups_per_multiplier_and_decay():
    model = tiny_net()
    plan = plan_for(
        model, frozen={"0.weight", "0.bias"}, multipliers={"2.weight": 2.0, "2.bias": 2.0}
    )
    groups = param_groups(model, plan, weight_decay=0.1)
    by_key = {(g["lr_multiplier"], g["weight_decay"]): g["names"] for g in groups}
    assert by_key == {
        (1.0, 0.0): ["1.weight", "1.bias"],
        (2.0, 0.1): ["2.weight"],
        (2.0, 0.0): ["2.bias"],
    }
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad
    with_decay = param_groups(model, plan, weight_decay=0.1, decay_norm_and_bias=True)
    assert {g["weight_decay"] for g in with_decay} == {0.1}


def test_plan_must_match_the_model():
    model = tiny_net()
    plan = plan_for(model)
    plan.tensors = plan.tensors[:-1]
    with pytest.raises(PlanError, match=r"not in the plan \['2.bias'\]"):
        param_groups(model, plan, 0.0)


def test_all_frozen_is_refused():
    model = tiny_net()
    with pytest.raises(PlanError, match="freezes every tensor"):
        param_groups(model, plan_for(model, frozen={n for n, _ in model.named_parameters()}), 0.0)


@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_update_scales_with_the_multiplier(optimizer_name):
    """A step of lr x m moves a parameter m times as far as a step of lr (the optimizer's state
    depends on gradients only, which the reset above keeps identical)."""
    settings = TrainSettings(optimizer=optimizer_name, lr=1e-2, weight_decay=0.0)

    def updates(multiplier: float) -> dict[str, torch.Tensor]:
        net = tiny_net()
        plan = plan_for(net, multipliers={n: multiplier for n, _ in net.named_parameters()})
        optimizer = build_optimizer(param_groups(net, plan, 0.0), settings)
        generator = torch.Generator().manual_seed(0)
        deltas = {}
        for _ in range(3):
            before = {n: p.detach().clone() for n, p in net.named_parameters()}
            x, y = (
                torch.randn(5, 4, generator=generator),
                torch.randint(0, 3, (5,), generator=generator),
            )
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
            deltas = {n: p.detach() - before[n] for n, p in net.named_parameters()}
            for n, p in net.named_parameters():
                p.data.copy_(before[n])  # same weights, so same gradients, for both runs
        return deltas

    base, scaled = updates(1.0), updates(3.0)
    for name in base:
        assert base[name].abs().max() > 0, name
        torch.testing.assert_close(scaled[name], 3.0 * base[name], rtol=1e-4, atol=1e-7)


def test_group_learning_rates_follow_multipliers_through_the_schedule():
    model = tiny_net()
    plan = plan_for(model, multipliers={"2.weight": 4.0, "2.bias": 4.0})
    optimizer = build_optimizer(param_groups(model, plan, 0.0), TrainSettings(lr=0.1))
    scheduler = warmup_linear_schedule(optimizer, total_steps=10, warmup_ratio=0.2)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        lrs = {g["lr_multiplier"]: g["lr"] for g in optimizer.param_groups}
        assert lrs[4.0] == pytest.approx(4.0 * lrs[1.0])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 5 / 8)


def test_auto_rgn_sets_lr_by_relative_gradient_norm():
    from adaptune.optim import AutoRGN

    model = tiny_net()
    groups = param_groups(model, plan_for(model), 0.0, per_tensor=True)
    assert [g["names"] for g in groups] == [[n] for n, _ in model.named_parameters()]
    optimizer = build_optimizer(groups, TrainSettings(lr=0.1, optimizer="sgd"))
    scheduler = warmup_linear_schedule(optimizer, total_steps=10, warmup_ratio=0.0)
    dynamics = AutoRGN(optimizer, scheduler, base_lr=0.1)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    nn.functional.cross_entropy(model(x), y).backward()
    ratios = [float(p.grad.norm() / p.detach().norm()) for p in model.parameters()]
    top = max(r for r in ratios if np.isfinite(r))
    dynamics.before_step(first_step_of_epoch=True)
    lrs = [g["lr"] for g in optimizer.param_groups]
    # The LayerNorm bias starts at zero: no relative norm, so the base rate.
    assert lrs == pytest.approx([0.1 * r / top if np.isfinite(r) else 0.1 for r in ratios])
    assert max(g["lr_multiplier"] for g in optimizer.param_groups) == 1.0
    # An exempt tensor (the new head) keeps the base rate and leaves the normalisation.
    head = list(dict(model.named_parameters()))[-2]
    AutoRGN(optimizer, scheduler, base_lr=0.1, exempt=[head]).before_step(True)
    body = [r for (n, _), r in zip(model.named_parameters(), ratios, strict=True) if n != head]
    top_body = max(r for r in body if np.isfinite(r))
    expected = [
        0.1 if n == head or not np.isfinite(r) else 0.1 * r / top_body
        for (n, _), r in zip(model.named_parameters(), ratios, strict=True)
    ]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected)
    dynamics.before_step(first_step_of_epoch=True)
    optimizer.step()
    scheduler.step()  # the schedule keeps scaling the new rates
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.9 * lr for lr in lrs])
    for p in model.parameters():
        p.grad = 3 * p.grad
    dynamics.before_step(first_step_of_epoch=False)  # only the first step of an epoch re-measures
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.9 * lr for lr in lrs])


@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_frozen_tensors_hold_no_optimizer_state(optimizer_name):
    model = tiny_net()
    plan = plan_for(model, frozen={"0.weight", "0.bias"})
    optimizer = build_optimizer(
        param_groups(model, plan, 0.01), TrainSettings(optimizer=optimizer_name, lr=0.1)
    )
    nn.functional.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 3, (5,))).backward()
    optimizer.step()
    held = {id(p) for p in optimizer.state}
    assert id(model[0].weight) not in held and id(model[0].bias) not in held
    assert model[0].weight.grad is None
    assert id(model[2].weight) in held  # trainable tensors do (SGD: its momentum buffer)
