"""fastadapt.linear_relu / FusedLinearReLU: parity with F.relu(F.linear(...)) against a float64 reference,
gradcheck, opcheck, torch.compile, argument errors, saved tensors and determinism."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastadapt
from conftest import DEVICES

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}

# (leading shape of x, in_features, out_features)
SHAPES = [
    ((1,), 5, 3),
    ((0,), 7, 4),
    ((8,), 1, 1),
    ((9,), 3, 33),
    ((17,), 33, 127),
    ((6,), 127, 3),
    ((2, 5), 33, 3),
    ((3, 4), 8, 16),
    ((), 6, 5),
    ((3,), 0, 4),
    ((3,), 4, 0),
    # large enough for the CPU kernel to split the features over threads (slice edges at 16)
    ((65,), 784, 33),
    ((3, 100), 129, 130),
]




def _inputs(lead, k, n, dtype, device, bias=True, noncontig=False):
    """x, weight, bias with pre-activations kept away from 0 for low precision (so the ReLU mask is the
    same in the reference), as fresh tensors."""
    if dtype == torch.bfloat16:
        # Small integers are exact in bf16 and their fp32-accumulated products are exact too; a
        # half-integer bias then keeps every pre-activation at least 0.5 away from 0.
        x = torch.randint(-2, 3, (*lead, k), dtype=torch.float64)
        w = torch.randint(-2, 3, (n, k), dtype=torch.float64)
        b = torch.randint(-3, 3, (n,), dtype=torch.float64) + 0.5
    else:
        x = torch.randn(*lead, k, dtype=torch.float64)
        w = torch.randn(n, k, dtype=torch.float64) / math.sqrt(max(k, 1))
        b = torch.randn(n, dtype=torch.float64)
    if noncontig:
        # same values, strided layout: the last dim has stride 2
        big = torch.zeros(*lead, 2 * k, dtype=torch.float64)
        big[..., ::2] = x
        x = big.to(dtype=dtype, device=device)[..., ::2]
        assert not x.is_contiguous() or x.numel() <= 1
    else:
        x = x.to(dtype=dtype, device=device)
    return x, w.to(dtype=dtype, device=device), (b.to(dtype=dtype, device=device) if bias else None)


def _reference(x, w, b, g):
    """Output and gradients in float64 from the very same (rounded) inputs."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    y = F.relu(F.linear(x64, w64, b64))
    grads = torch.autograd.grad(y, [t for t in (x64, w64, b64) if t is not None], g.double())
    return y.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_parity_output_and_grads(backend, device, dtype, lead, k, n, bias):
    x, w, b = _inputs(lead, k, n, dtype, device, bias=bias)
    _check_parity(x, w, b, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead,k,n", [((7,), 33, 127), ((2, 5), 3, 33), ((4,), 1, 3)])
def test_parity_noncontiguous_x(backend, device, dtype, lead, k, n):
    x, w, b = _inputs(lead, k, n, dtype, device, noncontig=True)
    _check_parity(x, w, b, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_parity_transposed_x_and_weight(backend, device):
    x = torch.randn(33, 20, dtype=torch.float64, device=device).t()  # (20, 33), column-major
    w = torch.randn(33, 17, dtype=torch.float64, device=device).t()  # (17, 33), column-major
    b = torch.randn(17, dtype=torch.float64, device=device)
    _check_parity(x, w, b, torch.float64)


def _check_parity(x, w, b, dtype):
    before = [t.clone() for t in (x, w, b) if t is not None]
    y = fastadapt.linear_relu(x.requires_grad_(), w.requires_grad_(), b.requires_grad_() if b is not None else None)
    assert y.shape == (*x.shape[:-1], w.shape[0]) and y.dtype == dtype and y.device == x.device
    g = torch.randn(y.shape, dtype=torch.float64).to(dtype=dtype, device=x.device)
    g_before = g.clone()
    ref_y, ref_grads = _reference(x, w, b, g)
    torch.testing.assert_close(y.detach().double(), ref_y, **TOL[dtype])
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], g)
    for name, got, want, inp in zip(("x", "weight", "bias"), grads, ref_grads, (x, w, b)):
        assert got.shape == inp.shape and got.dtype == dtype, name
        torch.testing.assert_close(got.double(), want, **TOL[dtype], msg=lambda m: f"grad of {name}: {m}")
    for t, t0 in zip([t for t in (x, w, b) if t is not None], before):
        assert torch.equal(t.detach(), t0), "an input was modified"
    assert torch.equal(g, g_before), "grad_output was modified"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_expanded_grad_output(backend, device, bias):
    # y.sum().backward() hands the node a stride-0 grad_output
    x, w, b = _inputs((2, 6), 9, 33, torch.float64, device, bias=bias)
    ins = [t.requires_grad_() for t in (x, w, b) if t is not None]
    fastadapt.linear_relu(x, w, b).sum().backward()
    ref_y, ref_grads = _reference(x, w, b, torch.ones(2, 6, 33, dtype=torch.float64, device=device))
    for t, want in zip(ins, ref_grads):
        torch.testing.assert_close(t.grad, want, **TOL[torch.float64])


def _away_from_zero(lead, k, n, device, bias=True, margin=0.05):
    """float64 inputs whose pre-activations all lie at least `margin` from 0 (the ReLU kink)."""
    for _ in range(1000):
        x = torch.randn(*lead, k, dtype=torch.float64, device=device)
        w = torch.randn(n, k, dtype=torch.float64, device=device)
        b = torch.randn(n, dtype=torch.float64, device=device) if bias else None
        if F.linear(x, w, b).abs().min() > margin:
            return x, w, b
    raise AssertionError("could not draw inputs away from the kink")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,k,n,bias", [((4,), 5, 3, True), ((2, 3), 4, 2, True), ((3,), 6, 4, False)])
def test_gradcheck(backend, device, lead, k, n, bias):
    x, w, b = _away_from_zero(lead, k, n, device, bias)
    ins = tuple(t.requires_grad_() for t in (x, w, b) if t is not None)
    fn = (lambda x, w, b: fastadapt.linear_relu(x, w, b)) if bias else (lambda x, w: fastadapt.linear_relu(x, w))
    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_partial_grads(backend, device):
    # only some inputs require grad: the others get none and the requested ones stay exact
    x, w, b = _inputs((5,), 7, 9, torch.float64, device)
    w.requires_grad_()
    y = fastadapt.linear_relu(x, w, b)
    g = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, [w], g)
    _, (_, want_w, _) = _reference(x, w, b, g)
    torch.testing.assert_close(gw, want_w, **TOL[torch.float64])


def test_double_backward_raises():
    if not fastadapt.has_ops():
        pytest.skip("compiled extension not loaded")
    x, w, b = _away_from_zero((3,), 4, 2, "cpu")
    w.requires_grad_()
    y = fastadapt.linear_relu(x, w, b)
    (gw,) = torch.autograd.grad(y.sum(), [w], create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented|derivative"):
        gw.sum().backward()


# ---- compiled-op registration ------------------------------------------------------------------

def _needs_ops():
    if not fastadapt.has_ops():
        pytest.skip("compiled extension not loaded")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_linear_relu(device, requires_grad, bias):
    _needs_ops()
    x, w, b = _away_from_zero((2, 3), 5, 4, device, bias)
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.fastadapt.linear_relu.default, (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", [(True, True, True), (False, True, False), (True, False, True), (False, False, False)])
def test_opcheck_backward(device, mask):
    _needs_ops()
    x, w, b = _away_from_zero((2, 3), 5, 4, device)
    y = F.relu(F.linear(x, w, b))
    g = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastadapt._linear_relu_backward.default, (g, x, w, y, list(mask)))
    gx, gw, gb = torch.ops.fastadapt._linear_relu_backward(g, x, w, y, list(mask))
    _, (want_x, want_w, want_b) = _reference(x, w, b, g)
    for flag, got, want in zip(mask, (gx, gw, gb), (want_x, want_w, want_b)):
        if flag:
            torch.testing.assert_close(got, want, **TOL[torch.float64])
        else:
            assert got.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    _needs_ops()
    torch._dynamo.reset()
    layer = fastadapt.FusedLinearReLU(12, 9, device=device)

    def step(x, w, b):
        h = fastadapt.linear_relu(x, w, b)
        return layer(h @ torch.ones(9, 12, device=device)).square().sum()

    x, w, b = (t.float() for t in _away_from_zero((6,), 12, 9, device))
    compiled = torch.compile(step, fullgraph=True)
    grads = []
    for fn in (step, compiled):
        ins = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        layer.zero_grad()
        out = fn(*ins)
        out.backward()
        grads.append((out.detach(), *[t.grad for t in ins], layer.weight.grad.clone(), layer.bias.grad.clone()))
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)


# ---- errors ------------------------------------------------------------------------------------

def _bad_cases(device):
    x = torch.randn(4, 5, device=device)
    w = torch.randn(3, 5, device=device)
    b = torch.randn(3, device=device)
    return [
        ("in_features", (torch.randn(4, 6, device=device), w, b), ValueError, r"x\.shape\[-1\] is 6 .*in_features=5"),
        ("weight_1d", (x, torch.randn(5, device=device), b), ValueError, r"weight must be 2-D.*\(5,\)"),
        ("weight_3d", (x, torch.randn(1, 3, 5, device=device), b), ValueError, r"weight must be 2-D.*\(1, 3, 5\)"),
        ("bias_len", (x, w, torch.randn(4, device=device)), ValueError, r"bias must have shape \(3,\).*\(4,\)"),
        ("bias_2d", (x, w, torch.randn(1, 3, device=device)), ValueError, r"bias must have shape \(3,\).*\(1, 3\)"),
        ("weight_dtype", (x, w.double(), b), TypeError, r"weight has dtype torch\.float64 but x has dtype torch\.float32"),
        ("bias_dtype", (x, w, b.bfloat16()), TypeError, r"bias has dtype torch\.bfloat16 but x has dtype torch\.float32"),
        ("x_dtype_int", (torch.ones(4, 5, dtype=torch.int64, device=device), w, b), TypeError, r"x must be .*int64"),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(8))
def test_bad_input_python(backend, device, case):
    name, args, exc, msg = _bad_cases(device)[case]
    with pytest.raises(exc, match=msg):
        fastadapt.linear_relu(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(8))
def test_bad_input_direct_op_is_memory_safe(device, case):
    # callers that bypass the Python layer get the kernels' terse shape/dtype checks, never a bad read
    _needs_ops()
    name, args, exc, msg = _bad_cases(device)[case]
    with pytest.raises(RuntimeError, match=r"linear_relu: .*(do not match|must be \(out,\)|x's dtype)"):
        torch.ops.fastadapt.linear_relu(*args)


def test_bad_input_module(backend):
    layer = fastadapt.FusedLinearReLU(5, 3)
    with pytest.raises(ValueError, match=r"x\.shape\[-1\] is 6 .*in_features=5"):
        layer(torch.randn(4, 6))
    with pytest.raises(TypeError, match=r"weight has dtype torch\.float32 but x has dtype torch\.float64"):
        layer(torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"x must be .*int64"):
        layer(torch.ones(4, 5, dtype=torch.int64))
    layer.bias = nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\).*\(4,\)"):
        layer(torch.randn(4, 5))


def test_bad_input_devices(backend):
    x = torch.randn(4, 5)
    w = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"weight is on meta but x is on cpu"):
        fastadapt.linear_relu(x, w.to("meta"))
    with pytest.raises(ValueError, match=r"bias is on meta but x is on cpu"):
        fastadapt.linear_relu(x, w, torch.randn(3, device="meta"))
    layer = fastadapt.FusedLinearReLU(5, 3, device="meta")
    with pytest.raises(ValueError, match=r"weight is on meta but x is on cpu"):
        layer(x)


@pytest.mark.cuda
def test_bad_input_devices_cuda_direct_op():
    _needs_ops()
    x = torch.randn(4, 5, device="cuda")
    with pytest.raises(RuntimeError, match=r"weight must have x's dtype and device"):
        torch.ops.fastadapt.linear_relu(x, torch.randn(3, 5), None)


def test_bad_input_cpu_float16(backend):
    with pytest.raises(TypeError, match=r"x must be .*float16"):
        fastadapt.linear_relu(torch.randn(2, 3).half(), torch.randn(4, 3).half())


def test_backward_op_checks():
    _needs_ops()
    x, w = torch.randn(4, 5), torch.randn(3, 5)
    y = torch.randn(4, 3).relu()
    with pytest.raises(RuntimeError, match=r"grad_output and output must be \(\.\.\., out\)"):
        torch.ops.fastadapt._linear_relu_backward(torch.randn(4, 2), x, w, y, [True, True, True])
    with pytest.raises(RuntimeError, match=r"grad_output and output must be \(\.\.\., out\)"):
        torch.ops.fastadapt._linear_relu_backward(torch.randn(5, 3), x, w, torch.randn(5, 3), [True, True, True])


# ---- module --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_module_matches_linear(backend, bias):
    torch.manual_seed(3)
    lin = nn.Linear(11, 7, bias=bias)
    torch.manual_seed(3)
    fused = fastadapt.FusedLinearReLU(11, 7, bias=bias)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in lin.named_parameters()]
    for (_, p), (_, q) in zip(fused.named_parameters(), lin.named_parameters()):
        assert torch.equal(p, q)  # same initialisation, draw for draw
    x = torch.randn(3, 11)
    torch.testing.assert_close(fused(x), F.relu(lin(x)), rtol=1e-6, atol=1e-6)
    assert repr(fused) == f"FusedLinearReLU(in_features=11, out_features=7, bias={bias})"


def test_module_state_dict_both_ways():
    lin = nn.Linear(6, 4)
    fused = fastadapt.FusedLinearReLU(6, 4)
    fused.load_state_dict(lin.state_dict())
    assert torch.equal(fused.weight, lin.weight) and torch.equal(fused.bias, lin.bias)
    other = nn.Linear(6, 4)
    other.load_state_dict(fastadapt.FusedLinearReLU(6, 4).state_dict())
    nobias = fastadapt.FusedLinearReLU(6, 4, bias=False)
    nn.Linear(6, 4, bias=False).load_state_dict(nobias.state_dict())
    assert list(nobias.state_dict()) == ["weight"]


@pytest.mark.parametrize("bias", [True, False])
def test_module_loads_the_sequential_it_replaces(bias):
    seq = nn.Sequential(nn.Linear(6, 4, bias=bias), nn.ReLU())
    fused = fastadapt.FusedLinearReLU(6, 4, bias=bias)
    fused.load_state_dict(seq.state_dict())  # 0.weight / 0.bias, strict
    assert torch.equal(fused.weight, seq[0].weight)
    assert (fused.bias is None) if not bias else torch.equal(fused.bias, seq[0].bias)
    x = torch.randn(5, 6)
    torch.testing.assert_close(fused(x), seq(x), rtol=1e-6, atol=1e-6)
    # and back, through the Sequential's Linear (an nn.Sequential's own keys are 0.weight, 0.bias)
    back = nn.Sequential(nn.Linear(6, 4, bias=bias), nn.ReLU())
    back[0].load_state_dict(fused.state_dict())
    assert torch.equal(back[0].weight, fused.weight)
    torch.testing.assert_close(back(x), fused(x), rtol=1e-6, atol=1e-6)


def test_module_loads_a_nested_sequential_into_a_parent():
    # a model whose Sequential(Linear, ReLU) block became one FusedLinearReLU: keys 0.0.weight -> 0.weight
    orig = nn.Sequential(nn.Sequential(nn.Linear(6, 5), nn.ReLU()), nn.Linear(5, 2))
    fused = nn.Sequential(fastadapt.FusedLinearReLU(6, 5), nn.Linear(5, 2))
    fused.load_state_dict(orig.state_dict())
    assert list(fused.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert torch.equal(fused[0].weight, orig[0][0].weight) and torch.equal(fused[1].bias, orig[1].bias)
    x = torch.randn(3, 6)
    torch.testing.assert_close(fused(x), orig(x), rtol=1e-6, atol=1e-6)


def test_module_sequential_keys_never_override_its_own():
    fused = fastadapt.FusedLinearReLU(2, 2)
    own = fastadapt.FusedLinearReLU(2, 2).state_dict()
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "0.weight"'):
        fused.load_state_dict({**own, "0.weight": torch.zeros(2, 2)})
    assert torch.equal(fused.weight, own["weight"])  # strict loading copies the right key before it raises


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_module_factory_kwargs(dtype):
    layer = fastadapt.FusedLinearReLU(3, 2, device="cpu", dtype=dtype)
    assert layer.weight.dtype == dtype and layer.bias.dtype == dtype and layer.weight.shape == (2, 3)


def test_from_linear_shares_or_copies(backend):
    lin = nn.Linear(5, 3)
    shared = fastadapt.FusedLinearReLU.from_linear(lin)
    copied = fastadapt.FusedLinearReLU.from_linear(lin, copy=True)
    assert shared.weight is lin.weight and shared.bias is lin.bias
    assert copied.weight is not lin.weight and torch.equal(copied.weight, lin.weight)
    x = torch.randn(4, 5)
    torch.testing.assert_close(shared(x), F.relu(lin(x)))
    with torch.no_grad():
        lin.weight.add_(1.0)
    torch.testing.assert_close(shared(x), F.relu(lin(x)))
    assert not torch.equal(copied(x), shared(x))
    nobias = fastadapt.FusedLinearReLU.from_linear(nn.Linear(5, 3, bias=False))
    assert nobias.bias is None and "bias" not in nobias.state_dict()
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got ReLU"):
        fastadapt.FusedLinearReLU.from_linear(nn.ReLU())


def test_module_bad_sizes():
    with pytest.raises(ValueError, match="in_features must be a non-negative int, got -1"):
        fastadapt.FusedLinearReLU(-1, 3)
    with pytest.raises(ValueError, match="out_features must be a non-negative int, got 2.5"):
        fastadapt.FusedLinearReLU(3, 2.5)


# ---- what is kept, determinism ----------------------------------------------------------------

def test_saves_output_not_preactivation():
    _needs_ops()
    x, w, b = _away_from_zero((8,), 6, 5, "cpu")
    w.requires_grad_()
    b.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fastadapt.linear_relu(x, w, b)
    assert len(saved) == 3
    ptrs = {t.data_ptr() for t in saved}
    assert ptrs == {x.data_ptr(), w.data_ptr(), y.data_ptr()}  # the output itself, no pre-activation
    assert all(t.shape in (x.shape, w.shape, y.shape) for t in saved)


def test_bias_grad_independent_of_thread_count():
    _needs_ops()
    x = torch.randn(1000, 64)
    w = torch.randn(300, 64, requires_grad=True)
    b = torch.randn(300, requires_grad=True)
    g = torch.randn(1000, 300)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y = fastadapt.linear_relu(x, w, b)
            (gb,) = torch.autograd.grad(y, [b], g)
            results.append(gb)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    _, (_, _, want) = _reference(x, w, b, g)
    torch.testing.assert_close(results[0].double(), want, rtol=1e-4, atol=1e-3)


# ---- the eager entry (csrc/eager_entry.cpp) ---------------------------------------------------------
def _plain_inputs(requires_grad=True):
    torch.manual_seed(3)
    x = torch.randn(5, 7)
    w = torch.randn(4, 7, requires_grad=requires_grad)
    b = torch.randn(4, requires_grad=requires_grad)
    return x, w, b


def test_public_function_equals_torch_ops():
    _needs_ops()
    x, w, b = _plain_inputs()
    y1 = fastadapt.linear_relu(x, w, b)
    g1 = torch.autograd.grad(y1.sum(), (w, b))
    y2 = torch.ops.fastadapt.linear_relu(x, w, b)
    g2 = torch.autograd.grad(y2.sum(), (w, b))
    assert torch.equal(y1, y2) and all(torch.equal(a, c) for a, c in zip(g1, g2))
    assert type(y1.grad_fn).__name__ == type(y2.grad_fn).__name__


def test_torch_function_mode_sees_the_op():
    from torch.overrides import TorchFunctionMode

    _needs_ops()
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x, w, b = _plain_inputs()
    with Record():
        y = fastadapt.FusedLinearReLU.from_linear(_linear_of(w, b))(x)
    assert torch.ops.fastadapt.linear_relu.default in seen
    torch.testing.assert_close(y, F.relu(F.linear(x, w, b)))


def test_tensor_subclass_keeps_its_torch_function():
    _needs_ops()
    calls = []

    class Tagged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            calls.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    x, w, b = _plain_inputs()
    y = fastadapt.linear_relu(x.as_subclass(Tagged), w, b)
    assert type(y) is Tagged and torch.ops.fastadapt.linear_relu.default in calls
    torch.testing.assert_close(y.as_subclass(torch.Tensor), F.relu(F.linear(x, w, b)))


def test_torch_dispatch_mode_sees_the_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    _needs_ops()
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x, w, b = _plain_inputs()
    with Record():
        fastadapt.linear_relu(x, w, b)
    assert torch.ops.fastadapt.linear_relu.default in seen


def _linear_of(w, b):
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def test_each_backend_runs_its_own_path(backend):
    """The compiled backend builds fastadapt's autograd node; the fallback the reference's ops (so the
    fallback parity tests really test the fallback)."""
    x, w, b = _plain_inputs()
    node = type(fastadapt.linear_relu(x, w, b).grad_fn).__name__
    module_node = type(fastadapt.FusedLinearReLU.from_linear(_linear_of(w, b))(x).grad_fn).__name__
    expected_fallback = type(F.relu(F.linear(x, w, b)).grad_fn).__name__
    if backend == "compiled":
        assert node == module_node == "CppFunction"
    else:
        assert node == module_node == expected_fallback


# ---- regressions: defects found by PyTorch's own sample inputs (issue 10) -------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_bf16_product_and_bias_round_once(backend, device):
    """The product used to be rounded to bf16 before the bias was added: 12.625 where eager and correct
    rounding give 12.5."""
    x = torch.tensor([[16.0, 0.9375]], dtype=torch.bfloat16, device=device)
    w = torch.ones(1, 2, dtype=torch.bfloat16, device=device)
    b = torch.tensor([-4.40625], dtype=torch.bfloat16, device=device)
    assert fastadapt.linear_relu(x, w, b).item() == 12.5 == F.relu(F.linear(x, w, b)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 3, 2), (64, 784, 128), (33, 129, 65)])
def test_bf16_no_farther_from_float64_than_eager(backend, device, shape):
    n, k, m = shape
    torch.manual_seed(5)
    x = torch.randn(n, k, device=device).bfloat16()
    w = (torch.randn(m, k, device=device) / k ** 0.5).bfloat16()
    b = torch.randn(m, device=device).bfloat16()
    exact = F.relu(F.linear(x.double(), w.double(), b.double()))
    err = lambda y: (y.double() - exact).abs().max().item()  # noqa: E731
    assert err(fastadapt.linear_relu(x, w, b)) <= err(F.relu(F.linear(x, w, b))) + 1e-6


# ---- torch.jit.script (issue 15) ---------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:`torch.jit.(script|save|load)` is deprecated:FutureWarning")
def test_jit_script_matches_eager_and_round_trips(tmp_path):
    """A model with FusedLinearReLU layers scripts (it used to fail on the Python checks), gives eager's
    output and gradients, and survives torch.jit.save / load."""
    torch.manual_seed(3)
    model = nn.Sequential(fastadapt.FusedLinearReLU(6, 5), fastadapt.FusedLinearReLU(5, 4, bias=False), nn.Linear(4, 2))
    scripted = torch.jit.script(model)
    torch.jit.save(scripted, tmp_path / "m.pt")
    loaded = torch.jit.load(tmp_path / "m.pt")
    x = torch.randn(7, 6)
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.sum(), list(model.parameters()))
    for m in (scripted, loaded):
        out = m(x)
        torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
        for g, e in zip(torch.autograd.grad(out.sum(), list(m.parameters())), eager_grads):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_jit_script_reference_is_eager_formula():
    # what a scripted FusedLinearReLU runs where no compiled kernel serves the input
    from fastadapt.ops.linear_relu import _scripted_reference
    fn = torch.jit.script(_scripted_reference)
    x, w, b = torch.randn(4, 3), torch.randn(2, 3), torch.randn(2)
    torch.testing.assert_close(fn(x, w, b), F.relu(F.linear(x, w, b)), rtol=0, atol=0)
    torch.testing.assert_close(fn(x, w, None), F.relu(F.linear(x, w)), rtol=0, atol=0)
