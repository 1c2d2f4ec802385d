"""Two CPU processes with gloo (torchrun's environment variables, set by hand) against one process."""
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fastadapt import MLP, AdaptiveTrainer, TransferTrainer, extend_head
    from _training_data import blobs

    def run(out, batch_size):
        X, y = blobs(64, classes=(0, 1, 2), seed=1)
        Xt, yt = blobs(64, classes=(3, 4), seed=2)
        sgd = lambda groups: torch.optim.SGD(groups)
        torch.manual_seed(0)
        net = MLP(8, (16,), 3)
        tr = TransferTrainer(net, optimizer=sgd, lr=0.1, batch_size=batch_size, seed=0, device="cpu",
                             progress_bar=False)
        h1 = tr.fit((X, y), (X[:31], y[:31]), epochs=3)  # 31: an odd count, sharded unevenly
        tr.save_checkpoint(os.path.join(out, "ck"))
        torch.manual_seed(1)  # samplers drew differently from the global RNG in the two set-ups
        extend_head(net, 2)
        ad = AdaptiveTrainer(net, alpha=0.5, optimizer=sgd, lr=0.1, batch_size=batch_size, seed=0,
                             device="cpu", progress_bar=False)
        h2 = ad.fit((Xt, yt), (X, y), {"source": (X[:31], y[:31]), "target": (Xt, yt)}, epochs=3)
        return {"state": {k: v.clone() for k, v in net.state_dict().items()},
                "transfer": h1.history, "adapt": h2.history, "forgetting": h2.forgetting,
                "rank": int(os.environ.get("RANK", "0"))}

    if __name__ == "__main__":
        result = run(sys.argv[1], int(sys.argv[2]))
        torch.save(result, os.path.join(sys.argv[1], f"result{result['rank']}.pt"))
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    (tmp_path / "_training_data.py").write_text(open(os.path.join(ROOT, "tests", "_training_data.py")).read())
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": ROOT, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path), "32"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-3000:]

    # the same run in one process: a full batch of 64 equals two ranks' batches of 32 averaged by DDP
    sys.path.insert(0, str(tmp_path))
    try:
        import worker
        single_dir = tmp_path / "single"
        single_dir.mkdir()
        single = worker.run(str(single_dir), 64)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("worker", None)

    r0 = torch.load(tmp_path / "result0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "result1.pt", weights_only=True)
    for k, v in single["state"].items():
        assert torch.allclose(r0["state"][k], v, atol=1e-5), k
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # DDP keeps the replicas identical
    for run in ("transfer", "adapt"):
        for key, values in single[run].items():
            assert r0[run][key] == pytest.approx(values, abs=1e-5), (run, key)
            assert r0[run][key] == r1[run][key]  # metrics were reduced across ranks
    assert r0["forgetting"] == pytest.approx(single["forgetting"], abs=1e-6)
    # rank 0 wrote the checkpoint; nothing else appeared next to it
    assert sorted(os.listdir(tmp_path / "ck")) == ["model.safetensors", "trainer_state.pt"]
