"""Engine-level, collective checkpoint primitives over megatron-core ``dist_checkpointing``.

``save_state`` / ``load_state`` write and read one checkpoint directory of this rank's model
chunks, optimizer and LR scheduler; the checkpoint module (manifest, ``latest``, retention, RNG,
loader state, signals) is built on top of them. Every function here is collective: call it on
every rank, in the same order.

On disk (one directory, torch_dist backend, the layout Megatron-LM writes)::

    metadata.json        megatron's {"sharded_backend": "torch_dist", ...}         (rank 0)
    common.pt            non-sharded state: scheduler, optimizer param groups,     (rank 0)
                         content metadata, our "gptforge" record (format, step...)
    .metadata            DCP index: every tensor's global shape and where it lives (rank 0)
    __<rank>_<i>.distcp  tensor data written by <rank> (i < 2 writer processes)    (any rank)

Tensor keys do not depend on the layout: ``embedding.word_embeddings.weight``,
``decoder.layers.mlp.linear_fc1.weight`` (layers stacked on a leading axis, so a PP/VPP stage
addresses its slice), ``optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>`` (Adam state in
the model's shape). The optimizer state is megatron's ``fully_reshardable`` content (metadata
``distrib_optim_sharding_type``), so a checkpoint loads into any TP / PP / VPP / DP layout, with
the distributed optimizer on or off, and Megatron-LM's own loader reads it. The distributed
optimizer writes it without megatron's DP all-gather: each rank writes the boxes of each param it
owns, and loads its boxes straight into its state (see "without a DP gather" below).

Async saves (``async_save=True``) hold the training loop only while the state dicts are built and
planned and the writer is forked (on GPUs: plus the copy to host); a background process writes
and fsyncs, and ``SaveHandle.wait()`` (collective) finishes the save at a step boundary.

Loading never unpickles arbitrary objects: ``.metadata`` goes through a restricted unpickler
that only builds torch.distributed.checkpoint's metadata classes, ``common.pt`` and every tensor
item through ``torch.load(weights_only=True)``; every zip record's CRC-32 is checked before it is
deserialised (``torch.load`` itself does not, so a flipped bit would load silently).

Modules: ``save.py`` (``save_state``, ``SaveHandle``), ``load.py`` (``load_state``),
``safe_read.py`` (the reading that never unpickles), ``distopt.py`` (the distributed optimizer's
per-rank boxes), ``state.py`` (file names, state dicts, the optimizer's kind and step).
"""

from __future__ import annotations

from gptforge.parallel.engine import CheckpointError  # noqa: F401 (one class for every engine)
from gptforge.parallel.megatron.checkpoint.load import load_state  # noqa: F401
from gptforge.parallel.megatron.checkpoint.safe_read import read_common, read_metadata  # noqa: F401
from gptforge.parallel.megatron.checkpoint.save import SaveHandle, save_state  # noqa: F401
from gptforge.parallel.megatron.checkpoint.state import WrittenFile, inner_optimizers  # noqa: F401
