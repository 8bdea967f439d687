"""What a run records while it trains: metrics rows, last/epochN checkpoints, its status.

A Lightning callback owns this so that the LightningModule stays about learning. All files
are written by process 0 only; checkpoints go through the trainer, atomically.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console

from classlab.engine.loggers import log_epoch
from classlab.engine.optim import head_lr
from classlab.errors import ClassLabError
from classlab.run import RunFolder, atomic_torch_save

METRIC_COLUMNS = ["epoch", "step", "lr", "train/loss", "train/acc", "val/loss", "val/acc", "val/acc5", "time"]


# An epoch's mean training loss this many times an even guess's (ln of the number of classes, at least 1) says the
# weights are blowing up: a healthy run starts near ln k and falls (a bad start stays within a few times it), where
# optim.lr=100 on the sample gave finite losses of 1e12-1e15 and a run that "finished" at chance without a word.
LOSS_BLOWUP = 20.0


def loss_blowup_note(loss: float | None, num_classes: int | None, epoch: int) -> str | None:
    """The note for an epoch whose mean training loss is far above an even guess's, or None."""
    if loss is None or not num_classes or num_classes < 2 or not math.isfinite(loss):
        return None  # (a loss that is not finite stops the run itself: engine.nonfinite)
    even = math.log(num_classes)
    if loss <= LOSS_BLOWUP * max(even, 1.0):
        return None
    return (
        f"note: epoch {epoch}'s mean training loss {loss:.3g} is over {LOSS_BLOWUP:g}x the {even:.2f} of an even "
        f"guess over {num_classes} classes: the weights are blowing up; optim.lr may be too high (try a tenth of it)"
    )


class RunConsole(Console):
    """A run's lines on stdout, for a reader that may leave: ``classlab train | head -1`` closes the pipe after one
    line. rich's own answer to that, SystemExit(1) out of whatever printed, failed the run in the middle of an epoch
    (summary.json said ``failed`` while the command said ``interrupted``). Here the output goes to /dev/null from
    then on and ``on_closed`` is called: the run stops as for SIGPIPE, between two batches (``GracefulStop.ask``).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.closed = False  # the reader left
        self.on_closed: Callable[[], None] | None = None

    def on_broken_pipe(self) -> None:
        self.quiet = True
        self.closed = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # later writes (print, the interpreter's last flush) go nowhere
            os.close(devnull)
        except (OSError, ValueError):  # a stdout with no file descriptor of its own
            pass
        if self.on_closed is not None:
            self.on_closed()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed, so a kill never leaves half a file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)


class RunRecorder(L.Callback):
    """Appends a metrics.csv row per validated epoch, keeps last.ckpt and epochN.ckpt, marks the summary.

    last.ckpt is written at the end of an epoch once ``last_every_s`` seconds have passed since the
    previous write: a few-shot run of 2,400 one-step epochs otherwise spent about 30% of its time
    writing checkpoints. The final epoch, an early stop and Ctrl-C are always written; a resume from an
    older last.ckpt drops the later metrics.csv rows and retrains them identically.
    """

    def __init__(
        self,
        run: RunFolder,
        extra: dict[str, Any],
        keep_every: int | None,
        console: Console | None,
        columns: list[str] | None = None,
        last_every_s: float = 0.0,
    ) -> None:
        self.run = run
        self.columns = columns or METRIC_COLUMNS  # a task with more metrics (multitask) adds columns
        self.extra = extra  # plain data stored in every checkpoint (classes, size, ...)
        self.keep_every = keep_every
        self.console = console
        self.last_every_s = last_every_s
        self.started = time.time()
        self.elapsed_before = 0.0
        self.saved_epochs = 0  # the epochs last.ckpt holds
        self._saved_at = time.monotonic()
        self._mid_epoch = False
        self.loss_note: str | None = None  # said once a run: the training loss far above an even guess's
        self.stop_note = ""  # how an interrupted run stopped and what last.ckpt holds (for the user's line)

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.elapsed_before + time.time() - self.started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.elapsed_before = float(state.get("elapsed", 0.0))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.saved_epochs = trainer.current_epoch  # a resumed run starts from what last.ckpt holds
        self._saved_at = time.monotonic()

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._mid_epoch:
            # Stopped between two batches: the epoch has no metrics row yet and resumes at the next batch.
            done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
            checkpoint["classlab"] = dict(self.extra, epochs_done=trainer.current_epoch, batches_done=done)
        else:
            checkpoint["classlab"] = dict(self.extra, epochs_done=trainer.current_epoch + 1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        train_metrics = pl_module.epoch_train_metrics()
        validated = pl_module.validated_epoch == trainer.current_epoch
        if trainer.is_global_zero and (validated or not pl_module.has_val):
            lr = head_lr(trainer.optimizers[0]) if trainer.optimizers else None
            row = {"epoch": epoch, "step": trainer.global_step, "lr": lr, "time": round(self.elapsed(), 2)}
            row.update(train_metrics)
            if validated:
                row.update(pl_module.last_val)
            self.run.append_metrics(row, self.columns)
            log_epoch(trainer, row)
            if self.console is not None:
                shown = "  ".join(
                    f"{k} {row[k]:.4f}" for k in ("train/loss", "train/acc", "val/loss", "val/acc") if k in row
                )
                self.console.print(f"epoch {epoch}/{trainer.max_epochs}  {shown}  ({row['time']:.0f}s)")
            self._say_loss(row, getattr(pl_module, "num_classes", None))
        if self._last_due(trainer):
            self._save_last(trainer)
        if self.keep_every and epoch % self.keep_every == 0:
            trainer.save_checkpoint(self.run.checkpoint_path(f"epoch{epoch}"), weights_only=False)

    def _say_loss(self, row: dict[str, Any], num_classes: int | None) -> None:
        """The first epoch whose training loss says the weights are blowing up: a note, and summary.json's
        ``training_loss_note`` (the run goes on: a finite loss may still come down)."""
        if self.loss_note is not None:
            return
        self.loss_note = loss_blowup_note(row.get("train/loss"), num_classes, int(row["epoch"]))
        if self.loss_note is not None:
            if self.console is not None:
                self.console.print(self.loss_note)
            self.run.update_summary(training_loss_note=self.loss_note.removeprefix("note: "))

    def _last_due(self, trainer: L.Trainer) -> bool:
        ending = (
            trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
            or trainer.should_stop
            or 0 < trainer.max_steps <= trainer.global_step
        )
        if ending or trainer.received_sigterm:  # a stop asked for (GracefulStop) ends the run here
            return True
        # Every process must take the same decision: saving is collective under DDP.
        return bool(trainer.strategy.broadcast(time.monotonic() - self._saved_at >= self.last_every_s, src=0))

    def _save_last(self, trainer: L.Trainer, mid_epoch: bool = False) -> None:
        if trainer.is_global_zero:
            self.run.keep_previous()  # a last.ckpt damaged later costs one write interval, not the run
        self._mid_epoch = mid_epoch
        try:
            trainer.save_checkpoint(self.run.checkpoint_path("last"), weights_only=False)
        finally:
            self._mid_epoch = False
        self.saved_epochs = trainer.current_epoch + (0 if mid_epoch else 1)
        self._saved_at = time.monotonic()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # A stop asked for between two batches (GracefulStop, or Lightning's SIGTERM under DDP) leaves a
        # consistent state to write; a KeyboardInterrupt may have landed inside an optimizer step, so the
        # last.ckpt written before it stands.
        stopped = isinstance(exception, SIGTERMException)
        interrupted = stopped or isinstance(exception, KeyboardInterrupt)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if stopped and 0 < done < trainer.num_training_batches:
            self._save_last(trainer, mid_epoch=True)
            self.stop_note = (
                f"stopped after batch {done} of epoch {trainer.current_epoch + 1}; last.ckpt holds that point"
            )
        elif interrupted:
            # At an epoch's end last.ckpt was just written (a stop asked for makes it due); anywhere else
            # (a second Ctrl-C, DDP's SIGTERM inside validation) the last one written stands.
            how = "stopped" if stopped and self.saved_epochs == trainer.current_epoch else "stopped at once"
            held = f"last.ckpt holds epoch {self.saved_epochs}" if self.saved_epochs else "no checkpoint written yet"
            self.stop_note = f"{how}; {held}"
        if trainer.is_global_zero:
            # An exception may name the status it means (the non-finite guard's ``diverged``).
            status = "interrupted" if interrupted else getattr(exception, "run_status", "failed")
            error = str(exception)
            if not isinstance(exception, ClassLabError):
                error = f"{type(exception).__name__}: {exception}"
            self.run.mark_failed(status, None if interrupted else error[:500], wall_time_s=round(self.elapsed(), 2))


class ValidateLastEpoch(L.Callback):
    """The last epoch is validated whatever ``trainer.val_every`` says. Lightning validates only the epochs that
    are multiples of it: epochs=267 with val_every=27 validated last at 243, so best.ckpt, the summary and
    the test figure never saw the final 24 epochs (the end of a cosine schedule, where the figures settle)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.max_epochs and trainer.current_epoch == trainer.max_epochs - 1:
            trainer.check_val_every_n_epoch = 1


class GracefulStop(L.Callback):
    """Ctrl-C or SIGTERM (a scheduler's notice, ``timeout``, ``docker stop``) stops training between two batches.

    A KeyboardInterrupt raised wherever the signal lands can cut an optimizer step in half, and a
    checkpoint written then resumes into a different run. So the first signal only asks: the run
    stops once the batch in hand is done (a signal during validation: once the epoch is), last.ckpt
    holds exactly that point, and ``--resume`` continues from the next batch as if never stopped. A
    second Ctrl-C, later than a second after the first, stops at once and writes nothing (the last
    checkpoint written stands); within that second it is the same request, as when a terminal's
    Ctrl-C reaches a sweep and its runs together and the sweep passes it on.

    The stop itself is Lightning's: its SIGTERM flag, checked where a batch or an epoch is complete.
    Under DDP process 0 decides and every process learns it at the same batch's end (a broadcast), so all
    stop there together and write one last.ckpt; the others ignore a signal of their own (a terminal's
    Ctrl-C reaches them all). Lightning's own SIGTERM handler broadcast from inside the signal handler,
    wherever process 0 happened to be, and the processes waited on each other for ever.
    """

    SECOND_SIGNAL_AFTER_S = 1.0

    def __init__(self) -> None:
        self.requested: str | None = None
        self._asked_at = 0.0
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._ask if trainer.is_global_zero else signal.SIG_IGN)

    def _ask(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.requested is None:
            self.requested, self._asked_at = signal.Signals(signum).name, now
            key = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            print(
                f"\n{key}: stopping after this batch and writing last.ckpt (Ctrl-C again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
        elif signum == signal.SIGINT and now - self._asked_at > self.SECOND_SIGNAL_AFTER_S:
            self._restore()
            raise KeyboardInterrupt

    def ask(self, name: str) -> None:
        """A stop asked for without a signal (``name``: the one it stands for): after the batch in hand, silently."""
        if self.requested is None:
            self.requested, self._asked_at = name, time.monotonic()

    def _flag(self, trainer: L.Trainer) -> None:
        connector = getattr(trainer, "_signal_connector", None)
        asked = self.requested is not None
        if trainer.world_size > 1:  # collective: every process calls it at the same point
            asked = bool(trainer.strategy.broadcast(asked, src=0))
        if asked and connector is not None:
            connector.received_sigterm = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning stops after a batch when the flag is up, except after the epoch's last (validation
        # comes next, and it would stop in its middle): that one is left to the epoch's end.
        if batch_idx + 1 < trainer.num_training_batches:
            self._flag(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flag(trainer)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
