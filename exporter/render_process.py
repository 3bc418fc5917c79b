"""The per-import families kept and rendered in a child process.

A scrape's work on the per-import lines is in proportion to the polls since
the last one (each changed import's lines rendered again and moved in their
chunks, the chunks that changed joined and compressed again): on the event
loop, at 100,000 imports under polling, about a fifth of the loop's time
while scrapes come back to back, taken from polling. Here the event loop
only reads each changed import's record into plain values
(:func:`~exporter.exposition.inputs_of`, a few times cheaper than
rendering it) and sends them down a pipe; a child process keeps the lines
(:class:`~exporter.exposition.KeptLines`, the same code as in-process
rendering) on the other core, and answers a render with the body's
per-import part, gzipped as a raw deflate stream that joins the registry's
families under one gzip header.

The wire, both ways through the child's standard input and output:

- to the child, frames of a 4-byte length and a pickle: ``("updates",
  [update, ...])`` or ``("render", encoder, content_type, names, gzipped,
  now)``, in the order they must apply; the child reads them as they come
  (a reader thread), so once its interpreter has started a writer waits
  for the pipe only as long as a copy (start-up writes every import with
  blocking writes, before the event loop takes the pipes over);
- from the child, one answer to each render: its length, CRC-32 and
  uncompressed size (:data:`ANSWER`), then its bytes.

A child that exits, or a pipe that breaks, fails the render it was part of
(``/metrics`` answers 500: Prometheus's ``up`` says it) and is logged; the
next refresh starts a new child and sends it every import. One that cannot
be started or fed at start-up stops the start-up with that error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import IO, Any, Final

from isal import isal_zlib

from exporter.exposition import (
    Encoder,
    GzipMember,
    KeptLines,
    Update,
    gzip_member,
    pack,
    return_large_buffers_to_the_os,
    update_of,
    updates_of,
)
from exporter.loop_slices import LoopSlices
from exporter.state import ImportKey, StateStore

log = logging.getLogger(__name__)

FRAME: Final = struct.Struct("<I")
"""A frame's length, before its pickle."""
ANSWER: Final = struct.Struct("<QII")
"""A render's answer: its length, CRC-32 and uncompressed size (0 and 0
for a body not gzipped), before its bytes."""
UPDATES_PER_FRAME = 2048
"""Updates in one frame of the start-up's hand-over (:meth:`RenderProcess.take_changes`,
before the loop runs): about 200 KB, 1 ms to pickle."""
REFRESH_FRAME = 128
"""Updates in one frame of a refresh, read and pickled between two looks at
the clock: a step of the loop is its slice and one frame's work at most.
Read until the slice ran out, then pickled, steps took 1.6-2.1 ms of CPU
for a 1 ms slice (``bench/scale.py`` at 10,000 imports, scraped)."""
READ_LIMIT = 4 * 1024 * 1024
"""The answer's reader buffer before it stops reading: a gzipped body at
100,000 imports is about 10 MB."""
READ_PART = 1024 * 1024
"""An answer is taken out of the reader's buffer this much at a time."""
NICENESS = 5
"""The child's niceness above its parent's: given a quarter of a core the
parent needs (CFS weights 335 against 1,024), and all of an idle one."""
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class RenderProcessError(Exception):
    """The render process exited or its pipe broke: the render failed."""


class RenderProcess:
    """:class:`~exporter.exposition.ImportFamilies` kept in a child process,
    fed the changed imports of ``state``. This object must be the only one
    taking the state's unrendered imports; renders come one at a time
    (``/metrics`` sees to it)."""

    def __init__(self, state: StateStore) -> None:
        self.state = state
        self.command = [sys.executable, "-P", "-m", "exporter.render_process"]
        """The child's command line (``-P``: this package, from PYTHONPATH,
        not one in the working directory)."""
        self._child: subprocess.Popen[bytes] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.ReadTransport | None = None
        self._refreshing: asyncio.Lock | None = None
        self._closed = False
        self.starts = 0
        """Children started (more than one: one exited, or its pipe broke)."""

    # --- the child's life ---------------------------------------------------

    def start(self) -> None:
        """The child started, if none is running; a new one gets every
        import (as changed) with the next updates. Raises
        :class:`RenderProcessError` once closed, and OSError if it cannot
        be started."""
        if self._closed:
            raise RenderProcessError("the render process is closed")
        if self._child is not None:
            return
        environment = dict(os.environ)
        path = environment.get("PYTHONPATH")
        environment["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + path if path else "")
        self._child = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=environment,
        )
        if self.starts:
            self.state.unrendered_all()
        self.starts += 1

    async def _attached(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The running child's pipes on the event loop (attached the first
        time). Raises :class:`RenderProcessError` without a child: a render
        comes after a refresh, which starts one."""
        child = self._child
        if child is None:
            raise RenderProcessError("no render process: the refresh before the render failed")
        if self._reader is None or self._writer is None:
            assert child.stdin is not None
            assert child.stdout is not None
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=READ_LIMIT)
            try:
                self._reading, _ = await loop.connect_read_pipe(
                    lambda: asyncio.StreamReaderProtocol(reader), child.stdout
                )
                transport, protocol = await loop.connect_write_pipe(
                    lambda: asyncio.streams.FlowControlMixin(), child.stdin
                )
            except BaseException:  # cancelled, or the pipes closed: start afresh
                self._ended("could not be attached")
                raise
            self._reader = reader
            self._writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return self._reader, self._writer

    def _ended(self, why: str) -> RenderProcessError:
        """The child stopped (killed if it is still running) and its pipes
        closed: the error to raise."""
        code = self._stop_child()
        message = (
            f"the render process {why} (exit code {code}); a new one starts at the next scrape"
        )
        log.error(message)
        return RenderProcessError(message)

    def stop_now(self) -> None:
        """The child killed and its pipes closed, for good (what it keeps
        can be rendered again): a start-up that fails, or does not use what
        it restored."""
        self._closed = True
        self._stop_child()

    async def close(self) -> None:
        """:meth:`stop_now`, waiting for the child's exit in a worker thread."""
        self._closed = True
        child = self._child
        if child is not None:
            child.kill()
            await asyncio.to_thread(child.wait)
        self._stop_child()

    def _stop_child(self) -> int | None:
        """The child killed and reaped, its pipes closed, none kept: its exit code."""
        child, self._child = self._child, None
        code = _stopped(child, self._writer, self._reading)
        self._writer = self._reader = self._reading = None
        return code

    # --- updates --------------------------------------------------------------

    def take_changes(self, in_order: Iterable[ImportKey] = ()) -> None:
        """Every unrendered import sent now, in one piece (start-up: the
        child renders them while this process goes on); ``in_order`` as
        for :meth:`ImportLines.take_changes
        <exporter.exposition.ImportLines.take_changes>`."""
        self.start()
        batch: list[Update] = []
        for update in updates_of(self.state, in_order):
            batch.append(update)
            if len(batch) >= UPDATES_PER_FRAME:
                self._send_now(("updates", batch))
                batch = []
        if batch:
            self._send_now(("updates", batch))

    def _send_now(self, message: tuple[Any, ...]) -> None:
        """A frame written at once: through the event loop's pipe once it is
        attached (buffered there), else straight to the child."""
        frame = _frame(message)
        if self._writer is not None:
            self._writer.write(frame)
            return
        child = self._child
        assert child is not None
        assert child.stdin is not None
        try:
            child.stdin.write(frame)
            child.stdin.flush()
        except OSError:
            raise self._ended("stopped reading") from None

    async def refresh(self, slices: LoopSlices | None = None) -> None:
        """The imports changed since the last refresh sent to the child, in
        the order the state first marked them (see
        :meth:`ImportLines.refresh <exporter.exposition.ImportLines.refresh>`):
        each record read into plain values on the event loop, a slice at a
        time."""
        if slices is None:
            slices = LoopSlices()
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            self.start()
            _, writer = await self._attached()
            unrendered = self.state.take_unrendered()
            imports = self.state.imports
            changed_since = self.state.changed_since_taken
            keys = list(unrendered)
            done = 0
            try:
                while done < len(keys):
                    batch: list[Update] = []
                    while done < len(keys) and len(batch) < REFRESH_FRAME:
                        key = keys[done]
                        changed = unrendered[key] or changed_since(key)
                        batch.append(update_of(key, imports.get(key), changed))
                        done += 1
                    # Read and written with no wait between: frames go in the
                    # order their records were read.
                    writer.write(_frame(("updates", batch)))
                    if slices.due():
                        await slices.yield_now()
                await writer.drain()
            except (ConnectionError, OSError) as exc:
                raise self._ended(f"stopped reading ({exc})") from None
            finally:
                # Interrupted: what is not sent yet is for the next refresh.
                self.state.put_back_unrendered({key: unrendered[key] for key in keys[done:]})

    # --- renders --------------------------------------------------------------

    async def body(
        self,
        encoder: Encoder,
        content_type: str,
        names: frozenset[str] | None,
        gzipped: bool,
        then: Awaitable[bytes] | None = None,
        slices: LoopSlices | None = None,  # noqa: ARG002 (the loop only waits here)
    ) -> bytes:
        """The child's render of the families, then ``then``, gzipped (one
        gzip member) or not. ``slices`` is not used: the loop only waits."""
        reader, writer = await self._attached()
        request = ("render", encoder, content_type, names, gzipped, self.state.clock())
        try:
            writer.write(_frame(request))
            await writer.drain()
            length, crc, size = ANSWER.unpack(await reader.readexactly(ANSWER.size))
            # Read as it comes, joined once with the rest (not copied whole
            # out of the reader's buffer, then again into the body's).
            parts = []
            while length:
                part = await reader.read(min(length, READ_PART))
                if not part:
                    raise self._ended("exited")
                parts.append(part)
                length -= len(part)
        except asyncio.IncompleteReadError:
            raise self._ended("exited") from None
        except (ConnectionError, OSError) as exc:
            raise self._ended(f"stopped reading ({exc})") from None
        except asyncio.CancelledError:
            # Its answer, if it comes, would be read as the next one's.
            self._ended("was left mid-answer")
            raise
        registry = await then if then is not None else b""
        if not gzipped:
            return b"".join([*parts, registry])
        packed = pack(registry)
        crc = isal_zlib.crc32_combine(crc, packed.crc, packed.size)
        return gzip_member([*parts, packed.deflated], crc, size + packed.size)


def _stopped(
    child: subprocess.Popen[bytes] | None,
    writer: asyncio.StreamWriter | None,
    reading: asyncio.ReadTransport | None,
) -> int | None:
    """``child`` killed and reaped (a killed process exits at once), and its
    pipes closed, attached to the event loop or not: its exit code."""
    if writer is not None and not writer.transport.is_closing():
        writer.transport.abort()
    if reading is not None and not reading.is_closing():
        reading.close()
    if child is None:
        return None
    if child.poll() is None:
        child.kill()
    code = child.wait()
    for pipe in (child.stdin, child.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
    return code


def _frame(message: tuple[Any, ...]) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(data)) + data


# --- the child ------------------------------------------------------------------


def _read_frames(incoming: IO[bytes], frames: queue.SimpleQueue[bytes | None]) -> None:
    """Each frame's pickle as it comes, then None (the input closed)."""
    try:
        while len(head := incoming.read(FRAME.size)) == FRAME.size:
            (length,) = FRAME.unpack(head)
            data = incoming.read(length)
            if len(data) < length:
                break
            frames.put(data)
    finally:
        frames.put(None)


def serve(incoming: IO[bytes], outgoing: IO[bytes]) -> None:
    """The child's work: updates applied, renders answered, until the input closes."""
    frames: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    threading.Thread(target=_read_frames, args=(incoming, frames), daemon=True).start()
    kept = KeptLines()
    sources: dict[str, str] = {}
    while (data := frames.get()) is not None:
        message = pickle.loads(data)  # our own parent's frames, through our own pipe
        if message[0] == "updates":
            for (source, import_id), inputs, changed in message[1]:
                # One string per source, not one per import's key.
                kept.update((sources.setdefault(source, source), import_id), inputs, changed)
            continue
        _, encoder, content_type, names, gzipped, now = message
        for _ in kept.compact():
            pass
        part: bytes | memoryview
        if gzipped:
            member = GzipMember()
            for packed in kept.render_packed(encoder, content_type, names, now):
                member.add(packed)
            part, crc, size = member.deflated(), member.crc, member.size
        else:
            part, crc, size = b"".join(kept.render(encoder, content_type, names, now)), 0, 0
        outgoing.write(ANSWER.pack(len(part), crc, size))
        outgoing.write(part)
        outgoing.flush()


def main() -> None:
    # Ctrl-C reaches the whole process group: the parent stops, and closes
    # this one's input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Where the cores are busy, polling and the event loop's answers come
    # first; a scrape waits a little longer.
    os.nice(NICENESS)
    with contextlib.suppress(AttributeError, OSError):  # Linux's; elsewhere as it is
        # Woken by a frame, it does not preempt the event loop's process.
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    # Bodies of megabytes, made and dropped at each render: see the function.
    return_large_buffers_to_the_os()
    serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
