"""Batches of an image folder without its broken samples: collate, count, refuse past a limit.

A broken image (unreadable, truncated) comes out of
:class:`codeq_cli.data.folders.ImageFolder` as a :class:`~codeq_cli.data.folders.Broken`
sentinel. :func:`collate` drops it from the batch and lists it on the batch
(``batch.broken``); :func:`track` counts it in the main process and raises
:class:`~codeq_cli.errors.DataError` once more than ``max_broken`` (10%) of a
pass is broken. :func:`build_loader` puts these together around a
:class:`~torch.utils.data.DataLoader`. See ``docs/data.md``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data._utils.collate import default_collate

from codeq_cli.data.folders import MAX_BROKEN, Broken, FolderStats, ImageFolder
from codeq_cli.errors import DataError, UsageError

_EARLY_CHECK = 500  # samples seen before the running share alone can fail a pass


class Batch(list):
    """``[images, targets]`` plus ``broken`` (``[(path, reason)]``) and ``size`` (samples asked for).

    A list, so ``images, targets = batch`` works; it pins itself, so the
    extra fields survive ``pin_memory=True``.
    """

    broken: list[tuple[str, str]]
    size: int

    def pin_memory(self) -> Batch:
        out = Batch([t.pin_memory() if isinstance(t, torch.Tensor) else t for t in self])
        out.broken, out.size = self.broken, self.size
        return out


def collate(samples: list) -> Batch:
    """``default_collate`` of the readable samples; broken ones are listed on the batch.

    When every sample is broken the images and targets are empty tensors
    (``images.numel() == 0``): skip such a batch.
    """
    good = [s for s in samples if not isinstance(s, Broken)]
    broken = [(s.path, s.reason) for s in samples if isinstance(s, Broken)]
    if good:
        images, targets = default_collate(good)
    else:
        images, targets = torch.empty(0), torch.empty(0, dtype=torch.long)
    batch = Batch([images, targets])
    batch.broken, batch.size = broken, len(samples)
    return batch


def track(
    batches: Iterable,
    stats: FolderStats,
    *,
    total: int | None = None,
    max_broken: float = MAX_BROKEN,
) -> Iterator:
    """Pass ``batches`` through, counting broken samples into ``stats`` (main process).

    Raises :class:`DataError` when more than ``max_broken`` of the pass is
    broken: as soon as the broken count exceeds that share of ``total`` (the
    samples this pass will deliver; estimated from the first batch when not
    given), or of the samples seen once at least 500 were.
    """
    seen = bad = 0
    for batch in batches:
        broken = getattr(batch, "broken", ())
        size = getattr(batch, "size", None)
        n = len(batch[1]) + len(broken) if size is None else size
        if total is None and hasattr(batches, "__len__"):
            total = len(batches) * n  # type: ignore[arg-type]
        seen += n
        bad += len(broken)
        stats.loaded += n - len(broken)
        stats.skipped += len(broken)
        for path, why in broken:
            stats.broken.setdefault(path, why)
        if bad and (bad > max_broken * (total or seen) or (seen >= _EARLY_CHECK and bad > max_broken * seen)):
            path, why = broken[0] if broken else next(iter(stats.broken.items()))
            raise DataError(
                f"{bad} of the {seen} {stats.split} images read so far are unreadable "
                f"({100 * bad / seen:.0f}%, over the {100 * max_broken:.0f}% limit), e.g. {path}: {why}",
                hint="fix or remove the broken files",
            )
        yield batch


class Loader:
    """A :class:`~torch.utils.data.DataLoader` whose batches drop and count broken images (see :func:`build_loader`)."""

    def __init__(self, loader: DataLoader, dataset: ImageFolder, max_broken: float):
        self.loader, self.dataset, self.max_broken = loader, dataset, float(max_broken)

    def __len__(self) -> int:
        return len(self.loader)

    def samples(self) -> int:
        """How many samples one pass delivers (broken ones included)."""
        batches = self.loader.batch_sampler
        if hasattr(batches, "local"):  # GlobalBatchSampler: this rank's share of each global batch
            return len(batches) * batches.local
        n = len(self.loader.sampler)
        return n - n % self.loader.batch_size if self.loader.drop_last else n

    def __iter__(self) -> Iterator:
        return track(self.loader, self.dataset.stats, total=self.samples(), max_broken=self.max_broken)


MAX_DEFAULT_WORKERS = 4


def default_workers() -> int:
    """Loading processes when ``--workers`` is not given: the CPUs this process may use, at most 4.

    More workers than CPUs only make them compete (PyTorch warns about it).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cpus))


def build_loader(
    ds: ImageFolder,
    batch_size: int = 1,
    *,
    sampler: Sampler | None = None,
    batch_sampler: Sampler | None = None,
    drop_last: bool = False,
    workers: int = 0,
    pin_memory: bool = False,
    seed: int = 0,
    max_broken: float = MAX_BROKEN,
) -> Loader:
    """Batches of ``ds`` with broken images dropped and counted, in one of two orders.

    Training: ``batch_sampler`` is a :class:`~codeq_cli.data.sampling.GlobalBatchSampler`,
    whose order and per-sample augmentation seeds are a pure function of
    ``(seed, epoch)`` (call its ``set_epoch``); workers then hold no state that
    matters and persist across epochs. Evaluation: ``batch_size`` batches in
    file order, or in ``sampler``'s (a :class:`~codeq_cli.data.sampling.ShardSampler`
    for this rank's share). ``seed`` seeds the loader's own generator, so it
    never draws from the global RNG.
    """
    if batch_size < 1:
        raise UsageError(f"batch size {batch_size} must be at least 1")
    if workers < 0:
        raise UsageError(f"--workers {workers} must be 0 or more")
    batching = {"batch_sampler": batch_sampler} if batch_sampler is not None else {
        "batch_size": batch_size, "sampler": sampler, "drop_last": drop_last}
    loader = DataLoader(
        ds,
        **batching,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(int(seed)),
        persistent_workers=batch_sampler is not None and workers > 0,
    )
    return Loader(loader, ds, max_broken)
