"""A forked worker process never shares the parent's database connections."""

from __future__ import annotations

import os

from sqlalchemy import Engine, text

from service.db import make_engine


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_forked_child_opens_its_own_connection(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        parent_pid = _backend_pid(engine)  # now pooled in the parent
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # the child reports the server process it talks to
            code = 1
            try:
                os.write(write, str(_backend_pid(engine)).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read) as pipe:
            child_pid = int(pipe.read())
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert child_pid != parent_pid
        # the parent's pooled connection survived the child's exit
        assert _backend_pid(engine) == parent_pid
    finally:
        engine.dispose()
