"""fastadapt.fuse_linear_relu: which pairs it fuses, which it leaves alone, and that outputs, gradients
and state_dicts of the fused model equal the original's."""
import copy

import pytest
import torch
from torch import nn

import fastadapt
from fastadapt import FusedLinearReLU

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _kinds(model):
    return [type(m).__name__ for m in model.modules() if not list(m.children())]


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
    fused = fastadapt.fuse_linear_relu(model)
    assert _kinds(fused) == _kinds(model)
    assert all(not isinstance(m, FusedLinearReLU) for m in fused.modules())
    _check_equivalent(model, fused, torch.randn(3, 4, dtype=torch.float64))


def test_relu_shared_between_sequentials_stays(backend):
    relu = nn.ReLU()
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), relu), nn.Sequential(nn.Linear(4, 4), relu)).double()
    assert not any(isinstance(m, FusedLinearReLU) for m in fastadapt.fuse_linear_relu(model).modules())


def test_shared_linear_stays(backend):
    lin = nn.Linear(4, 4)
    model = nn.Sequential(nn.Sequential(lin, nn.ReLU()), nn.Sequential(lin, nn.ReLU())).double()
    assert not any(isinstance(m, FusedLinearReLU) for m in fastadapt.fuse_linear_relu(model).modules())


def test_hooks_block_fusion(backend):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o))
    model[3].register_forward_pre_hook(lambda m, i: None)
    fused = fastadapt.fuse_linear_relu(model)
    assert _kinds(fused) == ["Linear", "ReLU", "Linear", "ReLU", "FusedLinearReLU", "Identity"]


def test_subclasses_and_unsupported_dtype_stay(backend):
    class MyLinear(nn.Linear):
        pass

    class MyReLU(nn.ReLU):
        pass

    class MySequential(nn.Sequential):
        pass

    cases = [
        nn.Sequential(MyLinear(3, 3), nn.ReLU()),
        nn.Sequential(nn.Linear(3, 3), MyReLU()),
        MySequential(nn.Linear(3, 3), nn.ReLU()),
        nn.Sequential(nn.Linear(3, 3), nn.ReLU()).half(),  # float16 has no CPU kernel
    ]
    for model in cases:
        assert not any(isinstance(m, FusedLinearReLU) for m in fastadapt.fuse_linear_relu(model).modules())


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
    fused = fastadapt.fuse_linear_relu(model)
    # body.0 is read outside the chain; body.2 -> body.3 is still provably private
    assert _kinds(fused) == ["Linear", "ReLU", "FusedLinearReLU", "Identity", "Linear"]
    _check_equivalent(model, fused, torch.randn(4, 6, dtype=torch.float64))


def test_untraceable_custom_module_stays(backend):
    model = _Untraceable().double()
    assert _kinds(fastadapt.fuse_linear_relu(model)) == _kinds(model)


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
