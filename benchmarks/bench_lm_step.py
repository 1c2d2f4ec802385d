"""One adaptive LM training step of a Hugging Face causal LM (issue 14): a target batch and an equal
replayed source batch, alpha = 0.5, forward + backward + AdamW step, the same model and data for every
variant:

  hf_per_side:  what an HF user writes: ``alpha * model(input_ids=t, labels=t).loss
                + (1 - alpha) * model(input_ids=s, labels=s).loss`` (two forwards, HF's own loss on the
                materialised logits);
  hf_concat:    one forward over the concatenated batch, then HF's ``model.loss_function`` per side on
                the two halves of the logits (the stronger HF baseline);
  hf_compile:   torch.compile (inductor) of hf_concat's forward + loss (its first call, the compile, is
                timed alone);
  fastadapt:    the same model's ``base_model`` hidden states (``HiddenStates``) into ``causal_lm_loss``,
                the fused linear cross-entropy through ``model.get_output_embeddings()``: the logits are
                never materialised;
  fastadapt_compile: torch.compile of fastadapt's forward + loss (the body compiled, the fused op opaque);
  gemm_floor:   the step's GEMMs alone (every mm/addmm/bmm of one hf_concat forward + backward, recorded and
                replayed on fresh tensors of the same shapes, strides and dtypes): the floor of the step.

    python benchmarks/bench_lm_step.py --interleaved llama 32000 float32 --memory --threads 1   # BENCHMARKS.md
    python benchmarks/bench_lm_step.py --interleaved llama 128256 float32 --impls fastadapt hf_compile \
        --chunk-sizes 64 128 --threads 1          # fastadapt@64, fastadapt@128: other chunk_size values
    python benchmarks/bench_lm_step.py --interleaved llama 32000 bfloat16 --profile --threads 1
    pytest benchmarks/bench_lm_step.py --benchmark-disable    # smoke: tiny model, values against hf_per_side
    BENCH_LM_STEP_LARGE=1 pytest benchmarks/bench_lm_step.py --benchmark-only

``--interleaved`` runs the variants in turn, round after round, in one process (the machine is shared
and noisy): per variant the median step time, predicted tokens per second, GFLOP/s over the step's FLOPs
(torch.utils.flop_counter over one hf_concat step: the body's and the head's GEMMs and attention), the
median of the per-round tokens/s ratios fastadapt / that variant, and the fraction of the GEMM floor.
``--memory`` adds each variant's peak memory of one step in a fresh process (common.peak_extra_memory:
the resident high-water mark of a warm step above the memory resident when it began, so model,
optimizer state and inputs are excluded and the step's gradients are included, alike for every variant).
``--profile`` prints instead where each variant's step time goes (torch.profiler's self CPU time by
kind of op). bf16 runs the forward and the loss under ``torch.autocast("cpu", torch.bfloat16)``, the
model in float32. On a loaded shared machine ``--threads 1`` is the setting to compare with: two
threads whose peer is descheduled stall at every parallel region (BENCHMARKS.md, issue 14).
"""
import argparse
import math
import os
import statistics
import sys
import time

import pytest
import torch

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.path.join(_ROOT, "tests"), _ROOT]  # as a script: this checkout's fastadapt
from common import BENCH_DIR, fresh_compile, gemm_rate, peak_extra_memory, record  # noqa: E402

ALPHA = 0.5
IMPLS = ["hf_per_side", "hf_concat", "hf_compile", "fastadapt", "fastadapt_compile"]
COMPILED = {"hf_compile": "hf_concat", "fastadapt_compile": "fastadapt"}
LARGE = os.environ.get("BENCH_LM_STEP_LARGE", "0") == "1"
# (layers, hidden, heads, sequences per side, tokens per sequence): the model and the batch
SMOKE = dict(layers=2, hidden=32, heads=4, batch=2, seq=16)
FULL = dict(layers=4, hidden=256, heads=4, batch=8, seq=128)
SMOKE_VOCAB, VOCABS = 500, (16384, 32000, 128256)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_model(arch, vocab, layers, hidden, heads, seq, **_):
    """A tiny random HF causal LM (seed 0, float32, training mode without dropout)."""
    import transformers

    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                       num_hidden_layers=layers, num_attention_heads=heads,
                                       num_key_value_heads=heads, max_position_embeddings=seq)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "gpt2":  # its head is tied to the token embedding
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=seq,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"arch must be 'llama' or 'gpt2', got {arch!r}")
    return model.train()


def batches(vocab, batch, seq, **_):
    """(source ids, target ids): the labels are the ids (HF's convention: the loss shifts them)."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (batch, seq), generator=g), torch.randint(0, vocab, (batch, seq), generator=g)


def loss_fn(impl, model, smoke=False):
    """fn(source_ids, target_ids) -> the step's loss, for one of IMPLS; ``fastadapt@N`` (and
    ``fastadapt_compile@N``) is fastadapt with ``chunk_size=N`` instead of the op's default."""
    from fastadapt.training import HiddenStates, causal_lm_loss, output_head

    vocab = model.config.vocab_size
    name, _, chunk = impl.partition("@")
    if name in COMPILED:
        return fresh_compile(loss_fn(COMPILED[name] + impl[len(name):], model), smoke=smoke)
    if name == "hf_per_side" and not chunk:
        return lambda s, t: ALPHA * model(input_ids=t, labels=t).loss + (1 - ALPHA) * model(input_ids=s, labels=s).loss
    if name == "hf_concat" and not chunk:
        def hf_concat(s, t):
            logits = model(input_ids=torch.cat([s, t])).logits
            b = len(s)
            return (ALPHA * model.loss_function(logits[b:], t, vocab)
                    + (1 - ALPHA) * model.loss_function(logits[:b], s, vocab))
        return hf_concat
    if name == "fastadapt":
        body, head = HiddenStates(model), output_head(model)
        options = {"chunk_size": int(chunk)} if chunk else {}

        def fused(s, t):
            hidden = body(torch.cat([s, t]))
            b = len(s)
            return causal_lm_loss(hidden[:b], s, hidden[b:], t, head, ALPHA, **options)
        return fused
    raise ValueError(f"impl must be one of {IMPLS} (fastadapt ones with an optional @chunk_size), got {impl!r}")


class Case:
    """The model, its AdamW, the batch and a training step of one variant (also rebuilt in a fresh process
    by the peak-memory probe)."""

    def __init__(self, impl, arch, vocab, dtype="float32", smoke=False, size=None):
        size = size or (SMOKE if smoke else FULL)
        self.model = build_model(arch, vocab, **size)
        # fused: what HF's Trainer (adamw_torch_fused) and fastadapt's loop both use
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.src, self.tgt = batches(vocab, **size)
        self.dtype = DTYPES[dtype]
        self.fn = loss_fn(impl, self.model, smoke)

    def del_grads(self):
        self.opt.zero_grad(set_to_none=True)

    def loss(self):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            return self.fn(self.src, self.tgt)

    def step(self):
        self.del_grads()
        loss = self.loss()
        loss.backward()
        self.opt.step()
        return loss.detach()

    def predicted_tokens(self):
        return self.src.shape[0] * (self.src.shape[1] - 1) + self.tgt.shape[0] * (self.tgt.shape[1] - 1)


def peak_step_bytes(impl, arch, vocab, dtype):
    """One warm step's peak resident memory above the memory resident when it began, in a fresh process."""
    setup = f"""
        import sys
        sys.path[:0] = [{BENCH_DIR!r}]
        from bench_lm_step import Case
        case = Case({impl!r}, {arch!r}, {vocab}, {dtype!r})
        del_grads = case.del_grads
        def step():
            {{STEP}}
    """
    return peak_extra_memory(setup, "case.step()")


# ---- the step's FLOPs and its GEMM floor ---------------------------------------------------------------

def _gemm_ops():
    a = torch.ops.aten
    return {a.mm.default, a.addmm.default, a.bmm.default, a.baddbmm.default}


def step_flops_and_gemms(arch, vocab, dtype, size):
    """(FLOPs of one hf_concat forward + backward by torch.utils.flop_counter, the head's share of them,
    the (op, args) of its GEMMs): the step's FLOPs are the same for every variant (fastadapt's op runs the
    head's three GEMMs in chunks; the optimizer's elementwise work is not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    gemms = []
    ops = _gemm_ops()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                gemms.append((func, [(tuple(x.shape), tuple(x.stride()), x.dtype) if isinstance(x, torch.Tensor)
                                     else x for x in args], dict(kwargs or {})))
            return func(*args, **(kwargs or {}))

    case = Case("hf_concat", arch, vocab, dtype, size=size)
    counter = FlopCounterMode(display=False)
    with counter, Record():
        case.loss().backward()
    flops = counter.get_total_flops()
    rows, d = 2 * size["batch"] * size["seq"], size["hidden"]
    head = 2 * 3 * rows * d * vocab  # logits, grad_hidden, grad_weight
    return flops, head, gemms


def _fresh(spec):
    shape, stride, dtype = spec
    n = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0
    return torch.randn(n).to(dtype).as_strided(shape, stride)


def gemm_floor_step(gemms):
    """step() running the recorded GEMMs on fresh tensors of their shapes, strides and dtypes."""
    calls = [(func, [_fresh(a) if isinstance(a, tuple) and len(a) == 3 and isinstance(a[2], torch.dtype) else a
                     for a in args], kwargs) for func, args, kwargs in gemms]

    def step():
        for func, args, kwargs in calls:
            func(*args, **kwargs)
    return step


# ---- the interleaved comparison ------------------------------------------------------------------------

def interleaved(arch, vocab, dtype, impls=IMPLS, rounds=5, memory=False, size=None, log=print):
    size = size or FULL
    load = os.getloadavg()[0]
    flops, head_flops, gemms = step_flops_and_gemms(arch, vocab, dtype, size)
    cases, compile_s = {}, {}
    for impl in impls:
        cases[impl] = Case(impl, arch, vocab, dtype, size=size)
        t0 = time.perf_counter()
        cases[impl].step()  # compile (the compiled rows), first-touch page faults
        if impl in COMPILED:
            compile_s[impl] = time.perf_counter() - t0
    floor = gemm_floor_step(gemms)
    floor()
    steps = {**{k: c.step for k, c in cases.items()}, "gemm_floor": floor}
    times = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    for _ in range(rounds):
        for k, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    tokens = next(iter(cases.values())).predicted_tokens()
    fused = [k for k in ("fastadapt", "fastadapt_compile") if k in times]
    log(f"{arch} V={vocab} {dtype}: {size['layers']} layers, hidden {size['hidden']}, {size['batch']}x{size['seq']} "
        f"tokens per side, alpha={ALPHA}, fused AdamW, CPU, {torch.get_num_threads()} threads, {rounds} rounds, "
        f"load {load:.2f} at start")
    log(f"  step FLOPs {flops / 1e9:.1f} G (head {head_flops / 1e9:.1f} G); {tokens} predicted tokens per step; "
        f"torch.mm 1024^3 float32 {gemm_rate() / 1e9:.0f} GFLOP/s")
    if compile_s:
        log("  compile (first call, s): " + ", ".join(f"{k} {v:.1f}" for k, v in compile_s.items()))
    out = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        row = dict(step_s=med, cpu_s=statistics.median(cpu[k]), tokens_per_s=tokens / med,
                   tokens_per_cpu_s=tokens / statistics.median(cpu[k]),
                   GFLOPs=flops / med / 1e9, of_floor=statistics.median(times["gemm_floor"]) / med,
                   of_floor_cpu=statistics.median(cpu["gemm_floor"]) / statistics.median(cpu[k]))
        for f in fused:  # tokens/s of the fused variant over this one's: the median of the per-round ratios
            row[f"{f}_speedup"] = statistics.median([b / a for a, b in zip(times[f], ts)])
            row[f"{f}_cpu_speedup"] = statistics.median([b / a for a, b in zip(cpu[f], cpu[k])])
        if memory and k != "gemm_floor":
            row["peak_MB"] = peak_step_bytes(k, arch, vocab, dtype) / 2 ** 20
        out[k] = row
        log(f"  {k:21s} {med:6.3f} s (CPU {row['cpu_s']:6.2f} s) {row['tokens_per_s']:6.0f} tok/s "
            f"{row['tokens_per_cpu_s']:6.0f} tok/CPU-s "
            f"{row['GFLOPs']:5.1f} GFLOP/s floor/time {row['of_floor']:.2f} (CPU {row['of_floor_cpu']:.2f})"
            + "".join(f" | {f}/this {row[f + '_speedup']:.2f} (CPU {row[f + '_cpu_speedup']:.2f})" for f in fused)
            + (f" | peak {row['peak_MB']:.0f} MB" if "peak_MB" in row else ""))
    log(f"  load {os.getloadavg()[0]:.2f} at end")
    return out


def _category(op):
    """The profiler's op name -> the bucket the step's time is reported in."""
    if op in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"):
        return "GEMM"
    if "flash_attention" in op:
        return "attention (flash)"
    if "fused_adamw" in op:
        return "AdamW"
    if op.startswith("fastadapt::"):
        return "fused op's own (row pass, ...)"
    if "softmax" in op or "nll_loss" in op:
        return "log_softmax + nll"
    if "CompiledFxGraph" in op:
        return "inductor kernels"
    if op in ("aten::fill_", "aten::zero_"):
        return "fill/zero"
    if op in ("aten::copy_", "aten::_to_copy"):
        return "copy/cast"
    return "other ops"


def profile_breakdown(arch, vocab, dtype, impls=IMPLS, steps=3, size=None, log=print):
    """Where a step's time goes: torch.profiler's self CPU time of one step by bucket (_category), the
    median over `steps` profiled steps after two warm ones."""
    from torch.profiler import ProfilerActivity, profile

    log(f"{arch} V={vocab} {dtype}, {torch.get_num_threads()} threads: self CPU seconds per step "
        f"(median of {steps}), load {os.getloadavg()[0]:.2f}")
    for impl in impls:
        case = Case(impl, arch, vocab, dtype, size=size)
        case.step()
        case.step()
        runs = []
        for _ in range(steps):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                case.step()
            buckets = {}
            for e in prof.key_averages():
                buckets[_category(e.key)] = buckets.get(_category(e.key), 0.0) + e.self_cpu_time_total / 1e6
            runs.append(buckets)
        keys = sorted({k for r in runs for k in r}, key=lambda k: -statistics.median(r.get(k, 0.0) for r in runs))
        total = statistics.median(sum(r.values()) for r in runs)
        log(f"  {impl:21s} {total:.3f} s: " + ", ".join(
            f"{k} {statistics.median(r.get(k, 0.0) for r in runs):.3f}" for k in keys
            if statistics.median(r.get(k, 0.0) for r in runs) >= 0.001))


# ---- pytest: the smoke shape always (values against hf_per_side), the shapes with LARGE ----------

def _transformers():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS + ["fastadapt@7"])
@pytest.mark.parametrize("vocab", VOCABS if LARGE else (SMOKE_VOCAB,))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lm_step(benchmark, arch, vocab, impl, dtype):
    _transformers()
    smoke = vocab == SMOKE_VOCAB
    if "@" in impl and not (smoke and (arch, dtype) == ("llama", "float32")):
        pytest.skip("the chunk-size row checks the smoke shape in llama float32 only")
    if smoke and impl in COMPILED and (arch, dtype) != ("llama", "float32"):
        pytest.skip("smoke: the compiled rows are traced for llama float32 only (seconds each)")
    case = Case(impl, arch, vocab, dtype, smoke=smoke)
    if smoke:
        _check_against_hf(case, arch, vocab, dtype)
    benchmark.pedantic(case.step, setup=case.del_grads, rounds=1 if smoke else 3, warmup_rounds=1, iterations=1)
    median = benchmark.stats.stats.median if benchmark.stats is not None else None
    info = dict(arch=arch, vocab=vocab, impl=impl, dtype=dtype, predicted_tokens=case.predicted_tokens())
    if median:
        info["tokens_per_s"] = round(case.predicted_tokens() / median)
    record(benchmark, **info)


def _check_against_hf(case, arch, vocab, dtype):
    """The variant's loss and every parameter's gradient equal hf_per_side's on the same model and data."""
    ref = Case("hf_per_side", arch, vocab, dtype, smoke=True)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == "float32" else dict(rtol=3e-2, atol=3e-3)
    for c in (case, ref):
        c.del_grads()
    got, want = case.loss(), ref.loss()
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, **tol)
    grads = dict(ref.model.named_parameters())
    for name, p in case.model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", ["hf_concat", "fastadapt"])
def test_peak_step_memory(benchmark, impl):
    """Not timed: one warm step's peak memory in a fresh process (the smoke shape only checks that the
    probe runs, for fastadapt; --interleaved --memory measures the issue's shapes)."""
    _transformers()
    if not LARGE and (not benchmark.disabled or impl != "fastadapt"):
        pytest.skip("the smoke shape's peak memory is noise: run with BENCH_LM_STEP_LARGE=1")
    vocab = VOCABS[1] if LARGE else SMOKE_VOCAB
    extra = peak_step_bytes(impl, "llama", vocab, "float32") if LARGE else _smoke_peak(impl)
    benchmark.extra_info.update(impl=impl, vocab=vocab, peak_MB=round(extra / 2 ** 20, 1))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert extra > 0


def _smoke_peak(impl):
    setup = f"""
        import sys
        sys.path[:0] = [{BENCH_DIR!r}]
        from bench_lm_step import Case
        case = Case({impl!r}, 'llama', {SMOKE_VOCAB}, 'float32', smoke=True)
        del_grads = case.del_grads
        def step():
            {{STEP}}
    """
    return peak_extra_memory(setup, "case.step()")


def test_gemm_floor_replays_the_step_gemms():
    """The floor replays every GEMM of the step: the recorded GEMMs' FLOPs are all the flop counter counts
    (attention included: under the recording modes SDPA runs as bmm), the head's three among them."""
    _transformers()
    flops, head, gemms = step_flops_and_gemms("llama", SMOKE_VOCAB, "float32", SMOKE)
    total = by_vocab = 0
    for _, args, _ in gemms:
        a, b = [x[0] for x in args if isinstance(x, tuple) and len(x) == 3 and isinstance(x[2], torch.dtype)][-2:]
        f = 2 * math.prod(a) * b[-1]  # (..., m, k) @ (..., k, n)
        total += f
        by_vocab += f if SMOKE_VOCAB in a + b else 0
    assert total == flops, (total, flops)
    assert by_vocab == head == 6 * 2 * SMOKE["batch"] * SMOKE["seq"] * SMOKE["hidden"] * SMOKE_VOCAB
    gemm_floor_step(gemms)()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interleaved", nargs=3, metavar=("ARCH", "VOCAB", "DTYPE"), required=True)
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--memory", action="store_true", help="also each variant's peak step memory (fresh processes)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[],
                   help="also fastadapt with these chunk_size values (rows fastadapt@N)")
    p.add_argument("--profile", action="store_true", help="where each variant's step time goes, not timings")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    arch, vocab, dtype = args.interleaved
    if dtype not in DTYPES:
        p.error(f"DTYPE must be one of {list(DTYPES)}, got {dtype!r}")
    impls = list(args.impls) + [f"fastadapt@{c}" for c in args.chunk_sizes]
    if args.profile:
        profile_breakdown(arch, int(vocab), dtype, impls)
    else:
        interleaved(arch, int(vocab), dtype, impls, args.rounds, args.memory)


if __name__ == "__main__":
    main()
