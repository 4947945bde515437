"""The training loop: AdamW on the prompt parameters only, warmup + decay, clipping, accumulation,
periodic dev evaluation keeping the best prompt, checkpoints (periodic and on SIGINT/SIGTERM), and a
stop on a non-finite loss.

Data order is a seeded permutation per epoch, and the checkpoint stores the position in it plus all
RNG states, so a resumed run takes exactly the steps an uninterrupted one would.

Under torchrun (softtool.distributed) every rank walks the same global order, trains on its shard of
each global batch, and DDP sums the prompt gradients; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from softtool.distributed import DistributedContext
from softtool.errors import SofttoolError
from softtool.training.batching import Feature, collate
from softtool.training.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint, set_rng_state
from softtool.training.forward import batch_loss
from softtool.training.options import SCHEDULES, TrainOptions
from softtool.training.report import write_metrics
from softtool.training.tracking import Tracker, open_tracker


class NonFiniteLoss(SofttoolError):
    """Training stopped because the loss became NaN or infinite."""


@dataclass
class TrainState:
    """Where the run is; everything here goes into the checkpoint."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # examples of the current epoch's order already used
    best_score: float = -math.inf  # higher is better (negated dev loss, or the task metric)
    best_step: int = 0
    best_metrics: dict[str, Any] = field(default_factory=dict)
    best_table: torch.Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class TrainResult:
    state: TrainState
    total_steps: int
    interrupted: bool
    best_table: torch.Tensor


def total_steps(options: TrainOptions, num_examples: int) -> int:
    if options.max_steps:
        return options.max_steps
    per_step = options.batch_size * options.grad_accumulation
    return max(1, math.ceil(options.epochs * num_examples / per_step))


def lr_scheduler(optimizer: torch.optim.Optimizer, options: TrainOptions, steps: int):
    """transformers' schedule (`get_scheduler`): linear warmup from 0 over `warmup_steps`, then linear or cosine
    decay to 0 at `steps`, or constant. A LambdaLR, so its state goes into the checkpoint."""
    from transformers import get_scheduler

    return get_scheduler(
        SCHEDULES[options.schedule], optimizer, num_warmup_steps=options.warmup_steps, num_training_steps=steps
    )


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and returns. A second signal
    falls through to the default handler (the user insists)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Outside the main thread no handler can be set; the run then just cannot stop cleanly.
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.requested = True
        tqdm.write(f"{signal.Signals(signum).name}: finishing this step and saving a checkpoint (again to abort)")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Trains `prompt_module` (its forward() returns the table) against a frozen `model`."""

    def __init__(
        self,
        model,
        prompt_module: nn.Module,
        options: TrainOptions,
        train_features: Sequence[Feature],
        dev_features: Sequence[Feature],
        *,
        pad_id: int,
        vocab_size: int,
        prefix_tokens: int,
        output_dir: Path,
        device: torch.device,
        generate_metrics: Callable[[torch.Tensor], dict[str, float]] | None = None,
        main_metric: str | None = None,
        dist: DistributedContext | None = None,
    ):
        if not train_features:
            raise SofttoolError("no training examples left after reading the data; check --data")
        self.model = model
        self.prompt = prompt_module.to(device)
        self.options = options
        self.train_features = list(train_features)
        self.dev_features = list(dev_features)[: options.eval_limit]
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.prefix_tokens = prefix_tokens if options.prefix_cache else 0
        self.output_dir = Path(output_dir)
        self.device = device
        self.generate_metrics = generate_metrics if options.eval_generate else None
        self.main_metric = main_metric
        self.steps = total_steps(options, len(self.train_features))
        self.optimizer = torch.optim.AdamW(self.prompt.parameters(), lr=options.lr, weight_decay=options.weight_decay)
        self.scheduler = lr_scheduler(self.optimizer, options, self.steps)
        self.scaler = torch.amp.GradScaler("cuda") if options.autocast and options.dtype == "float16" else None
        self.state = TrainState()
        self.saved_step: int | None = None  # the step of the checkpoint on disk, if this run has one
        self.dist = dist or DistributedContext(device=device)
        # Training steps go through the DDP wrapper; evaluation and checkpoints use the plain module.
        self.train_prompt = self.dist.wrap_prompt(self.prompt)
        self.tracker: Tracker | None = None  # --report-to, opened by run() on rank 0

    # -- data order ---------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.options.seed * 100_003 + epoch)
        return torch.randperm(len(self.train_features), generator=gen).tolist()

    def _next_features(self, order: list[int]) -> tuple[list[Feature], list[int]]:
        st = self.state
        if st.position >= len(order):
            st.epoch, st.position = st.epoch + 1, 0
            order = self._order(st.epoch)
        idx = order[st.position : st.position + self.options.batch_size]
        st.position += len(idx)
        return [self.train_features[i] for i in idx], order

    # -- pieces -------------------------------------------------------------------------------------
    def _autocast(self):
        if not self.options.autocast:
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.options.dtype == "bfloat16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def dev_loss(self) -> float:
        table = self.prompt()
        total, count = 0.0, 0
        for start in range(0, len(self.dev_features), self.options.batch_size):
            with self._autocast():
                loss, n = self._shard_loss(self.dev_features[start : start + self.options.batch_size], table)
            total, count = total + float(loss), count + n
        total, count = self.dist.all_reduce_sum(total), self.dist.all_reduce_sum(count)
        return total / max(1, count)

    def evaluate(self) -> None:
        st = self.state
        row: dict[str, Any] = {"kind": "eval", "step": st.step}
        if self.dev_features:
            row["dev_loss"] = self.dev_loss()
        table = self.prompt().detach().float().cpu()
        if self.generate_metrics is not None:
            row.update(self.generate_metrics(table))
        if self.generate_metrics is not None and self.main_metric in row:
            score = float(row[self.main_metric])
        elif "dev_loss" in row:
            score = -row["dev_loss"]
        else:
            score = float(st.step)  # no dev set: the latest prompt is the best we know
        self._record(row)
        if score > st.best_score:
            st.best_score, st.best_step, st.best_table = score, st.step, table.clone()
            st.best_metrics = {k: v for k, v in row.items() if k not in ("kind",)}
        if self.dist.is_main and self.verbose:  # --quiet: the rows are in metrics.jsonl
            tqdm.write("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def checkpoint(self) -> Path | None:
        """Save the resumable checkpoint (rank 0 only; other ranks return None)."""
        st = self.state
        if not self.dist.is_main:
            return None
        path = save_checkpoint(
            self.output_dir,
            {
                "prompt": self.prompt.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "state": vars(st).copy(),
                "total_steps": self.steps,
            },
        )
        self.saved_step = st.step
        return path

    def restore(self) -> None:
        ckpt = load_checkpoint(self.output_dir)
        try:
            self.prompt.load_state_dict(ckpt["prompt"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            self.state = TrainState(**ckpt["state"])
            set_rng_state(ckpt["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SofttoolError(
                f"checkpoint {checkpoint_path(self.output_dir)} does not fit this run ({first}); "
                "start the run again with --overwrite"
            ) from exc
        self.saved_step = self.state.step

    def _non_finite(self, loss: float) -> NonFiniteLoss:
        """The error for a NaN/inf loss, saying truly whether a checkpoint from before it exists."""
        step = self.state.step + 1
        if self.saved_step is None:
            kept = "no checkpoint was written before it"
        else:
            kept = f"the last good checkpoint (step {self.saved_step}) is in {self.output_dir / 'checkpoints'}"
        return NonFiniteLoss(
            f"loss became {loss} at step {step}; training stopped and {kept}; "
            "start again with a lower --lr (or float32) and --overwrite"
        )

    def _shard_loss(self, global_batch: list[Feature], table: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Summed loss and target tokens of this rank's shard of a global batch."""
        feats = self.dist.shard_indices(global_batch)
        # A short last batch can leave a rank nothing. It still runs a row, weighted 0, so that every rank
        # makes the same model calls (FSDP gathers weights collectively) and joins DDP's all-reduce.
        weight = 1.0 if feats else 0.0
        batch = collate(feats or global_batch[:1], self.pad_id, self.prefix_tokens).to(self.device)
        loss, n = batch_loss(self.model, batch, table, self.vocab_size)
        return loss * weight, n if feats else 0

    @contextlib.contextmanager
    def _tracking(self):
        """The --report-to tracker (rank 0), open for the length of a run and closed however it ends."""
        if self.dist.is_main:
            self.tracker = open_tracker(self.options.report_to, self.output_dir, self.state.step)
        try:
            yield
        finally:
            if self.tracker is not None:
                self.tracker.close()
            self.tracker = None

    def _record(self, row: dict[str, Any]) -> None:
        """Append a metrics row to the history (metrics.jsonl) and send it to the tracker, if any."""
        self.state.history.append(row)
        if self.tracker is not None:
            self.tracker.log(row)

    def _save(self) -> None:
        if self.dist.is_main:
            self.checkpoint()
            write_metrics(self.output_dir, self.state.history)
            if self.tracker is not None:
                self.tracker.flush()

    def _train_step(self, order: list[int]) -> tuple[dict[str, Any], list[int]]:
        micro = []
        for _ in range(self.options.grad_accumulation):
            feats, order = self._next_features(order)
            micro.append(feats)
        # Normalize by the target tokens of the whole global step, so accumulation and K ranks equal one big batch.
        tokens = sum(len(f.target_ids) for feats in micro for f in feats)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i, feats in enumerate(micro):
            # DDP sums the gradients over ranks once, on the step's last backward.
            with self.dist.no_sync(self.train_prompt, skip=i < len(micro) - 1):
                with self._autocast():
                    loss = self._shard_loss(feats, self.train_prompt())[0] / tokens
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += float(loss.detach())
        # Checked after the backward passes, on the sum over ranks, so all ranks stop at the same step.
        total = self.dist.all_reduce_sum(total)
        if not math.isfinite(total):
            raise self._non_finite(total)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = 0.0
        if self.options.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.prompt.parameters(), self.options.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        return {
            "kind": "train",
            "step": self.state.step,
            "loss": total,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
        }, order

    verbose = True

    def run(self, resume: bool = False, progress: bool = True) -> TrainResult:
        self.verbose = progress
        self.model.eval()
        self.prompt.train()
        if resume:
            self.restore()
        st = self.state
        order = self._order(st.epoch)
        interrupted = False
        bar = tqdm(
            total=self.steps,
            initial=st.step,
            desc="training",
            unit="step",
            disable=not (progress and self.dist.is_main),
            dynamic_ncols=True,
        )
        with _StopRequest() as stop, self._tracking():
            if st.step == 0 and self.dev_features:
                self.evaluate()  # the starting point: the plot's first dev loss, and the prompt to beat
            while st.step < self.steps:
                start = time.perf_counter()
                try:
                    row, order = self._train_step(order)
                except NonFiniteLoss:
                    bar.close()
                    if self.dist.is_main:
                        write_metrics(self.output_dir, st.history)
                    self.dist.barrier()
                    raise
                elapsed = time.perf_counter() - start
                st.seconds += elapsed
                row["tokens_per_s"] = row["tokens"] / max(elapsed, 1e-9)
                self._record(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
                every = self.options.eval_every
                if (every and st.step % every == 0) or st.step == self.steps:
                    self.evaluate()
                if self.options.checkpoint_every and st.step % self.options.checkpoint_every == 0:
                    self._save()
                # A signal may reach one rank only, or each at a different step: all stop after the same one.
                if self.dist.any(stop.requested) and st.step < self.steps:
                    interrupted = True
                    break
            bar.close()
            # Saved inside the handler's scope so a signal during the save is deferred, not fatal.
            self._save()
            # No rank exits (which makes torchrun stop the others) before rank 0 has written.
            self.dist.barrier()
        best = st.best_table if st.best_table is not None else self.prompt().detach().float().cpu()
        return TrainResult(st, self.steps, interrupted, best)
