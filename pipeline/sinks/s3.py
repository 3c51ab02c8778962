"""S3 output in one pass: a multipart upload whose part 1 (header + first bytes) is uploaded last.

S3 assembles an object in part-number order whatever the upload order, so part 1 is held in memory
until the qcow2 header is known, while parts 2..N stream out concurrently. Memory: part 1 plus at
most `upload_memory` of part buffers (the one being filled included).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from pipeline import log
from pipeline.aqueue import ClosableQueue
from pipeline.errors import ImgpipeError, SinkError
from pipeline.messages import Finish, Writes
from pipeline.s3util import S3Context, describe, error_code, parse_s3_url
from pipeline.settings import S3_MAX_PART, S3_MAX_PARTS, S3_MIN_PART, MiB, Settings
from pipeline.sinks.base import Sink
from pipeline.sinks.partbody import PartBody

GROWTH_EVERY = 500  # unknown output size: the part size doubles every 500 parts ...
GROWTH_CAP = 128 * MiB  # ... up to this, so 10,000 parts hold 1.03 TiB
_ZEROS = bytes(MiB)


def part_size_policy(base: int, size_hint: int | None) -> tuple[int, bool]:
    """(part size, grows?) that fits `size_hint` bytes in 10,000 parts, or grows when size is unknown.

    A known size gets one fixed part size (the smallest that fits, never below `base`), so memory is
    predictable; an unknown one starts at `base` and doubles every GROWTH_EVERY parts up to GROWTH_CAP.
    """
    if size_hint is not None:
        need = math.ceil(size_hint / (S3_MAX_PARTS - 1))
        size = max(base, math.ceil(need / MiB) * MiB)
        return min(size, S3_MAX_PART), False
    return base, True


def part_size_for(number: int, base: int, grows: bool) -> int:
    if not grows:
        return base
    return min(base << ((number - 1) // GROWTH_EVERY), max(base, GROWTH_CAP))


class S3Sink(Sink):
    def __init__(self, spec: str, settings: Settings, s3: S3Context, size_hint: int | None) -> None:
        super().__init__(spec, settings)
        self.loc = parse_s3_url(spec)
        self.s3 = s3
        self.base, self.grows = part_size_policy(settings.part_size, size_hint)
        self.upload_id: str | None = None
        self._complete_sent = False  # a CompleteMultipartUpload went out (it may have worked unseen)
        self.parts: dict[int, str] = {}
        self.part_log: list[int] = []  # part numbers in the order their uploads finished
        self._part1 = PartBody()
        self._cur = PartBody()
        self._cur_len = 0
        self._cur_number = 1
        self._slot_count = max(1, settings.upload_memory // self.base)
        self._slots = asyncio.Semaphore(self._slot_count)
        self._held: dict[int, int] = {}  # id(buffer) -> slots it holds
        self.expected_size = -1
        self._inflight = asyncio.Semaphore(settings.upload_concurrency)
        self._free: list[PartBody] = []
        self._uploads: asyncio.TaskGroup | None = None
        self._log = log.get(stage="sink", destination=spec)
        # Set by a caller before open (the worker): Metadata for the object, and the condition
        # (IfNoneMatch="*" or IfMatch=ETag) on the request that commits it, so racing writers of one
        # key cannot both win.
        self.create_args: dict[str, Any] = {}
        self.commit_args: dict[str, Any] = {}
        # Called with (client, upload id) once the multipart upload exists; may raise to give way.
        self.on_upload_created: Callable[[Any, str], Awaitable[None]] | None = None

    async def open(self, reserve: int) -> None:
        await super().open(reserve)
        # Part 1 starts with the reserved header space; it is patched and sent at the very end.
        self._part1 = PartBody(max(self.base, S3_MIN_PART))
        self._cur = self._part1
        self._cur_len = reserve

    async def run(self, inq: ClosableQueue[Writes | Finish]) -> None:
        finished = False
        async with asyncio.TaskGroup() as tg:
            self._uploads = tg
            async for item in inq:
                if isinstance(item, Finish):
                    await self._finish_uploads(item)
                    finished = True
                    break
                for piece in item.items:
                    if isinstance(piece, int):
                        await self._append_zeros(piece)
                    else:
                        await self._append(memoryview(piece).cast("B"))
                item.release()
        self._uploads = None
        if not finished:
            raise SinkError(f"{self.spec}: the output stream ended without its end marker")
        if not self.deferred:
            await self._complete()
        else:
            self._free.clear()  # a package's later outputs must not find this one's part buffers held

    async def commit(self) -> None:
        await self._complete()

    async def _append(self, mv: memoryview) -> None:
        while mv:
            room = len(self._cur) - self._cur_len
            take = min(room, len(mv))
            self._cur[self._cur_len : self._cur_len + take] = mv[:take]
            self._cur_len += take
            mv = mv[take:]
            if self._cur_len == len(self._cur):
                await self._rotate()

    async def _append_zeros(self, n: int) -> None:
        zeros = memoryview(_ZEROS)
        while n:
            take = min(n, len(_ZEROS))
            await self._append(zeros[:take])
            n -= take

    async def _rotate(self) -> None:
        """The current buffer is full: hold it (part 1) or send it, then start the next part."""
        if self._cur is not self._part1:
            await self._start_upload(self._cur_number, self._cur, self._cur_len, release=True)
        self._cur_number += 1
        if self._cur_number > S3_MAX_PARTS:
            raise SinkError(f"{self.spec}: output needs more than 10,000 parts; raise --part-size")
        size = part_size_for(self._cur_number, self.base, self.grows)
        # A grown part holds as many slots as it is bases long, so upload_memory stays the bound.
        need = min(self._slot_count, -(-size // self.base))
        for _ in range(need):
            await self._slots.acquire()
        buf = self._free.pop() if self._free and len(self._free[-1]) == size else None
        self._cur = buf if buf is not None else PartBody(size)
        self._held[id(self._cur)] = need
        self._cur_len = 0

    async def _ensure_upload(self) -> str:
        if self.upload_id is None:
            client = await self.s3.client()
            try:
                resp = await client.create_multipart_upload(
                    Bucket=self.loc.bucket,
                    Key=self.loc.key,
                    ContentType="application/octet-stream",
                    **self.create_args,
                )
            except (ClientError, BotoCoreError) as exc:
                raise describe(exc, self.spec, SinkError) from None
            self.upload_id = str(resp["UploadId"])
            self._log.debug("multipart upload started", upload_id=self.upload_id)
            if self.on_upload_created is not None:
                await self.on_upload_created(client, self.upload_id)
        return self.upload_id

    async def _start_upload(self, number: int, buf: PartBody, length: int, release: bool) -> None:
        await self._ensure_upload()
        await self._inflight.acquire()
        assert self._uploads is not None
        self._uploads.create_task(self._upload(number, buf, length, release))

    async def _upload(self, number: int, buf: PartBody, length: int, release: bool) -> None:
        client = await self.s3.client()
        # The last part is short: a copy of its bytes, once per upload.
        body: bytes | PartBody = buf if length == len(buf) else bytes(memoryview(buf)[:length])
        try:
            # botocore retries 5xx, SlowDown and dropped connections (standard retry mode).
            resp = await client.upload_part(
                Bucket=self.loc.bucket,
                Key=self.loc.key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=body,
            )
        except (ClientError, BotoCoreError) as exc:
            raise describe(exc, f"{self.spec} part {number}", SinkError) from None
        finally:
            self._inflight.release()
        self.parts[number] = str(resp["ETag"])
        self.part_log.append(number)
        if release:
            self._free.append(buf)
            for _ in range(self._held.pop(id(buf), 1)):
                self._slots.release()

    async def _finish_uploads(self, fin: Finish) -> None:
        self._part1[: len(fin.head)] = fin.head
        self.expected_size = fin.output_size
        if self._cur is self._part1:
            return  # everything fits in one part: a single PUT in _complete
        if self._cur_len:
            await self._start_upload(self._cur_number, self._cur, self._cur_len, release=True)
        # Part 1 last: it carries the header, known only now. It is full, so >= 5 MiB.
        await self._start_upload(1, self._part1, len(self._part1), release=False)

    async def _complete(self) -> None:
        client = await self.s3.client()
        where = self.spec
        try:
            if self.upload_id is None:
                body = bytes(memoryview(self._part1)[: self._cur_len])
                await client.put_object(
                    Bucket=self.loc.bucket,
                    Key=self.loc.key,
                    Body=body,
                    ContentType="application/octet-stream",
                    **self.create_args,
                    **self.commit_args,
                )
            else:
                # Ascending part order whatever the upload order: AWS answers InvalidPartOrder otherwise,
                # moto assembles in list order and Ceph sorts, so neither would catch the mistake.
                parts = [{"PartNumber": n, "ETag": self.parts[n]} for n in sorted(self.parts)]
                self._complete_sent = True
                resp = await client.complete_multipart_upload(
                    Bucket=self.loc.bucket,
                    Key=self.loc.key,
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": parts},
                    **self.commit_args,
                )
                # botocore turns a 200 carrying <Error> into an exception, so this is a success. Its ETag
                # is not checked: Ceph RGW 16.2 answers <ETag></ETag>. The HEAD below is the check.
                self.upload_id = None
                self._log.debug("multipart upload completed", parts=len(parts), etag=resp.get("ETag"))
            self.committed = True
            head = await client.head_object(Bucket=self.loc.bucket, Key=self.loc.key)
        except ImgpipeError:
            raise
        except (ClientError, BotoCoreError) as exc:
            raise describe(exc, where, SinkError) from None
        if int(head["ContentLength"]) != self.expected_size:
            raise SinkError(
                f"{where}: stored object has {head['ContentLength']} bytes, expected {self.expected_size}"
            )
        self.written = self.expected_size

    async def abort(self) -> None:
        client = await self.s3.client()
        if self.upload_id is not None:
            upload_id, self.upload_id = self.upload_id, None
            try:
                await client.abort_multipart_upload(
                    Bucket=self.loc.bucket, Key=self.loc.key, UploadId=upload_id
                )
                self._log.info("multipart upload aborted", upload_id=upload_id)
            except ClientError as exc:
                if self._complete_sent and error_code(exc)[0] == "NoSuchUpload":
                    # The CompleteMultipartUpload whose answer was lost did complete: the object exists
                    # but was never verified, so it goes like any other unverified object.
                    self.committed = True
                else:
                    self._log.warning("could not abort multipart upload", upload_id=upload_id, error=str(exc))
            except BotoCoreError as exc:
                self._log.warning("could not abort multipart upload", upload_id=upload_id, error=str(exc))
        if self.committed:
            # Completed but failed verification: an unverified object must not stay.
            try:
                await client.delete_object(Bucket=self.loc.bucket, Key=self.loc.key)
                self._log.info("unverified object deleted")
            except (ClientError, BotoCoreError) as exc:
                self._log.warning("could not delete unverified object", error=str(exc))
            self.committed = False
