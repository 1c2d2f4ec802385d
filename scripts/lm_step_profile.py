"""Issue 14 groundwork: seconds per forward+backward of TinyCausalLM (d=128, 2 layers) on 32+32 sequences
of 128 tokens: the body alone, body + fused loss, body + materialised logits + F.cross_entropy, and the
fused loss alone. Run with PYTHONPATH=<worktree> (NOTES-issue14.md has the numbers)."""
import time, torch, torch.nn.functional as F
from fastadapt.training.lm import TinyCausalLM, causal_lm_loss, shift_labels
torch.manual_seed(0)
def bench(fn, n=5):
    fn(); t=time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter()-t)/n
for V in (2048, 4096):
    m = TinyCausalLM(V, 128, 2, 4, 128)
    ids = torch.randint(0, V, (64, 128)); y = ids.clone()
    def body():
        h = m(ids); h.sum().backward()
    def fused():
        h = m(ids); causal_lm_loss(h[:32], y[:32], h[32:], y[32:], m.lm_head, 0.5).backward()
    def eager():
        h = m(ids); lg = m.lm_head(h).float(); l = F.cross_entropy(lg.view(-1, V), shift_labels(y).view(-1)); l.backward()
    hd = torch.randn(64*128, 128, requires_grad=True); yy = shift_labels(y).view(-1)
    def loss_only():
        from fastadapt.ops import alpha_weighted_linear_cross_entropy as f
        f(hd[:4096], yy[:4096], hd[4096:], yy[4096:], m.lm_head.weight, None, 0.5).backward()
    print(V, {k: round(bench(f), 3) for k, f in (("body fwd+bwd", body), ("fused step", fused), ("eager logits step", eager), ("fused loss only", loss_only))})
