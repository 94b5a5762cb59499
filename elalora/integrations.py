"""Hugging Face ``transformers.Trainer`` integration.

    model = elalora.inject(AutoModelForSequenceClassification.from_pretrained(...), config)
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    callback = ElaLoRACallback(config).attach(trainer)   # config.total_steps may stay None
    trainer.train()

What the callback does, and where:

* ``on_train_begin``: creates the ``RankAllocator`` on the Trainer's optimizer
  (unwrapped from Accelerate's wrapper, so a round moves and zeroes exactly the
  right Adam moments) with ``total_steps = state.max_steps`` — the Trainer's own
  count of optimizer steps, so the user never computes it. When the Trainer
  resumes from a checkpoint (any path given to ``train(resume_from_checkpoint=...)``),
  the allocator state saved there is loaded, so the run continues bit for bit.
  It also moves the callback to the front of the Trainer's callback list, so
  that its ``on_log`` runs before the reporting integrations (TensorBoard,
  W&B, … are added before user callbacks) and they record the ``elalora/*``
  scalars. The Trainer hands callbacks no reference to itself, so
  ``attach(trainer)`` is how the callback gets one: it puts the callback in
  the list, wraps ``trainer.train`` to see ``resume_from_checkpoint`` (checked
  against the installed Trainer's signature when attaching) and
  ``trainer.save_model``. A callback the Trainer runs without being attached
  raises at ``on_train_begin`` instead of guessing.
* ``on_optimizer_step``: steps the allocator. In transformers 5.x this event
  fires right after ``optimizer.step()`` and before ``lr_scheduler.step()`` and
  ``model.zero_grad()`` — exactly where docs/ALGORITHM.md needs it (gradients are
  the clipped ones that were just applied). ``on_step_end`` would be too late:
  the gradients are gone by then. A step the optimizer skipped (fp16
  ``GradScaler`` overflow, reported by Accelerate's ``step_was_skipped``) is
  skipped by the allocator too.
* **Orthogonality penalty** (``config.orth_reg``): a forward hook on the model
  adds ``allocator.orth_penalty()`` to ``outputs.loss`` whenever the model is
  in training mode and returned a loss — the mechanism PEFT's AdaLoRA uses for
  its own regulariser, with no Trainer subclass. The Trainer then treats it
  like the task loss (gradient accumulation scaling, fp16 loss scaling,
  clipping, DDP). When the Trainer normalises the loss over the whole
  accumulated batch itself (the model received ``num_items_in_batch``), the
  hook adds ``penalty / gradient_accumulation_steps`` per micro-batch so that
  one optimizer step still sees the penalty once; with
  ``average_tokens_across_devices`` the Trainer also multiplies that loss by
  the number of processes (DDP then averages), so the hook divides by it too:
  a DDP run equals one process with the same global batch. Inside
  ``elalora.disable_adapters`` (a reference pass) no penalty is added. The logged training loss
  includes the penalty. If the loss is computed outside the model (a
  ``compute_loss_func``, label smoothing), the hook sees no loss and warns once;
  add ``callback.allocator.orth_penalty()`` to your loss yourself, or pass
  ``orth_in_loss=False`` to silence it.
* Logging: at every Trainer logging step the callback adds
  ``elalora/total_rank``, ``elalora/min_rank``, ``elalora/max_rank``,
  ``elalora/rounds``, ``elalora/ranks_moved`` and
  ``elalora/nonfinite_grad_elements`` (both since the last log) and
  ``elalora/orth_penalty`` to the logged dict (seen by every other callback,
  reporters included, and written into ``state.log_history``). Each round is logged through the
  ``elalora`` logger (pruned/expanded layers). At the end of training the run
  record (``elalora_run.json``: ranks, round history) is written to
  ``args.output_dir``; ``python -m elalora plot OUTPUT_DIR`` draws it.
* Saving: every checkpoint and every ``trainer.save_model(dir)`` also gets the
  adapter-only files of ``elalora.save_pretrained`` (a PEFT LoRA adapter and
  elalora's own ``elalora_config.json``, ``elalora_model.safetensors``) and the allocator state (``allocator.json`` +
  ``allocator.safetensors``, no pickle): ``on_save`` writes them into the
  checkpoint, and the Trainer's ``save_model`` is wrapped to write them beside
  the weights it saves (the model's own ``save_pretrained`` leaves the
  adapters out of those: see ``elalora.pretrained.save_through_transformers``;
  on resuming, and after ``load_best_model_at_end``, the callback loads them
  from elalora's files). ``elalora.from_pretrained(base,
  dir)`` loads them onto a fresh base model; so does transformers alone
  (``AutoModelFor….from_pretrained(dir)`` with peft installed), as the files
  under PEFT's names are a PEFT LoRA adapter.
* Gradient checkpointing with a frozen embedding: the embedding output is made
  to require grad (``enable_input_require_grads``, as PEFT does).
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ._files import write_json_atomic
from .allocator import RankAllocator
from .allocator_files import has_allocator_state
from .config import ElaLoRAConfig
from .disable import adapters_disabled
from .io import load_adapter
from .model import adapter_layers, keep_inputs_differentiable
from .pretrained import save_pretrained

logger = logging.getLogger("elalora")

try:  # transformers (and accelerate, which its Trainer needs) are optional for the package
    from accelerate.utils import extract_model_from_parallel
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as err:  # pragma: no cover
    raise ImportError("elalora.integrations needs `transformers` and `accelerate` (pip install 'elalora[hf]')") from err


def unwrap_optimizer(optimizer):
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer`` (or similar wrappers)."""
    for _ in range(5):  # AcceleratedOptimizer subclasses torch.optim.Optimizer and holds the real one
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


class ElaLoRACallback(TrainerCallback):
    """Steps an ElaLoRA ``RankAllocator`` inside ``transformers.Trainer`` (see the module doc).

    ``config`` is the ``ElaLoRAConfig`` the model was injected with; its
    ``total_steps`` is ignored in favour of the Trainer's ``state.max_steps``.
    Hand it its Trainer with ``attach(trainer)``. After training,
    ``callback.allocator`` holds the allocator (rank pattern, history) and
    ``callback.record`` the run record.
    """

    RUN_RECORD = "elalora_run.json"

    def __init__(self, config: ElaLoRAConfig, *, orth_in_loss: bool = True, write_run_record: bool = True):
        if not isinstance(config, ElaLoRAConfig):
            raise TypeError(f"ElaLoRACallback expects an ElaLoRAConfig, got {type(config).__name__}")
        self.config = config
        self.orth_in_loss = orth_in_loss
        self.write_run_record = write_run_record
        self.allocator: Optional[RankAllocator] = None
        self._model: Optional[nn.Module] = None  # the unwrapped model, set at on_train_begin
        self.record: Optional[dict] = None
        self._hook = None
        self._ga_steps = 1
        self._loss_scale = 1  # how many times the Trainer multiplies a loss normalised over the accumulated batch
        self._last_penalty: Optional[torch.Tensor] = None
        self._moved_since_log = 0
        self._nonfinite_at_last_log = 0  # allocator.nonfinite_total() at the previous log
        self._warned_no_loss = False
        self._initial: dict[str, int] = {}
        self._trainer: Optional[Trainer] = None
        self._resume_from = None  # the resume_from_checkpoint of the Trainer's current train() call

    def attach(self, trainer: Trainer) -> "ElaLoRACallback":
        """Run in ``trainer``: first in its callback list, seeing its ``train`` and ``save_model`` calls.

        Returns the callback. Call it once per Trainer, before ``trainer.train()``.
        """
        if not isinstance(trainer, Trainer):
            raise TypeError(f"ElaLoRACallback.attach expects a transformers Trainer, got {type(trainer).__name__}")
        if "resume_from_checkpoint" not in inspect.signature(trainer.train).parameters:
            raise RuntimeError(
                "ElaLoRACallback.attach: this transformers' Trainer.train takes no resume_from_checkpoint; "
                "this elalora does not support it"
            )
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        # First in the list, so that the reporters' on_log sees our scalars.
        callbacks.insert(0, self)
        self._trainer = trainer
        _wrap(trainer, "train", self, self._train_wrapper)
        _wrap(trainer, "save_model", self, self._save_model_wrapper)
        return self

    # ------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("ElaLoRACallback: the Trainer passed no model/optimizer to on_train_begin")
        if self._trainer is None:
            raise RuntimeError(
                "ElaLoRACallback: not attached to its Trainer; call ElaLoRACallback(config).attach(trainer) "
                "before trainer.train()"
            )
        model = extract_model_from_parallel(model, keep_torch_compile=False)
        if not adapter_layers(model):
            raise ValueError(
                "ElaLoRACallback: the model has no ElaLoRA adapters; call elalora.inject(model, config) first"
            )
        total = int(state.max_steps)
        try:
            self.config.for_run(total)  # the same schedule rule as RankAllocator's
        except ValueError as err:
            raise ValueError(
                f"ElaLoRACallback: the Trainer will run {total} optimizer steps, which the config's schedule does not "
                f"fit ({err}); lower t_init / t_final, leave them None, or train longer"
            ) from None
        self._initial = {n: layer.active_rank for n, layer in adapter_layers(model)}
        self.allocator = RankAllocator(model, self.config, optimizer=unwrap_optimizer(optimizer), total_steps=total)
        if state.global_step > 0:  # resuming: the adapters and the allocator state live beside the checkpoint
            ckpt = self._resumed_checkpoint(args, state)
            # The Trainer's weights file leaves the adapters out (see elalora.pretrained.save_through_transformers)
            with_state = has_allocator_state(ckpt)
            load_adapter(model, ckpt, allocator=self.allocator if with_state else None)
            if with_state:
                logger.info("elalora: resumed allocator state from %s (step %d)", ckpt, self.allocator.t)
            else:
                warnings.warn(
                    f"ElaLoRACallback: resuming at step {state.global_step} but {ckpt} holds no allocator state; "
                    "importance scores restart from zero",
                    RuntimeWarning,
                )
                self.allocator.t = int(state.global_step)
        self._ga_steps = max(1, int(getattr(args, "gradient_accumulation_steps", 1)))
        self._loss_scale = _token_average_scale(self._trainer)
        if self.orth_in_loss and self.config.orth_reg > 0:
            self._hook = model.register_forward_hook(self._add_penalty, with_kwargs=True)
        keep_inputs_differentiable(model)
        self._model = model

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.allocator is None:
            return
        skipped = bool(getattr(optimizer, "step_was_skipped", False))
        info = self.allocator.step(optimizer_skipped=skipped)  # info.nonfinite is not read: on a GPU it would sync
        if info.round is not None:
            rec = info.round
            self._moved_since_log += rec.moved
            logger.info(
                "elalora round at step %d: budget %d, moved %d ranks; pruned %s; expanded %s%s",
                rec.step, rec.budget, rec.moved, rec.pruned, rec.expanded,
                f"; passed over full layers {rec.passed_over}" if rec.passed_over else "",
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.allocator is None or logs is None or "loss" not in logs and "train_loss" not in logs:
            return
        ranks = [layer.active_rank for layer in self.allocator.layers]
        nonfinite = self.allocator.nonfinite_total()  # on a GPU: the log step's one sync
        extra = {
            "elalora/total_rank": sum(ranks),
            "elalora/min_rank": min(ranks),
            "elalora/max_rank": max(ranks),
            "elalora/rounds": len(self.allocator.history),
            "elalora/ranks_moved": self._moved_since_log,
            "elalora/nonfinite_grad_elements": nonfinite - self._nonfinite_at_last_log,
        }
        if self._last_penalty is not None:
            extra["elalora/orth_penalty"] = float(self._last_penalty)
        self._moved_since_log = 0
        self._nonfinite_at_last_log = nonfinite
        logs.update(extra)
        # The Trainer copied `logs` into log_history before calling callbacks: add ours there too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        ckpt = self._checkpoint_dir(args, state)
        if self.allocator is not None and ckpt.is_dir() and state.is_world_process_zero:
            self._write_adapter(ckpt)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.allocator is None:
            return
        if args.load_best_model_at_end and state.best_model_checkpoint:
            # the Trainer loaded the best checkpoint's weights file, which leaves the adapters out: ours hold them
            best = state.best_model_checkpoint
            load_adapter(self._model, best, allocator=self.allocator if has_allocator_state(best) else None)
        from .run_records import run_record

        self.record = run_record(self.allocator, initial_ranks=self._initial,
                                 extra={"global_step": state.global_step})
        logger.info("elalora final rank pattern (total %d): %s", self.allocator.total_rank(),
                    self.allocator.rank_pattern())
        if self.write_run_record and state.is_world_process_zero and args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            write_json_atomic(Path(args.output_dir) / self.RUN_RECORD, self.record)

    # ------------------------------------------------------------- saving
    @staticmethod
    def _checkpoint_dir(args, state) -> Path:
        return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"

    def _write_adapter(self, directory) -> None:
        """The adapter-only files and the allocator state (skipped once adapters are merged or unloaded)."""
        layers = adapter_layers(self._model)
        if layers and not any(layer.merged for _, layer in layers):
            save_pretrained(self._model, directory, allocator=self.allocator)

    def _resumed_checkpoint(self, args, state) -> Path:
        """The checkpoint the Trainer resumed from, as ``Trainer.train`` resolves its argument."""
        resumed = self._resume_from
        if resumed is True:
            resumed = get_last_checkpoint(args.output_dir)
        if isinstance(resumed, (str, os.PathLike)):
            return Path(resumed)
        return self._checkpoint_dir(args, state)

    # Wrappers of the Trainer's methods (the Trainer, not the model, is wrapped: a wrapped bound
    # method on the model would follow it into copies and pickles).
    def _train_wrapper(self, original):
        signature = inspect.signature(original)

        def train(*args, **kwargs):
            callback = train.elalora_callback
            callback._resume_from = signature.bind(*args, **kwargs).arguments.get("resume_from_checkpoint")
            return original(*args, **kwargs)

        return train

    def _save_model_wrapper(self, original):
        trainer = self._trainer

        def save_model(output_dir=None, _internal_call: bool = False):
            original(output_dir, _internal_call)
            if not _internal_call and trainer.args.should_save:
                save_model.elalora_callback._write_adapter(output_dir or trainer.args.output_dir)

        return save_model

    # --------------------------------------------------------- the penalty
    def _add_penalty(self, module, args, kwargs, output):
        if not module.training or self.allocator is None or adapters_disabled(self.allocator.layers):
            return None
        loss = _get_loss(output)
        if loss is None:
            if not self._warned_no_loss:
                self._warned_no_loss = True
                warnings.warn(
                    "ElaLoRACallback: the model returned no loss in training mode, so the orthogonality penalty "
                    "was not added; add `callback.allocator.orth_penalty()` to your loss (or pass orth_in_loss=False)",
                    RuntimeWarning,
                )
            return None
        penalty = self.allocator.orth_penalty()
        self._last_penalty = penalty.detach()
        if kwargs.get("num_items_in_batch") is not None:  # loss already normalised over the accumulated batch
            penalty = penalty / (self._ga_steps * self._loss_scale)
        return _set_loss(output, loss + penalty.to(loss.dtype))


def _wrap(trainer: Trainer, method: str, callback: ElaLoRACallback, make_wrapper) -> None:
    """Replace ``trainer.<method>`` by ``make_wrapper(original)`` once; a later callback takes the wrapper over."""
    current = getattr(trainer, method)
    if not hasattr(current, "elalora_callback"):
        current = functools.wraps(current)(make_wrapper(current))
        setattr(trainer, method, current)
    current.elalora_callback = callback


def _token_average_scale(trainer: Trainer) -> int:
    """The factor by which the Trainer multiplies a loss the model normalised over the tokens of every process
    (``average_tokens_across_devices``): the number of data-parallel processes, so that DDP's mean of the
    gradients is the gradient of the global token mean (transformers' ``Trainer.compute_loss``)."""
    if not getattr(trainer.args, "average_tokens_across_devices", False):
        return 1
    tensor_parallel = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
    return max(1, trainer.accelerator.num_processes // tensor_parallel)


def _get_loss(output):
    if isinstance(output, dict) or hasattr(output, "keys"):
        return output.get("loss") if hasattr(output, "get") else None
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) and output[0].dim() == 0:
        return output[0]
    return None


def _set_loss(output, loss):
    if isinstance(output, tuple):
        return (loss,) + tuple(output[1:])
    output["loss"] = loss  # ModelOutput keeps attribute and key in sync
    return output
