"""Orbax checkpointing for dsjax training runs (read by the loop, the converter and ``dsjax.load``).

Layout (one directory per saved step)::

    WORKDIR/checkpoints/<step>/
        state/    the training-state pytree (``StandardSave``): params,
                  optimizer state, router biases, step counter, ...
        data/     the data position (optional): one JSON file per process,
                  ``process_<i>-of-<n>.json``
        config/   the run config as JSON (optional)
        commit_success.txt, _CHECKPOINT_METADATA

Atomicity
---------
Orbax 0.12.8 never writes a step in place on a local / POSIX filesystem: it
writes ``<step>.orbax-checkpoint-tmp/``, writes ``commit_success.txt`` into
it once every item is on disk, then renames it to ``<step>/``
(``AtomicRenameTemporaryPath``). On object stores without atomic rename
(``gs://``) it writes ``<step>/`` in place and ``commit_success.txt`` last
(``CommitFileTemporaryPath``). A process killed mid-save therefore leaves
either a ``*.orbax-checkpoint-tmp`` directory or a step directory without
``commit_success.txt``.

Orbax itself skips tmp directories, and, in commit-file mode, step
directories without the marker; in rename mode it would however accept any
plain ``<step>/`` directory. This module additionally requires
``commit_success.txt`` in every step it lists or restores (orbax 0.12.8
writes it in both modes before finalising; steps written by old orbax
versions that did not are therefore not listed), so an unfinished step is
ignored in every mode: :meth:`Checkpointer.latest_step` and :meth:`Checkpointer.restore`
fall back to the previous complete step, and keep-last-N never counts or
deletes on behalf of it. Stale tmp directories are removed when a
:class:`Checkpointer` is opened; an unfinished ``<step>/`` directory is not
listed, so when that step is saved again the manager writes it afresh (orbax
deletes the stale directory first).
"""

from __future__ import annotations

import logging
import shutil
from typing import Any, Iterator, Optional

from etils import epath
import json

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "COMMIT_MARKER",
    "Checkpointer",
    "is_complete_step_dir",
    "complete_steps",
    "restore_params",
]

log = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"
CHECKPOINTS_SUBDIR = "checkpoints"
STATE_ITEM = "state"
DATA_ITEM = "data"
CONFIG_ITEM = "config"
_ITEMS = (STATE_ITEM, DATA_ITEM, CONFIG_ITEM)
_TMP_SUFFIX = ocp.step.TMP_DIR_SUFFIX  # ".orbax-checkpoint-tmp"

_ATOMICITY_MODES = {
    "auto": ocp.options.AtomicityMode.AUTO,
    "atomic_rename": ocp.options.AtomicityMode.ATOMIC_RENAME,
    "commit_file": ocp.options.AtomicityMode.COMMIT_FILE,
}


def is_complete_step_dir(path: epath.PathLike) -> bool:
    """True if ``path`` is a finalised step directory (has the commit marker)."""
    path = epath.Path(path)
    return (_TMP_SUFFIX not in path.name and path.is_dir()
            and (path / COMMIT_MARKER).exists())


def complete_steps(checkpoints_dir: epath.PathLike) -> list[int]:
    """Sorted steps of the complete checkpoints under ``checkpoints_dir``."""
    checkpoints_dir = epath.Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    return sorted(
        int(p.name) for p in checkpoints_dir.iterdir()
        if p.name.isdigit() and is_complete_step_dir(p))


class _CommittedStepNameFormat:
    """Orbax ``NameFormat`` that only reports steps with the commit marker.

    Wraps the standard ``<step>`` name format; used by the CheckpointManager
    both for listing steps (``latest_step``, retention) and for finding the
    directory of a step to restore or delete.
    """

    def __init__(self, inner):
        self._inner = inner

    def build_name(self, step: int) -> str:
        return self._inner.build_name(step)

    def find_all(self, base_path: epath.PathLike) -> Iterator[Any]:
        for metadata in self._inner.find_all(base_path):
            if is_complete_step_dir(metadata.path):
                yield metadata
            else:
                log.warning("Ignoring unfinished checkpoint %s (no %s).",
                            metadata.path, COMMIT_MARKER)

    def find_step(self, base_path: epath.PathLike, step: int) -> Any:
        metadata = self._inner.find_step(base_path, step)
        if not is_complete_step_dir(metadata.path):
            raise ValueError(
                f"Checkpoint {metadata.path} is not finalised (no {COMMIT_MARKER}).")
        return metadata

    def __str__(self) -> str:
        return f"CommittedStepNameFormat({self._inner})"


def _fill_sharding(leaf: Any) -> Any:
    """Restore target for one leaf: keep shardings, default to one device."""
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
        return jax.ShapeDtypeStruct(
            leaf.shape, leaf.dtype,
            sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    return leaf


class _JsonState:
    """Any object with ``get_state() -> JSON-serialisable`` and ``set_state(state)`` (a recipe's batches)
    as grain's checkpoint handler wants it: the same file a grain ``DatasetIterator`` would write."""

    def __init__(self, inner: Any):
        self.inner = inner

    def get_state(self) -> bytes:
        return json.dumps(self.inner.get_state(), indent=4).encode()

    def set_state(self, state: bytes) -> None:
        self.inner.set_state(json.loads(state))

    def start_prefetch(self) -> None:  # called by grain's handler after a restore
        pass


def _data_item(data: Any) -> Any:
    return data if isinstance(data, grain.DatasetIterator) else _JsonState(data)


class Checkpointer:
    """Saves and restores training checkpoints under ``WORKDIR/checkpoints``.

    Args:
      workdir: run directory; checkpoints go to ``workdir/checkpoints/<step>``.
      keep: number of most recent complete checkpoints to keep (None: all).
      async_save: write arrays in a background thread; :meth:`save` returns
        once device arrays are copied. Call :meth:`wait` (or :meth:`close`)
        before relying on the files.
      save_every: if set, :meth:`save` is a no-op unless ``step`` is a multiple
        of it or a JAX preemption sync point was reached (``force=True``
        overrides). None: every call saves. Steps not above the latest saved
        step are never saved.
      atomicity: "auto" (orbax default: atomic rename on POSIX, commit file on
        GCS), "atomic_rename" or "commit_file".
    """

    def __init__(self,
                 workdir: epath.PathLike,
                 *,
                 keep: Optional[int] = 3,
                 async_save: bool = True,
                 save_every: Optional[int] = None,
                 atomicity: str = "auto"):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        if save_every is not None and save_every < 1:
            raise ValueError(f"save_every must be >= 1 or None, got {save_every}")
        if atomicity not in _ATOMICITY_MODES:
            raise ValueError(
                f"atomicity must be one of {sorted(_ATOMICITY_MODES)}, got "
                f"{atomicity!r}")
        self.workdir = epath.Path(workdir)
        self.directory = self.workdir / CHECKPOINTS_SUBDIR
        self.keep = keep
        self.save_every = save_every
        atomicity_options = ocp.options.AtomicityOptions(
            mode=_ATOMICITY_MODES[atomicity])
        name_format = _CommittedStepNameFormat(
            ocp.step.standard_name_format(atomicity_options=atomicity_options))
        options = ocp.CheckpointManagerOptions(
            step_name_format=name_format,
            preservation_policy=(ocp.checkpoint_managers.LatestN(keep)
                                 if keep is not None else None),
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy([
                ocp.checkpoint_managers.FixedIntervalPolicy(save_every or 1),
                ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
            ]),
            enable_async_checkpointing=async_save,
            create=True,
            atomicity_options=atomicity_options,
        )
        self._remove_tmp_dirs()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                DATA_ITEM: grain.checkpoint.CheckpointHandler(),
                CONFIG_ITEM: ocp.JsonCheckpointHandler(),
            },
        )

    # -------------------------------------------------------------- queries

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints (and of saves still in flight)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        """Latest step with a complete checkpoint (or a save in flight)."""
        return self._manager.latest_step()

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    # ----------------------------------------------------------------- save

    def save(self,
             step: int,
             state: Any,
             data_iterator: Any = None,
             config: Any = None,
             force: bool = False) -> bool:
        """Saves a checkpoint for ``step``; returns True if one was written.

        Args:
          step: training step (the directory name).
          state: pytree of arrays (e.g. ``{"params", "opt_state", "step"}``).
          data_iterator: optional data position: a grain ``DatasetIterator``, or
            any object with ``get_state()`` (JSON-serialisable) and
            ``set_state(state)``; its state is captured synchronously, so the
            caller may advance it as soon as this returns.
          config: optional JSON-serialisable run config (``config.to_dict()``).
          force: save even if ``save_every`` says otherwise.
        """
        step = int(step)
        if not force and not self._manager.should_save(step):
            return False
        items = {STATE_ITEM: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(_data_item(data_iterator))
        if config is not None:
            items[CONFIG_ITEM] = ocp.args.JsonSave(config)
        return bool(
            self._manager.save(step, args=ocp.args.Composite(**items), force=force))

    # -------------------------------------------------------------- restore

    def restore(self,
                step: Optional[int],
                abstract_state: Any,
                data_iterator: Any = None) -> Any:
        """Restores the state saved at ``step`` (None: the latest complete one).

        Args:
          step: step to restore, or None for :meth:`latest_step`.
          abstract_state: restore target with the structure of the saved state,
            e.g. ``jax.eval_shape(init_fn)`` or a live state; leaves are
            ``jax.ShapeDtypeStruct`` (with the wanted sharding) or arrays. Leaves
            without a sharding are placed on the first device. The wanted
            shardings need not be those the checkpoint was saved with: Orbax
            reads for each device just its slice, so a state saved on one mesh
            (or number of processes) restores onto any other.
          data_iterator: if given, its position is restored in place
            (``set_state``; see :meth:`save`).

        Returns:
          The restored state, with the tree structure of ``abstract_state``
          (NamedTuples in the optimizer state included).
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"No complete checkpoint under {self.directory}")
        step = int(step)
        self.wait()
        target = jax.tree.map(_fill_sharding, abstract_state)
        items = {STATE_ITEM: ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            data_dir = self.step_dir(step) / DATA_ITEM
            if not data_dir.exists():
                raise ValueError(
                    f"Checkpoint {self.step_dir(step)} has no data-iterator state.")
            # grain keeps one position per process: resuming needs the same process count.
            mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
            if not (data_dir / mine).exists():
                saved = sorted(p.name for p in data_dir.iterdir() if p.name.startswith("process_"))
                raise ValueError(
                    f"Checkpoint {self.step_dir(step)} holds the data-iterator positions {saved}, not {mine}: it was "
                    f"written by another number of processes than this run's {jax.process_count()}. Resume with the "
                    "same number of processes, or start a new workdir from its params with config.init_from.")
            items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(_data_item(data_iterator))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE_ITEM]

    def restore_config(self, step: Optional[int] = None) -> Any:
        """The JSON config saved with ``step`` (None: latest), or None."""
        if step is None:
            step = self.latest_step()
        if step is None or not (self.step_dir(step) / CONFIG_ITEM).exists():
            return None
        self.wait()
        restored = self._manager.restore(
            int(step), args=ocp.args.Composite(
                **{CONFIG_ITEM: ocp.args.JsonRestore()}))
        return restored[CONFIG_ITEM]

    # ------------------------------------------------------------ lifecycle

    def wait(self) -> None:
        """Blocks until any background save has been finalised."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases resources."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------- internals

    def _is_primary(self) -> bool:
        return jax.process_index() == 0

    def _remove_tmp_dirs(self) -> None:
        """Deletes ``*.orbax-checkpoint-tmp*`` leftovers of interrupted saves."""
        if not self._is_primary() or not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if _TMP_SUFFIX in path.name and path.is_dir():
                log.warning("Removing unfinished checkpoint %s", path)
                shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------
# Reading params without a restore target
# ----------------------------------------------------------------------


def _resolve_step_dir(path: epath.Path) -> epath.Path:
    """Maps a step dir, a checkpoints dir or a workdir to a step directory."""
    if (path / STATE_ITEM).is_dir():
        if not is_complete_step_dir(path):
            raise ValueError(f"Checkpoint {path} is not finalised (no "
                             f"{COMMIT_MARKER}).")
        return path
    for candidate in (path, path / CHECKPOINTS_SUBDIR):
        steps = complete_steps(candidate)
        if steps:
            return candidate / str(steps[-1])
    raise FileNotFoundError(f"No complete checkpoint found at {path}")


def restore_params(path: epath.PathLike, key: str = "params") -> Any:
    """Reads the ``params`` subtree of a training checkpoint as numpy arrays.

    Args:
      path: a step directory ``WORKDIR/checkpoints/<step>``, the
        ``WORKDIR/checkpoints`` directory or ``WORKDIR`` itself (the latter two
        use the latest complete step).
      key: top-level key of the saved state holding the params.

    Returns:
      Nested dict of ``np.ndarray`` with the saved shapes and dtypes; nothing
      else of the state (optimizer moments, ...) is read. No abstract target or
      matching device topology is needed.
    """
    step_dir = _resolve_step_dir(epath.Path(path))
    state_dir = step_dir / STATE_ITEM
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(state_dir).tree
        if not isinstance(tree, dict) or key not in tree:
            raise KeyError(f"No {key!r} in the state saved at {state_dir}")
        meta = tree[key]
        item = {key: jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)}
        restore_args = {key: jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)}
        restored = handler.restore(
            state_dir,
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                        partial_restore=True))
    finally:
        handler.close()
    return restored[key]
