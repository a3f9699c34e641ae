"""Responses leave in one write (api.transport), over a real uvicorn server and sockets."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.transport import MAX_HELD, JoiningHttpToolsProtocol, JoiningTransport
from tests.integration.served_http import Counted, counting, served

# The streamed body, in chunks of CHUNK bytes, each of its own byte.
CHUNK = 10_000
BIG = bytes(n // CHUNK % 256 for n in range(3 * MAX_HELD + 17))


async def small(request: Request) -> JSONResponse:
    return JSONResponse({"sku": request.path_params["sku"], "available": 7})


async def streamed(request: Request) -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(BIG), CHUNK):
            yield BIG[start : start + CHUNK]

    return StreamingResponse(chunks(), media_type="application/octet-stream")


APP = Starlette(routes=[Route("/small/{sku}", small), Route("/big", streamed)])


def small_answers(url: str, count: int) -> None:
    with httpx.Client(base_url=url) as client:  # one kept-alive connection
        for n in range(count):
            answer = client.get(f"/small/S{n}")
            assert answer.status_code == 200
            assert answer.json() == {"sku": f"S{n}", "available": 7}


def test_each_small_answer_leaves_in_one_write() -> None:
    writes: list[int] = []
    with served(APP, counting(JoiningHttpToolsProtocol, writes)) as url:
        small_answers(url, 20)
    assert len(writes) == 20

    # Uvicorn's own protocol writes the head and the body apart.
    writes.clear()
    with served(APP, counting(HttpToolsProtocol, writes)) as url:
        small_answers(url, 20)
    assert len(writes) == 40


def test_a_large_streamed_body_arrives_whole_and_is_not_held_back() -> None:
    writes: list[int] = []
    with served(APP, counting(JoiningHttpToolsProtocol, writes)) as url, httpx.Client() as client:
        answer = client.get(f"{url}/big")
        assert answer.status_code == 200
        assert answer.content == BIG
        for n in range(3):  # the connection is still good for more
            assert client.get(f"{url}/small/S{n}").json()["sku"] == f"S{n}"
    # Never more than MAX_HELD held, plus the write that reached it.
    assert max(writes) < MAX_HELD + CHUNK + 64
    assert sum(writes) > len(BIG)


def test_a_client_that_half_closes_after_its_request_gets_the_answer() -> None:
    with served(APP, JoiningHttpToolsProtocol) as url:
        port = int(url.rsplit(":", 1)[1])
        for n in range(5):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(f"GET /small/H{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                conn.shutdown(socket.SHUT_WR)  # as `printf ... | nc` does
                received = b""
                while chunk := conn.recv(65536):
                    received += chunk
            head, _, body = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), received
            assert json.loads(body) == {"sku": f"H{n}", "available": 7}


def test_writes_of_one_turn_are_joined_and_closing_writes_what_is_held() -> None:
    async def scenario() -> list[bytes]:
        loop = asyncio.get_running_loop()
        received: list[bytes] = []
        done = loop.create_future()

        class Sink(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                received.append(data)

            def connection_lost(self, exc: Exception | None) -> None:
                done.set_result(None)

        server = await loop.create_server(Sink, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        joined = JoiningTransport(Counted(transport, writes), loop)  # type: ignore[arg-type]
        joined.write(b"head;")
        joined.write(b"body")
        assert joined.get_write_buffer_size() == len(b"head;body")
        assert writes == []  # held until the turn ends
        await asyncio.sleep(0.05)
        assert writes == [len(b"head;body")]
        joined.write(b";" + b"x" * MAX_HELD)  # large: goes at once, not held
        assert writes[-1] == MAX_HELD + 1
        joined.write(b";last")
        joined.close()  # before the turn ends: what is held goes first
        await asyncio.wait_for(done, 5)
        server.close()
        return received

    writes: list[int] = []
    received = asyncio.run(scenario())
    assert b"".join(received) == b"head;body;" + b"x" * MAX_HELD + b";last"
    assert writes == [9, MAX_HELD + 1, 5]
