"""The sink interface: consume writes in stream order, commit on Finish, or abort and leave nothing."""

from __future__ import annotations

from abc import ABC, abstractmethod

from pipeline.aqueue import ClosableQueue
from pipeline.messages import Finish, Writes
from pipeline.settings import Settings


class Sink(ABC):
    def __init__(self, spec: str, settings: Settings) -> None:
        self.spec = spec
        self.settings = settings
        self.written = 0
        self.committed = False
        # A package's outputs are written first and committed together once the whole package has
        # been read and verified (its manifest): run() then stops short of the commit, see commit().
        self.deferred = False

    # Whether run() can stop short of the commit (a file or an object can wait unnamed; a pipe cannot).
    can_defer = True

    async def open(self, reserve: int) -> None:
        """Prepare; `reserve` bytes at offset 0 (the qcow2 header cluster) are written at Finish."""
        self.reserve = reserve

    @abstractmethod
    async def run(self, inq: ClosableQueue[Writes | Finish]) -> None:
        """Write everything from `inq`; on Finish write the head at 0 and commit atomically."""

    async def commit(self) -> None:
        """Commit a deferred sink whose run() has ended."""
        raise NotImplementedError(f"{type(self).__name__} cannot defer its commit")

    @abstractmethod
    async def abort(self) -> None:
        """Remove every trace of this job's output. Must be safe to call at any point, twice."""
