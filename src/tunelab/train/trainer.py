"""One Trainer for every task: each task supplies its step (loss and evaluation); the loop owns the rest.

The loss of an optimizer step is normalised over the targets (tokens or examples) of the whole
accumulated batch, so batch_size 8 gives the same update as batch_size 4 with grad_accum 2. A task with
several objectives (BERT pretraining: masked LM and next-sentence prediction) gives each objective's
summed loss and target count by name; each is divided by its own targets over the accumulated batch and
the results are added (mean masked-token CE + mean NSP CE; a step's `loss_weights` scales an objective's
term, task.nsp_weight), and each is logged, unweighted, as "<name>_loss".
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from tqdm.auto import tqdm

from tunelab.config.schema import TrainSection
from tunelab.nn.precision import cpu_computes_bf16
from tunelab.train.checkpointing import (
    TrainerState,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    prune_checkpoints,
    save_checkpoint,
)
from tunelab.train.distributed import (
    DistributedContext,
    full_parameters,
    gather_rows,
    gradient_sync,
    is_sharded,
    share_of_batch,
    share_of_rows,
    unwrap,
)
from tunelab.train.logging import MetricsLog
from tunelab.train.optim import build_optimizer, build_scheduler

BEST = "checkpoint-best"


class TaskStep(Protocol):
    """What a task gives the trainer: loss is (summed loss, targets), or for several objectives
    ({name: summed loss}, {name: targets}) with num_targets giving {name: targets} too. A step with several
    objectives may have `loss_weights` ({name: weight}, 1 when absent; MaskedLMStep's task.nsp_weight)."""

    main_metric: str
    greater_is_better: bool

    def num_targets(self, batch: dict) -> int | dict[str, int]: ...

    def loss(self, model, batch: dict) -> tuple[torch.Tensor | dict[str, torch.Tensor], int | dict[str, int]]: ...

    def evaluate(self, model, features: list[dict], batch_size: int, autocast) -> dict[str, Any]: ...

    # optional: a step that carries something from batch to batch (a recurrent LM's state) also has
    # state_dict() -> dict and load_state_dict(dict), saved in and restored from resumable checkpoints; when
    # the carried tensors have one row per batch row (per stream) along a dimension, `state_rows_dim` names
    # it: under torchrun a checkpoint then holds the rows of every process (the same for any world size);
    # a step with pop_train_metrics() -> {name: mean} has those values of its training batches since the
    # last log line logged with the loss (preference tasks: reward accuracy and margin); a step whose evaluate
    # decodes has `generates = True` (GRPO): under FSDP2 rank 0 evaluates it alone with the full parameters


@dataclass
class Batches:
    """The training data as the loop sees it: features, a batch sampler factory, a collate function.

    With `seeded`, collate is called as collate(rows, epoch, progress): whatever it draws at random (MLM
    masks) comes from the epoch and the rows themselves, not from a global random state, and whatever changes
    over training (a masking-rate schedule) from progress (the step's share of the training steps), so a
    resumed run draws exactly the same.
    """

    features: list[dict]
    make_sampler: Callable[[int, int], Any]  # (epoch, start_batch) -> iterable of index lists with len()
    collate: Callable[..., dict]
    seeded: bool = False

    def batch(self, indices: list[int], epoch: int, progress: float) -> dict:
        rows = [self.features[i] for i in indices]
        return self.collate(rows, epoch, progress) if self.seeded else self.collate(rows)


def objectives(value: Any) -> dict[str, Any]:
    """A step's loss or target count by objective name; a single objective is called "loss"."""
    return value if isinstance(value, dict) else {"loss": value}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: None for fp32; 'auto' picks bf16 where the CPU or GPU computes it natively."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_computes_bf16() else None


def autocast_context(dtype: torch.dtype | None, device: torch.device):
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        task: TaskStep,
        train: Batches,
        eval_features: list[dict] | None,
        settings: TrainSection,
        run_dir: Path,
        *,
        on_evaluate: Callable[[int, dict], None] | None = None,
        show_progress: bool = True,
        distributed: DistributedContext | None = None,
    ) -> None:
        """`model` is what the training forward passes go through: under torchrun the DDP wrapper or the
        FSDP2-sharded model (train.distributed.wrap_model), with `distributed` saying which."""
        self.dist = distributed or DistributedContext()
        self.model, self.task, self.train_data, self.eval_features = model, task, train, eval_features
        self.module = unwrap(model)  # what evaluation, checkpoints and the optimizer see
        self.settings, self.run_dir = settings, Path(run_dir)
        self.device = next(model.parameters()).device
        self.amp_dtype = resolve_precision(settings.precision, self.device)
        self.autocast = autocast_context(self.amp_dtype, self.device)
        self.batches_per_epoch = len(train.make_sampler(0, 0))  # a fresh epoch: start_batch 0
        self.steps_per_epoch = max(1, math.ceil(self.batches_per_epoch / settings.grad_accum))
        if settings.max_steps is not None:
            self.total_steps = settings.max_steps
        else:
            self.total_steps = max(1, math.ceil(settings.epochs * self.steps_per_epoch))
        self.optimizer = build_optimizer(self.module, settings.lr, settings.weight_decay, settings.betas,
                                         fused=settings.fused_optimizer)
        self.scheduler = build_scheduler(self.optimizer, settings.schedule, settings.warmup, self.total_steps)
        self.state = TrainerState()
        self.metric = settings.metric or task.main_metric
        self.greater = settings.greater_is_better
        if self.greater is None:
            lower = self.metric.endswith(("loss", "perplexity"))  # loss, mlm_loss, nsp_loss, mlm_perplexity, ...
            self.greater = task.greater_is_better if self.metric == task.main_metric else not lower
        self.on_evaluate = on_evaluate if self.dist.is_main else None
        self.show_progress = show_progress and self.dist.is_main
        self.final_metrics: dict[str, Any] = {}
        self.best_metrics: dict[str, Any] | None = None
        self._last_eval: tuple[int, dict, bool] | None = None  # (step, metrics, improved)

    # ------------------------------------------------------------------ resume

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint of the run directory; False when there is none."""
        checkpoints = list_checkpoints(self.run_dir)
        if not checkpoints:
            return False
        self.state = load_checkpoint(checkpoints[-1], self.module, self.optimizer, self.scheduler, self.task,
                                     task_share=self._share_of_task_state)
        self.best_metrics = self.state.best_metrics
        return True

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        s, state = self.settings, self.state
        self.model.train()
        log = MetricsLog(self.run_dir) if self.dist.is_main else None
        progress = tqdm(
            total=self.total_steps, initial=state.global_step, desc="train", unit="step",
            disable=not self.show_progress, dynamic_ncols=True,
        )
        window_loss: dict[str, float] = {}  # summed loss per objective since the last log line
        window_targets: dict[str, int] = {}
        window_tokens, window_start = 0, time.perf_counter()
        loop_start = window_start  # "elapsed": seconds of training in this process (evaluations included)
        stop = state.global_step >= self.total_steps
        if s.eval_at_start and state.global_step == 0:
            self._evaluate(log)
        try:
            while not stop:
                sampler = self.train_data.make_sampler(state.epoch, state.batch_in_epoch)
                batches = iter(sampler)
                while True:
                    group = []
                    for _ in range(s.grad_accum):
                        indices = next(batches, None)
                        if indices is None:
                            break
                        group.append(self._local_batch(indices, state.epoch, self._progress()))
                    if not group:
                        break
                    loss_sums, targets, tokens = self._optimizer_step(group)
                    state.batch_in_epoch += len(group)
                    state.global_step += 1
                    state.tokens_seen += tokens
                    for name in loss_sums:
                        window_loss[name] = window_loss.get(name, 0.0) + loss_sums[name]
                        window_targets[name] = window_targets.get(name, 0) + targets[name]
                    window_tokens += tokens
                    progress.update(1)
                    if state.global_step % s.logging_steps == 0 or state.global_step == self.total_steps:
                        elapsed = time.perf_counter() - window_start
                        means = {name: window_loss[name] / max(1, window_targets[name]) for name in window_loss}
                        values = {
                            "loss": sum(means.values()),
                            **({f"{name}_loss": v for name, v in means.items()} if len(means) > 1 else {}),
                            "lr": self.scheduler.get_last_lr()[0],
                            "tokens_per_second": window_tokens / max(elapsed, 1e-9),
                            "elapsed": time.perf_counter() - loop_start,
                            "epoch": state.epoch + state.batch_in_epoch / max(1, self.batches_per_epoch),
                            # a step may report more about its training batches (preference: rewards, margin)
                            **(self.task.pop_train_metrics() if hasattr(self.task, "pop_train_metrics") else {}),
                        }
                        if log is not None:
                            log.log(state.global_step, "train", values)
                        progress.set_postfix(
                            loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", tok_s=f"{values['tokens_per_second']:.0f}"
                        )
                        window_loss, window_targets, window_tokens, window_start = {}, {}, 0, time.perf_counter()
                    last = state.global_step >= self.total_steps
                    if s.eval_steps and state.global_step % s.eval_steps == 0 and not last:
                        if self._evaluate(log):
                            stop = True
                    if s.save_steps and state.global_step % s.save_steps == 0 and not last:
                        self._save()
                    if last or stop:
                        stop = True
                        break
                if not stop:
                    state.epoch += 1
                    state.batch_in_epoch = 0
        finally:
            progress.close()
        self._evaluate(log, final=True)
        if log is not None:
            log.close()
        return self.final_metrics

    def _progress(self) -> float:
        """Where the step being taken lies in training: 0 at the first step, 1 at the last."""
        return min(1.0, self.state.global_step / max(1, self.total_steps - 1))

    def _local_batch(self, indices: list[int], epoch: int, progress: float) -> tuple[dict, float]:
        """(this process's share of a global batch, collated; its weight). Under torchrun a short last batch can
        leave a process no row: it then runs its first row with weight 0 (no loss, no targets), so that every
        process takes part in the gradient all-reduce."""
        share = share_of_batch(indices, self.dist)
        if share:
            return self.train_data.batch(share, epoch, progress), 1.0
        return self.train_data.batch(list(indices[:1]), epoch, progress), 0.0

    def _optimizer_step(self, group: list[tuple[dict, float]]) -> tuple[dict[str, float], dict[str, int], int]:
        """Forward/backward every micro-batch of `group`, each objective normalised by its targets in the
        whole group (over every process); one update. Returns the summed loss and the targets per objective,
        and the tokens (of every process)."""
        total_targets: dict[str, int] = {}
        for batch, weight in group:
            for name, count in objectives(self.task.num_targets(batch)).items():
                total_targets[name] = total_targets.get(name, 0) + (count if weight else 0)
        names = list(total_targets)
        if self.dist.enabled:  # the targets of the whole global group; DDP / FSDP2 average: scale by the world
            total_targets = dict(zip(names, (int(v) for v in self.dist.sum([total_targets[n] for n in names]))))
        scale = float(self.dist.world_size)
        weights = getattr(self.task, "loss_weights", {})
        loss_totals = dict.fromkeys(total_targets, 0.0)
        tokens = 0
        for i, (batch, weight) in enumerate(group):
            batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            with gradient_sync(self.model, i == len(group) - 1):
                with self.autocast():
                    loss_sums = objectives(self.task.loss(self.model, batch)[0])
                parts = [loss_sums[name] * (weights.get(name, 1.0) / max(1, total_targets[name]))
                         for name in total_targets]
                loss = parts[0]
                for part in parts[1:]:
                    loss = loss + part
                (loss * (scale * weight)).backward()
            if not weight:
                continue
            for name in total_targets:
                loss_totals[name] += float(loss_sums[name].detach())
            if "attention_mask" in batch:
                tokens += int(batch["attention_mask"].sum())
            if "decoder_attention_mask" in batch:  # an encoder-decoder reads the source and the target
                tokens += int(batch["decoder_attention_mask"].sum())
        if self.dist.enabled:  # what rank 0 logs: the losses and tokens of every process
            summed = self.dist.sum([loss_totals[n] for n in names] + [tokens])
            loss_totals, tokens = dict(zip(names, summed[:-1])), int(summed[-1])
        if self.settings.max_grad_norm:
            params = [p for p in self.model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_totals, total_targets, tokens

    # ------------------------------------------------------------------ evaluation and checkpoints

    def _evaluate(self, log: MetricsLog | None, *, final: bool = False) -> bool:
        """Evaluate, track the best checkpoint; True when early stopping says stop.

        The final call reuses an evaluation already made at this step (a run stopped early). Under torchrun
        rank 0 evaluates while the others wait (an FSDP2 model's forward passes are collective: every process
        evaluates, rank 0 logs), and rank 0's outcome is given to every process.
        """
        if not self.eval_features:
            return False
        stop = False
        if self.dist.is_main or is_sharded(self.model):
            stop = self._evaluate_here(log, final=final)
        if self.dist.enabled:
            shared = (self.state, self.final_metrics, self.best_metrics, self._last_eval, stop)
            state, self.final_metrics, self.best_metrics, self._last_eval, stop = self.dist.broadcast(shared)
            vars(self.state).update(vars(state))  # in place: fit() goes on counting steps in this object
        return stop

    def _evaluate_here(self, log: MetricsLog | None, *, final: bool) -> bool:
        state, s = self.state, self.settings
        if final and self._last_eval is not None and self._last_eval[0] == state.global_step:
            _, metrics, improved = self._last_eval
        else:
            metrics = self._task_metrics()
            self.model.train()
            if log is not None:
                log.log(state.global_step, "validation", metrics)
            # train.sample_prompts: rank 0's on_evaluate generates text; under FSDP2 every process gathers the
            # full parameters for it, so that rank 0's decoding forward passes make no collectives
            with full_parameters(self.model, enabled=bool(s.sample_prompts)):
                if self.on_evaluate:
                    self.on_evaluate(state.global_step, metrics)
            improved = self._track_best(metrics, save=not final)
            self._last_eval = (state.global_step, metrics, improved)
        self.final_metrics = {**metrics, "step": state.global_step}
        if final:
            if not improved and (self.run_dir / BEST).exists():
                load_model_weights(self.run_dir / BEST, self.module)
                logged = self._logged_metrics(log, state.best_step) if log is not None else {}
                self.final_metrics = self.best_metrics or {**logged, "step": state.best_step}
            return False
        patience = s.early_stopping_patience
        return bool(patience and state.evals_without_improvement >= patience)

    def _task_metrics(self) -> dict[str, Any]:
        """The task's evaluation of the validation rows. A task whose evaluation decodes (`generates`: GRPO's
        greedy completions) runs a forward pass per new token: under FSDP2 every process gathers the full
        parameters once (full_parameters), rank 0 decodes alone with no collective forward passes, and the
        others take its metrics, so that every process decides alike on the best checkpoint."""
        batch_size = self.settings.eval_batch_size or self.settings.batch_size
        if not (is_sharded(self.model) and getattr(self.task, "generates", False)):
            return self.task.evaluate(self.module, self.eval_features, batch_size, self.autocast)
        metrics = None
        with full_parameters(self.model):
            if self.dist.is_main:
                metrics = self.task.evaluate(self.module, self.eval_features, batch_size, self.autocast)
        return self.dist.broadcast(metrics)

    def _track_best(self, metrics: dict, *, save: bool) -> bool:
        """Update the best metric (and checkpoint-best when `save`); whether this evaluation improved."""
        state = self.state
        value = metrics.get(self.metric)
        if value is None:
            raise KeyError(f"metric {self.metric!r} is not computed by this task; it gives {sorted(metrics)}")
        improved = state.best_metric is None or (value > state.best_metric if self.greater else value < state.best_metric)
        if improved:
            state.best_metric, state.best_step = float(value), state.global_step
            state.evals_without_improvement = 0
            self.best_metrics = state.best_metrics = {**metrics, "step": state.global_step}
            if save:
                save_checkpoint(self.run_dir / BEST, self.module, None, None, state)
        else:
            state.evals_without_improvement += 1
        return improved

    @staticmethod
    def _logged_metrics(log: MetricsLog, step: int | None) -> dict:
        """The validation metrics logged at `step` (after a resume, the best evaluation was in another process)."""
        import json

        found = {}
        with open(log.path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if record.get("split") == "validation" and record.get("step") == step:
                    found = {k: v for k, v in record.items() if k not in ("step", "split")}
        return found

    def _save(self) -> None:
        directory = self.run_dir / f"checkpoint-{self.state.global_step}"
        save_checkpoint(directory, self.module, self.optimizer, self.scheduler, self.state,
                        task_state=self._task_state())
        if self.dist.is_main:
            prune_checkpoints(self.run_dir, self.settings.save_total_limit)

    def _task_state(self) -> dict | None:
        """What the task step carries between batches, for a checkpoint; a state kept per row, of every process
        (gathered: every process calls this)."""
        if not hasattr(self.task, "state_dict"):
            return None
        rows_dim = getattr(self.task, "state_rows_dim", None)
        state = self.task.state_dict()
        return state if rows_dim is None else gather_rows(state, rows_dim, self.dist)

    def _share_of_task_state(self, state: dict) -> dict:
        """This process's rows of a checkpoint's task state kept per row (all of it for any other state)."""
        rows_dim = getattr(self.task, "state_rows_dim", None)
        return state if rows_dim is None else share_of_rows(state, rows_dim, self.dist)
