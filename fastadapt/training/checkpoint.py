"""Crash-safe files: atomic writes, safetensors weights, weights_only trainer state.

A trainer checkpoint is a folder holding ``model.safetensors`` and ``trainer_state.pt``. The two must
change together, so a save writes the new weights under a pending name first, then atomically
replaces the state file (the commit point: it names the weights' checkpoint id), then moves the
weights into place. A reader that finds the state ahead of the weights finishes that last move.
Whenever a save dies, the folder holds either the old checkpoint or the new one.
"""
from __future__ import annotations

import glob
import json
import os
import uuid

import torch

WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"
_ID_KEY = "fastadapt_checkpoint_id"
_CONFIG_KEY = "fastadapt_model_config"


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write) -> None:
    """Runs ``write(tmp_path)`` on a temporary file in ``path``'s folder, fsyncs it and renames it to
    ``path``. On any failure the temporary file is removed and ``path`` is untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        mode = _create(tmp)
        write(tmp)
        os.chmod(tmp, mode)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _create(path) -> int:
    """Creates an empty ``path`` with the mode any new file gets (0o666 less the umask) and returns that
    mode. Writers that recreate the file (safetensors writes 0o600) get it back with ``os.chmod``: a
    private mode would survive the rename and hide the user's outputs from those they share them with."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return os.stat(path).st_mode & 0o777


def _fsync_file(path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _weights_payload(module, weights=None) -> dict:
    # clone: safetensors refuses tensors that share storage, and it must see contiguous CPU data.
    weights = module.state_dict() if weights is None else weights
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}


def _metadata(module, extra=None) -> dict:
    meta = dict(extra or {})
    config = getattr(module, "config", None)
    if callable(config):
        meta[_CONFIG_KEY] = json.dumps(config())
    return meta


def save_weights(module, path) -> None:
    """Atomically writes ``module``'s weights (and its architecture, for fastadapt models) as safetensors."""
    from safetensors.torch import save_file

    payload, meta = _weights_payload(module), _metadata(module)
    atomic_write(path, lambda tmp: save_file(payload, tmp, metadata=meta))


def read_weights(path) -> tuple[dict, dict | None]:
    """(state_dict, model config or None) from ``.safetensors`` or a ``.pt``/``.pth`` state dict.
    ``.pt`` files load with ``weights_only=True``: a pickle that would run code is refused."""
    path = os.fspath(path)
    if not path.endswith((".safetensors", ".pt", ".pth")):
        raise ValueError(f"weights path must end in .safetensors, .pt or .pth, got {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path!r}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise ValueError(f"cannot read {path!r} as safetensors: {exc}") from None
        config = json.loads(meta[_CONFIG_KEY]) if _CONFIG_KEY in meta else None
        return state, config
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot load {path!r} with weights_only=True: {exc}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path!r} does not hold a state dict of tensors")
    return obj, None


def save_checkpoint(folder, module, state: dict, weights: dict | None = None) -> None:
    """Writes ``module``'s weights and the trainer ``state`` (tensors and plain values only) to ``folder``;
    ``weights``: the state_dict to write instead of ``module.state_dict()`` (a sharded model's, gathered whole)."""
    from safetensors.torch import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    _roll_forward(folder)
    for stale in glob.glob(os.path.join(folder, ".pending-*.safetensors")):
        os.unlink(stale)  # left by saves that died before their commit point
    ckpt_id = uuid.uuid4().hex
    pending = os.path.join(folder, f".pending-{ckpt_id}.safetensors")
    payload, meta = _weights_payload(module, weights), _metadata(module, {_ID_KEY: ckpt_id})
    try:
        mode = _create(pending)
        save_file(payload, pending, metadata=meta)
        os.chmod(pending, mode)
        _fsync_file(pending)
    except BaseException:
        if os.path.exists(pending):
            os.unlink(pending)
        raise
    # The commit point. If this raises after its rename, the pending weights are what the new state
    # names, so they are left for _roll_forward; if before, the next save removes them.
    try:
        atomic_write(os.path.join(folder, STATE), lambda tmp: torch.save({**state, "checkpoint_id": ckpt_id}, tmp))
    except BaseException:
        if not _committed(folder, ckpt_id) and os.path.exists(pending):
            os.unlink(pending)
        raise
    os.replace(pending, os.path.join(folder, WEIGHTS))
    _fsync_dir(folder)


def _committed(folder, ckpt_id) -> bool:
    try:
        return _read_state(folder).get("checkpoint_id") == ckpt_id
    except Exception:
        return False


def _read_state(folder):
    state_path = os.path.join(folder, STATE)
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"no checkpoint in {folder!r} (missing {STATE})")
    try:
        return torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot load {state_path!r} with weights_only=True: {exc}") from None


def _roll_forward(folder, state=None):
    """Finishes a save that died between its commit point and moving its weights into place."""
    if state is None:
        if not os.path.isfile(os.path.join(folder, STATE)):
            return
        state = _read_state(folder)
    ckpt_id = state.get("checkpoint_id")
    weights_path = os.path.join(folder, WEIGHTS)
    if _weights_id(weights_path) == ckpt_id:
        return
    pending = os.path.join(folder, f".pending-{ckpt_id}.safetensors")
    if not os.path.isfile(pending):
        raise ValueError(f"checkpoint {folder!r} is inconsistent: {WEIGHTS} does not belong to {STATE}")
    os.replace(pending, weights_path)
    _fsync_dir(folder)


def load_checkpoint(folder) -> tuple[dict, dict]:
    """(weights state_dict, trainer state) from a checkpoint folder written by :func:`save_checkpoint`."""
    folder = os.fspath(folder)
    state = _read_state(folder)
    _roll_forward(folder, state)
    weights, _ = read_weights(os.path.join(folder, WEIGHTS))
    return weights, state


def _weights_id(path):
    from safetensors import safe_open

    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get(_ID_KEY)
    except Exception:
        return None


def atomic_write_text(path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)
