import pytest
import torch
from torch import nn

from adaptune.errors import PlanError
from adaptune.optim import OPTIMIZERS, build_optimizer, param_groups, warmup_linear_schedule
from adaptune.plans import Plan, TensorPlan
from adaptune.settings import TrainSettings


def settings(**values) -> TrainSettings:
    return TrainSettings.from_config(values)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def plan_for(model: nn.Module, frozen=(), multipliers=None, head=()) -> Plan:
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
                is_head=n in head,
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
    train = settings(optimizer=optimizer_name, lr=1e-2, weight_decay=0.0)

    def updates(multiplier: float) -> dict[str, torch.Tensor]:
        net = tiny_net()
        plan = plan_for(net, multipliers={n: multiplier for n, _ in net.named_parameters()})
        optimizer = build_optimizer(param_groups(net, plan, 0.0), train)
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
    optimizer = build_optimizer(param_groups(model, plan, 0.0), settings(lr=0.1))
    scheduler = warmup_linear_schedule(optimizer, total_steps=10, warmup_ratio=0.2)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        lrs = {g["lr_multiplier"]: g["lr"] for g in optimizer.param_groups}
        assert lrs[4.0] == pytest.approx(4.0 * lrs[1.0])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 5 / 8)


@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_frozen_tensors_hold_no_optimizer_state(optimizer_name):
    model = tiny_net()
    plan = plan_for(model, frozen={"0.weight", "0.bias"})
    optimizer = build_optimizer(
        param_groups(model, plan, 0.01), settings(optimizer=optimizer_name, lr=0.1)
    )
    nn.functional.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 3, (5,))).backward()
    optimizer.step()
    held = {id(p) for p in optimizer.state}
    assert id(model[0].weight) not in held and id(model[0].bias) not in held
    assert model[0].weight.grad is None
    assert id(model[2].weight) in held  # trainable tensors do (SGD: its momentum buffer)
