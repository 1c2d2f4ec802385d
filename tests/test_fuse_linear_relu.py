"""fastadapt.fuse_linear_relu: which pairs it fuses, which it leaves alone, and that outputs, gradients
and state_dicts of the fused model equal the original's."""
import copy
import logging
import warnings

import pytest
import torch
from torch import nn

import fastadapt
from fastadapt import FusedLinearReLU

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _kinds(model):
    return [type(m).__name__ for m in model.modules() if not list(m.children())]


def _fuse_leaving(model, message):
    """fuse_linear_relu(model), which must warn with a message matching ``message`` (the unfused pairs)."""
    with pytest.warns(UserWarning, match=message):
        return fastadapt.fuse_linear_relu(model)


def _fuse_silently(model, **kwargs):
    """fuse_linear_relu(model) when every Linear->ReLU pair can be fused: no warning at all."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fastadapt.fuse_linear_relu(model, **kwargs)


def _check_equivalent(orig, fused, x, dtype=torch.float64):
    """Same outputs, same gradients for every parameter, same state_dict keys, loadable both ways."""
    assert list(orig.state_dict()) == list(fused.state_dict())
    outs, grads = [], []
    for m in (orig, fused):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape))
        outs.append(y.detach())
        grads.append({"input": xi.grad, **{n: p.grad for n, p in m.named_parameters()}})
    torch.testing.assert_close(outs[1], outs[0], **TOL[dtype])
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], **TOL[dtype], msg=lambda m: f"grad of {k}: {m}")
    # state_dicts load both ways and carry the values over
    other = copy.deepcopy(orig)
    for p in other.parameters():
        p.data.add_(1.0)
    fused.load_state_dict(other.state_dict())
    torch.testing.assert_close(fused(x), other(x), **TOL[dtype])
    orig.load_state_dict(fused.state_dict())
    torch.testing.assert_close(orig(x), other(x), **TOL[dtype])


def mnist_mlp(dtype=torch.float64):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_mnist_mlp(backend, dtype):
    model = mnist_mlp(dtype)
    before = _kinds(model)
    fused = fastadapt.fuse_linear_relu(model)
    assert _kinds(model) == before, "inplace=False must not touch the original"
    assert _kinds(fused) == ["Flatten", "FusedLinearReLU", "Identity", "Linear"]
    assert fused[1].weight is not model[1].weight  # a copy by default
    assert "1.weight" in fused.state_dict() and "1.bias" in fused.state_dict()
    _check_equivalent(model, fused, torch.rand(5, 1, 28, 28, dtype=dtype), dtype)


def test_inplace_returns_same_model(backend):
    model = mnist_mlp()
    w = model[1].weight
    out = fastadapt.fuse_linear_relu(model, inplace=True)
    assert out is model and isinstance(model[1], FusedLinearReLU) and model[1].weight is w


def test_nested_sequential_and_inplace_relu(backend):
    model = nn.Sequential(
        nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True)),
        nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 5), nn.ReLU())),
        nn.Linear(5, 3),
    ).double()
    fused = fastadapt.fuse_linear_relu(model)
    assert _kinds(fused) == ["FusedLinearReLU", "Identity"] * 3 + ["Linear"]
    _check_equivalent(model, fused, torch.randn(4, 6, dtype=torch.float64))


def test_linear_without_relu_stays(backend):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    fused = fastadapt.fuse_linear_relu(model)
    assert _kinds(fused) == ["Linear", "Tanh", "FusedLinearReLU", "Identity", "Linear"]
    _check_equivalent(model, fused, torch.randn(3, 4, dtype=torch.float64))
    last = nn.Sequential(nn.ReLU(), nn.Linear(4, 4)).double()  # Linear last, ReLU before it
    assert _kinds(fastadapt.fuse_linear_relu(last)) == ["ReLU", "Linear"]


def test_reused_relu_stays(backend):
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 6), relu, nn.Linear(6, 6), relu, nn.Linear(6, 2)).double()
    fused = _fuse_leaving(model, r"fused 0 Linear->ReLU pair\(s\), left 2 unfused \(0 -> 1: the Linear or the ReLU "
                                 r"appears more than once in the model; 2 -> 3: the Linear or the ReLU appears")
    assert _kinds(fused) == _kinds(model)
    assert all(not isinstance(m, FusedLinearReLU) for m in fused.modules())
    _check_equivalent(model, fused, torch.randn(3, 4, dtype=torch.float64))


def test_relu_shared_between_sequentials_stays(backend):
    relu = nn.ReLU()
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), relu), nn.Sequential(nn.Linear(4, 4), relu)).double()
    fused = _fuse_leaving(model, r"left 2 unfused \(0.0 -> 0.1: the Linear or the ReLU appears more than once")
    assert not any(isinstance(m, FusedLinearReLU) for m in fused.modules())


def test_shared_linear_stays(backend):
    lin = nn.Linear(4, 4)
    model = nn.Sequential(nn.Sequential(lin, nn.ReLU()), nn.Sequential(lin, nn.ReLU())).double()
    fused = _fuse_leaving(model, r"left 2 unfused \(0.0 -> 0.1: the Linear or the ReLU appears more than once")
    assert not any(isinstance(m, FusedLinearReLU) for m in fused.modules())


def test_hooks_block_fusion(backend):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o))
    model[3].register_forward_pre_hook(lambda m, i: None)
    fused = _fuse_leaving(model, r"fused 1 Linear->ReLU pair\(s\), left 2 unfused \(0 -> 1: the Linear or the "
                                 r"ReLU has hooks; 2 -> 3: the Linear or the ReLU has hooks\)")
    assert _kinds(fused) == ["Linear", "ReLU", "Linear", "ReLU", "FusedLinearReLU", "Identity"]


def test_subclasses_and_unsupported_dtype_stay(backend):
    class MyLinear(nn.Linear):
        pass

    class MyReLU(nn.ReLU):
        pass

    class MySequential(nn.Sequential):
        def forward(self, x):  # not the plain chain: the Linear's output is scaled before the ReLU sees it
            return self[1](2 * self[0](x))

    cases = [
        (nn.Sequential(MyLinear(3, 3), nn.ReLU()), "0 -> 1: MyLinear -> ReLU is a subclass pair"),
        (nn.Sequential(nn.Linear(3, 3), MyReLU()), "0 -> 1: Linear -> MyReLU is a subclass pair"),
        (MySequential(nn.Linear(3, 3), nn.ReLU()), "0 -> 1: MySequential overrides how nn.Sequential runs"),
        (nn.Sequential(nn.Linear(3, 3), nn.ReLU()).half(), "0 -> 1: the fused kernel takes no torch.float16 on cpu"),
    ]
    for model, why in cases:
        fused = _fuse_leaving(model, r"fused 0 Linear->ReLU pair\(s\), left 1 unfused \(" + why)
        assert not any(isinstance(m, FusedLinearReLU) for m in fused.modules())


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


class _Peeks(_Net):
    # reads the first Linear's output (the pre-activation) outside the Sequential
    def forward(self, x):
        return self.head(self.body(x)) + self.body[0](x).sum(-1, keepdim=True)


class _Untraceable(_Net):
    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace it
            return x
        return self.head(self.body(x))


def test_custom_module_traced(backend):
    model = _Net().double()
    fused = fastadapt.fuse_linear_relu(model)
    assert _kinds(fused) == ["FusedLinearReLU", "Identity", "FusedLinearReLU", "Identity", "Linear"]
    _check_equivalent(model, fused, torch.randn(4, 6, dtype=torch.float64))


def test_linear_output_used_elsewhere_stays(backend):
    model = _Peeks().double()
    fused = _fuse_leaving(model, r"fused 1 Linear->ReLU pair\(s\), left 1 unfused \(body.0 -> body.1: the Linear's "
                                 r"output is read outside its Sequential")
    # body.0 is read outside the chain; body.2 -> body.3 is still provably private
    assert _kinds(fused) == ["Linear", "ReLU", "FusedLinearReLU", "Identity", "Linear"]
    _check_equivalent(model, fused, torch.randn(4, 6, dtype=torch.float64))


def test_untraceable_custom_module_stays(backend):
    model = _Untraceable().double()
    fused = _fuse_leaving(model, r"left 2 unfused \(body.0 -> body.1: torch.fx cannot trace the model")
    assert _kinds(fused) == _kinds(model)


def test_already_fused_model_is_stable(backend):
    once = fastadapt.fuse_linear_relu(_Net().double())
    twice = fastadapt.fuse_linear_relu(once)
    assert _kinds(twice) == _kinds(once)
    _check_equivalent(once, twice, torch.randn(2, 6, dtype=torch.float64))


def test_fused_model_trains_like_original(backend):
    # one SGD step on each gives the same parameters
    model = mnist_mlp()
    fused = fastadapt.fuse_linear_relu(model)
    x, y = torch.rand(8, 784, dtype=torch.float64), torch.randint(0, 10, (8,))
    for m in (model, fused):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    for (n, p), (_, q) in zip(model.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(q, p, **TOL[torch.float64], msg=n)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be an nn.Module, got int"):
        fastadapt.fuse_linear_relu(3)
    with pytest.raises(TypeError, match="inplace must be a bool, got str"):
        fastadapt.fuse_linear_relu(nn.Sequential(), inplace="yes")


class _PlainMLP(nn.Sequential):
    """torchvision.ops.MLP's shape: an nn.Sequential subclass that only builds its layers in __init__."""

    def __init__(self, in_channels, hidden_channels):
        layers, in_dim = [], in_channels
        for hidden in hidden_channels[:-1]:
            layers += [nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(0.0)]
            in_dim = hidden
        layers += [nn.Linear(in_dim, hidden_channels[-1]), nn.Dropout(0.0)]
        super().__init__(*layers)


def _mlps():
    yield pytest.param(_PlainMLP, id="subclass")
    try:
        from torchvision.ops import MLP
    except ImportError:  # torchvision is optional: the subclass above has the same structure
        return
    yield pytest.param(MLP, id="torchvision")


@pytest.mark.parametrize("cls", list(_mlps()))
def test_sequential_subclass_with_plain_forward_is_fused(backend, caplog, cls):
    model = cls(784, [256, 128, 10]).double()
    with caplog.at_level(logging.INFO, logger="fastadapt.ops.fuse"):
        fused = _fuse_silently(model)
    assert [r.getMessage() for r in caplog.records] == [f"fuse_linear_relu: fused 2 Linear->ReLU pair(s) in {cls.__name__}"]
    assert type(fused) is cls
    assert _kinds(fused) == ["FusedLinearReLU", "Identity", "Dropout"] * 2 + ["Linear", "Dropout"]
    _check_equivalent(model, fused, torch.rand(5, 784, dtype=torch.float64))


def test_sequential_subclass_nested_in_a_module(backend):
    # the subclass reached through a custom module: the trace proves the pairs private
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = _PlainMLP(6, [8, 8, 3])

        def forward(self, x):
            return self.mlp(x) * 2

    model = Net().double()
    fused = _fuse_silently(model)
    assert _kinds(fused) == ["FusedLinearReLU", "Identity", "Dropout"] * 2 + ["Linear", "Dropout"]
    _check_equivalent(model, fused, torch.randn(4, 6, dtype=torch.float64))


def test_global_hooks_leave_every_pair(backend):
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        fused = _fuse_leaving(mnist_mlp(), r"fused 0 Linear->ReLU pair\(s\), left 1 unfused \(1 -> 2: global module "
                                           r"hooks are registered\)")
    finally:
        handle.remove()
    assert _kinds(fused) == ["Flatten", "Linear", "ReLU", "Linear"]


def test_warning_counts_the_pairs_it_does_not_list(backend):
    relu = nn.ReLU()  # one ReLU reused by five pairs: none can be fused
    model = nn.Sequential(*[m for _ in range(5) for m in (nn.Linear(3, 3), relu)])
    _fuse_leaving(model, r"left 5 unfused \(0 -> 1: .*; 2 -> 3: .*; 4 -> 5: [^;]*; and 2 more\)$")
