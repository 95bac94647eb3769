"""The tensor store's streaming RPCs on the event loop: PutTensors reads chunks (each
copied into its tensor in a worker when large), GetTensors writes them (when large,
each made in a worker while the one before is written). Admission,
idle streams and shutdown work as for DifferentiateStream (server.calls)."""

from __future__ import annotations

import asyncio
import time

import grpc
from google.protobuf.message import DecodeError

from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1.chunks import CHUNK_BYTES, write_chunks

from .calls import _code, peer_host
from .errors import BadRequest, abort
from .store import Upload

# Chunks smaller than this are copied on the event loop: a hop to a worker and back
# costs more (~100 us) than copying them.
INLINE_CHUNK_BYTES = 1 << 16


async def put_tensors(servicer, requests, context) -> bytes:
    """PutTensors: the chunks into a new handle; PutTensorsResponse bytes."""
    started, calls = time.perf_counter(), servicer.calls
    upload = Upload(servicer.store, peer_host(context.peer()),
                    servicer.limits.max_tensor_elements)
    try:
        while True:
            data = await calls.next_message(context)
            if data is grpc.aio.EOF:
                break
            calls.admit()
            try:
                if len(data) < INLINE_CHUNK_BYTES:
                    upload.add(data)
                else:
                    await calls.in_worker(upload.add, data)
            finally:
                calls.done()
        entry = upload.finish()
    except asyncio.CancelledError:
        upload.abort()
        raise
    except Exception as exc:  # noqa: BLE001 - every error becomes a status
        upload.abort()
        servicer.telemetry.record("PutTensors", _code(exc), started)
        await abort(context, exc)
    servicer.telemetry.record("PutTensors", "OK", started)
    return pb.PutTensorsResponse(handle=entry.handle, nbytes=entry.nbytes).SerializeToString()


async def get_tensors(servicer, data, context) -> None:
    """GetTensors: the handle's tensors, chunk after chunk."""
    started, calls = time.perf_counter(), servicer.calls
    try:
        try:
            request = pb.GetTensorsRequest.FromString(data)
        except DecodeError as err:
            raise BadRequest(f"the request bytes are not a valid GetTensorsRequest: {err}") \
                from None
        entry = servicer.store.entry(request.handle, "handle")
        tensors = entry.tensors
        names = list(request.names) or list(tensors)
        for i, name in enumerate(names):
            if name not in tensors:
                raise BadRequest(f"the handle holds no tensor '{name[:200]}'",
                                 field=f"names[{i}]")
        limits = servicer.limits
        chunk = limits.store_chunk_bytes or CHUNK_BYTES
        if limits.max_message_bytes:
            chunk = max(1024, min(chunk, limits.max_message_bytes // 2))
        pieces = write_chunks(tensors, names, chunk)
        if sum(tensors[n].nbytes for n in names) > INLINE_CHUNK_BYTES:
            await _write_ahead(calls, pieces, context)
        else:
            for message in pieces:
                await context.write(message)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - every error becomes a status
        servicer.telemetry.record("GetTensors", _code(exc), started)
        await abort(context, exc)
    servicer.telemetry.record("GetTensors", "OK", started)


async def _write_ahead(calls, pieces, context) -> None:
    """Write the messages of `pieces`, each made in a worker while the one before it is
    being written (not after: a loaded machine's thread hand-offs then add up per chunk);
    two messages at most exist at a time."""
    upcoming = asyncio.ensure_future(calls.in_worker(next, pieces, None))
    try:
        while True:
            message = await upcoming
            if message is None:
                return
            upcoming = asyncio.ensure_future(calls.in_worker(next, pieces, None))
            await context.write(message)
    finally:
        if not upcoming.done():
            upcoming.cancel()
        elif not upcoming.cancelled():
            upcoming.exception()  # retrieved: a write's error is the one reported
