"""torchckpt: save and restore PyTorch training state, fast, atomically, safely.

The API of ``torch.distributed.checkpoint._experimental`` under ``torchckpt``,
with atomic commits, checksums, enforced timeouts and no pickle on load.
"""

from .barriers import Barrier, BarrierConfig, DistBarrier, TCPStoreBarrier, create_barrier_from_config, register_barrier
from .builder import make_async_checkpointer, make_sync_checkpointer
from .checkpoint_reader import CheckpointReader
from .checkpoint_writer import CheckpointFormat, CheckpointWriter, CheckpointWriterConfig, WriterHook
from .checkpointer import AsyncCheckpointer, Checkpointer, SyncCheckpointer
from .config import CheckpointerConfig
from .manager import CheckpointManager, SaveHandle
from .retention import KeepBest, KeepEvery, KeepLast
from .checkpoint_process import CheckpointProcess, CheckpointProcessConfig
from .staging import CheckpointStager, CheckpointStagerConfig, DefaultStager
from .step_upload import UploadConfig
from .types import STATE_DICT, RankInfo
from .utils import wrap_future

__version__ = "0.1.0"

__all__ = [
    "STATE_DICT",
    "AsyncCheckpointer",
    "Barrier",
    "BarrierConfig",
    "CheckpointFormat",
    "CheckpointManager",
    "CheckpointProcess",
    "CheckpointProcessConfig",
    "CheckpointReader",
    "CheckpointStager",
    "CheckpointStagerConfig",
    "CheckpointWriter",
    "CheckpointWriterConfig",
    "Checkpointer",
    "CheckpointerConfig",
    "DefaultStager",
    "DistBarrier",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "RankInfo",
    "SaveHandle",
    "SyncCheckpointer",
    "TCPStoreBarrier",
    "UploadConfig",
    "WriterHook",
    "create_barrier_from_config",
    "make_async_checkpointer",
    "make_sync_checkpointer",
    "register_barrier",
    "wrap_future",
]
