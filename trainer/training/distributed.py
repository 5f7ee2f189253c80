"""Several processes training one LoRA (``torchrun``): who this process is, its share of each batch, and the
collectives that keep every rank on the single-process run.

A run with N ranks and ``train.batch_size`` b trains what one process with batch N·b trains:

- **Batches.** Every rank runs the same batch sampler with the global batch size N·b (same seed, so the same global
  batches in the single-process order) and trains its contiguous share of each (``World.rows``); a global batch
  smaller than N·b (a bucket's tail) is split as evenly as it goes, and a rank whose share is empty computes nothing
  that step. Every sample is seen once per epoch across the ranks.
- **Random numbers.** Every rank draws the whole global batch's σ, noise, caption dropout and training-mode draws
  from the shared, replicated generator and keeps its rows, so sample i gets the numbers it gets in one process.
- **Losses.** A rank's loss is the sum over its samples divided by the global batch size; the ranks' gradients are
  summed (``sum_gradients``), so the gradient is the single-process batch mean. The scalars the balancer, the
  non-finite check and the metrics read are summed over the ranks (``sum_values``) before they are used.
- **Adapter gradients only.** Gradients are summed once per optimizer step, after the last micro-batch, over the
  adapter parameters (the frozen base is never communicated): what ``DistributedDataParallel`` does under
  ``no_sync()`` followed by one synchronised backward. DDP itself is not used because its reducer needs every
  backward to follow a forward through the wrapped module, the same parameters used on every rank, and a forward
  on every rank: our steps have a varying number of backwards (accumulation, the preservation terms), audio-free
  batches leave the audio adapters without gradients, and a rank with an empty share has nothing to run.
- **Stops.** ``StopRequest.should_stop`` asks every rank (``stop_reason``); all stop after the same step. A rank
  that dies makes the others' next collective fail (``PeerFailure``); rank 0 then saves the last completed step.

Only rank 0 writes files. The trainer's state is identical on every rank (weights, optimizer, sampler, generator,
balancer, monitor), so rank 0's state resumes a run with any number of ranks whose global batch is the same.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch

from ..config import ConfigError

# Gradients are summed in buckets of at most this many elements (DistributedDataParallel's default bucket is
# 25 MiB): large enough to keep the number of collectives small, small enough not to double the gradient memory.
BUCKET_ELEMENTS = 25 * 2**20 // 4
# Stop reasons as numbers, so that one collective (a max) tells every rank the reason of the stop.
_STOP_CODES = {"SIGINT": 1, "SIGTERM": 2}
_OTHER_STOP = "a stop on another rank"


class PeerFailure(RuntimeError):
    """Another rank stopped answering (it failed or was killed): this rank stops too."""


class World:
    """This process' place among the ranks of a run; ``World()`` is the single process (no collective runs)."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, device: torch.device | None = None):
        self.rank = rank
        self.size = size
        self.local_rank = local_rank
        self.device = device or torch.device("cpu")  # where the collectives' tensors live (CUDA for NCCL)
        self.comm_seconds = 0.0  # time spent in collectives since the start (the bench reports its share)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes files and prints."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, device={self.device})"

    # ---- this rank's share ------------------------------------------------------------------------

    def rows(self, total: int) -> slice:
        """This rank's contiguous rows of a global batch of ``total`` samples: the ranks' shares differ by at most
        one, the first ranks get the larger ones, and a share may be empty when ``total`` < ranks."""
        share, extra = divmod(total, self.size)
        start = self.rank * share + min(self.rank, extra)
        return slice(start, start + share + (1 if self.rank < extra else 0))

    # ---- collectives --------------------------------------------------------------------------------

    def sum_values(self, values: dict[str, float | None]) -> dict[str, float | None]:
        """Each named value summed over the ranks; None where no rank has it (a term this batch does not have, or
        a rank with an empty share). Non-finite values stay non-finite, so every rank skips the same steps."""
        if not self.distributed:
            return dict(values)
        names = list(values)
        local = [[0.0 if values[n] is None else float(values[n]) for n in names],
                 [0.0 if values[n] is None else 1.0 for n in names]]
        total = self._all_reduce(torch.tensor(local, dtype=torch.float64, device=self.device))
        return {n: float(total[0, i]) if total[1, i] > 0 else None for i, n in enumerate(names)}

    def sum_gradients(self, parameters: list[torch.Tensor]) -> None:
        """Sum the parameters' gradients over the ranks, in place. A parameter without a gradient on every rank
        keeps none (the optimizer then leaves it alone, as in one process); one with a gradient on some rank gets
        the sum (zero where a rank had none)."""
        if not self.distributed or not parameters:
            return
        present = self._all_reduce(torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32,
                                                device=self.device))
        summed = [p for p, n in zip(parameters, present.tolist()) if n > 0]
        for p in summed:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets(summed):
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            flat = self._all_reduce(flat)
            offset = 0
            for p in bucket:
                count = p.grad.numel()
                p.grad.copy_(flat[offset: offset + count].view_as(p.grad))
                offset += count

    def stop_reason(self, local: str | None) -> str | None:
        """Whether any rank was asked to stop, and why (a signal's name when one was; SIGTERM wins over SIGINT)."""
        if not self.distributed:
            return local
        code = 0 if local is None else _STOP_CODES.get(local, 3)
        agreed = int(self._all_reduce(torch.tensor([code], dtype=torch.int64, device=self.device),
                                      torch.distributed.ReduceOp.MAX)[0])
        if agreed == 0:
            return None
        if local is not None:
            return local
        return next((name for name, c in _STOP_CODES.items() if c == agreed), _OTHER_STOP)

    def require_same(self, what: str, value: int, hint: str) -> None:
        """Fail on every rank, naming ``what``, unless every rank holds the same ``value``."""
        if not self.distributed:
            return
        mine = torch.tensor([value], dtype=torch.int64, device=self.device)
        low = self._all_reduce(mine.clone(), torch.distributed.ReduceOp.MIN)
        high = self._all_reduce(mine.clone(), torch.distributed.ReduceOp.MAX)
        if int(low[0]) != int(high[0]):
            raise ConfigError(f"the {self.size} ranks do not agree on {what} (this rank, {self.rank}: {value}); {hint}")

    def barrier(self) -> None:
        if self.distributed:
            self._collective(torch.distributed.barrier)

    def _all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        self._collective(lambda: torch.distributed.all_reduce(tensor, op=op or torch.distributed.ReduceOp.SUM))
        return tensor

    def _collective(self, call) -> None:
        started = time.perf_counter()
        try:
            call()
        except RuntimeError as exc:  # gloo and NCCL raise RuntimeError (DistBackendError) when a peer is gone
            raise PeerFailure(f"rank {self.rank} of {self.size}: another rank stopped answering ({_first_line(exc)}); "
                              "this rank stops too, rank 0 keeping the last completed step: run the same command again "
                              "to resume") from exc
        finally:
            self.comm_seconds += time.perf_counter() - started

    def close(self) -> None:
        """Leave the process group (the end of a run under torchrun)."""
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _buckets(parameters: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive parameters of one dtype and device, at most ``BUCKET_ELEMENTS`` elements per bucket (a larger
    parameter is a bucket of its own)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for p in parameters:
        last = buckets[-1] if buckets else None
        if last is None or size + p.numel() > BUCKET_ELEMENTS or (last[0].dtype, last[0].device) != (p.dtype, p.device):
            buckets.append([p])
            size = p.numel()
        else:
            last.append(p)
            size += p.numel()
    return buckets


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---- starting under torchrun --------------------------------------------------------------------------


def launched_ranks() -> int:
    """How many ranks the launcher (torchrun) started; 1 for a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def join_from_environment(device_setting: str, timeout_minutes: float = 30.0) -> World:
    """This process' ``World``: the single process, or, under torchrun with several ranks, a member of the process
    group torchrun describes in the environment (NCCL on CUDA, gloo on the CPU), on ``cuda:LOCAL_RANK`` when
    training on CUDA."""
    size = launched_ranks()
    if size <= 1:
        return World()
    rank, local_rank = launched_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(device_setting, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(minutes=timeout_minutes),
                                         device_id=device if device.type == "cuda" else None)
    return World(rank, size, local_rank, device)


def rank_device(setting: str, local_rank: int) -> torch.device:
    """The device of one rank: ``auto`` / ``cuda`` → ``cuda:LOCAL_RANK`` (when CUDA is there), ``cpu`` → the CPU."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(f"train.device = {setting!r} names one GPU, but under torchrun every rank takes its own "
                              "(cuda:LOCAL_RANK): set train.device = \"auto\" or \"cuda\"")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"rank with LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible): start "
                              "at most one process per GPU (torchrun --nproc_per_node)")
        return torch.device("cuda", local_rank)
    if device.type != "cpu":
        raise ConfigError(f"train.device = {setting!r}: under torchrun train on cuda (NCCL) or cpu (gloo)")
    return device


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The seed of torch's global RNG for one optimizer step of one rank, in a run with several ranks: the adapter
    dropout masks (``network.dropout``, ``rank_dropout``, ``module_dropout``) differ between ranks and are the same
    again after a resume with any number of ranks, with nothing to save."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + 17) % (2**63)
