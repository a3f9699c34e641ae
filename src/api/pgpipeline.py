"""A pipelined request is sent whole before its answers are awaited.

psycopg (3.2 and 3.3 at least; seen with 3.3.9) hands a pipeline's last command to libpq
and stops sending as soon as its queue is empty, even where libpq could not write all of
it yet (the socket was full: the server had not been reading, busy with a lock or another
statement); it then waits for answers that the server cannot give before it has read the
rest. Both sides wait for ever: the server in `ClientRead`, the writer's thread in
`Pipeline.sync`. A save of a large delivery's part (megabytes of events and levels) that
waited on the event table's lock did so, and every write after it timed out.

`install` wraps psycopg's step so that it goes on writing (and reading what the server
sends meanwhile, as psycopg does, so that neither side's buffer fills) until libpq has
nothing left to send. Where nothing is left, the wrapper adds one call; where psycopg
does it itself one day, none.
"""

from __future__ import annotations

from collections import deque

from psycopg import _pipeline_base, generators
from psycopg.abc import PipelineCommand, PQGen
from psycopg.pq.abc import PGconn, PGresult
from psycopg.waiting import Ready, Wait

_library_communicate = generators.pipeline_communicate


def _communicate_whole(
    pgconn: PGconn, commands: deque[PipelineCommand]
) -> PQGen[list[list[PGresult]]]:
    results: list[list[PGresult]] = yield from _library_communicate(pgconn, commands)
    while pgconn.flush():  # 1: some of the request is still in libpq's buffer
        ready = yield Wait.RW
        if ready & Ready.R:
            pgconn.consume_input()  # kept for the results' fetch, which reads them next
    return results


def install() -> None:
    """Makes every pipeline of this process send its requests whole (idempotent)."""
    # The name the pipeline looks up when it sends (not exported: set in the module's dict).
    vars(_pipeline_base)["pipeline_communicate"] = _communicate_whole
