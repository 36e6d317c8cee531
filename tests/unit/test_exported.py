"""The public surface: ``torchckpt.__all__`` is exactly the package's public names."""

from __future__ import annotations

import types

import torchckpt

# The names torch.distributed.checkpoint._experimental exports: code ports by changing the prefix.
REFERENCE = {
    "Barrier", "TCPStoreBarrier", "CheckpointReader", "CheckpointWriter", "CheckpointWriterConfig", "WriterHook",
    "Checkpointer", "SyncCheckpointer", "AsyncCheckpointer", "CheckpointerConfig", "BarrierConfig",
    "create_barrier_from_config", "CheckpointStager", "CheckpointStagerConfig", "DefaultStager", "RankInfo",
    "STATE_DICT", "wrap_future", "make_sync_checkpointer", "make_async_checkpointer",
}  # fmt: skip


def test_all_equals_the_public_names() -> None:
    public = {
        name
        for name in dir(torchckpt)
        if not name.startswith("_") and not isinstance(getattr(torchckpt, name), types.ModuleType)
    }
    assert set(torchckpt.__all__) == public
    assert len(torchckpt.__all__) == len(set(torchckpt.__all__))


def test_the_reference_names_are_exported() -> None:
    assert REFERENCE - set(torchckpt.__all__) == set()
