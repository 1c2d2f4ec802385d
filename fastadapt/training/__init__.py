"""Training loops for transfer and adaptive (continual) learning, and the helpers they use."""
from fastadapt.training.adaptive import AdaptiveTrainer, replay_indices
from fastadapt.training.callbacks import Callback, EarlyStopping, ModelCheckpoint
from fastadapt.training.checkpoint import read_weights, save_weights
from fastadapt.training.config import AdaptiveConfig, TrainConfig
from fastadapt.training.history import History
from fastadapt.training.lm import HiddenStates, LMAdaptiveTrainer, TinyCausalLM, causal_lm_loss, output_head
from fastadapt.training.loop import Trainer, seed_everything
from fastadapt.training.models import MLP, Pipeline
from fastadapt.training.surgery import extend_head, freeze, get_head, load_pretrained, replace_head, unfreeze
from fastadapt.training.trainer import TransferTrainer

__all__ = ["AdaptiveConfig", "AdaptiveTrainer", "Callback", "EarlyStopping", "HiddenStates", "History", "LMAdaptiveTrainer", "MLP", "ModelCheckpoint",
           "Pipeline", "TinyCausalLM", "TrainConfig", "Trainer", "TransferTrainer", "causal_lm_loss", "extend_head", "freeze", "get_head",
           "load_pretrained", "output_head", "read_weights", "replace_head", "replay_indices", "save_weights", "seed_everything",
           "unfreeze"]
