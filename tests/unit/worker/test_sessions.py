"""SessionTable: opening, finding and closing sessions with their secret token."""

from __future__ import annotations

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.worker.limits import MAX_SYSTEM_PROMPT_CHARS, MAX_TEMPLATE_CHARS
from services.worker.sessions import SessionTable


def test_open_get_close():
    table = SessionTable()
    session = table.open(chat_template="{{ x }}", system_prompt="Be brief.")
    assert session.session_id.startswith("sess-") and session.token, f"ids: {session}"
    assert session.chat_template == "{{ x }}", "the session should keep its chat template"
    assert session.messages == [{"role": "system", "content": "Be brief."}], (
        f"the system prompt should be the first message: {session.messages}")
    assert session.tokens == [] and not session.busy, "a new session should be empty and idle"
    assert table.get(session.session_id, session.token) is session, "get should find the session"
    assert len(table) == 1 and table.all() == [session], f"one session open: {table.all()}"
    assert table.close(session.session_id, session.token) is session, "close returns the session"
    assert len(table) == 0, "the table should be empty after close"
    with pytest.raises(NotFound):
        table.get(session.session_id, session.token)


def test_sessions_get_distinct_ids_and_tokens():
    table = SessionTable()
    sessions = [table.open() for _ in range(50)]
    assert len({s.session_id for s in sessions}) == 50, "session ids should be unique"
    assert len({s.token for s in sessions}) == 50, "session tokens should be unique"
    assert all(s.messages == [] for s in sessions), "no system prompt: no messages"


def test_wrong_token_is_permission_denied():
    table = SessionTable()
    session = table.open()
    for token in ("", "x", session.token + "x", session.token[:-1]):
        with pytest.raises(PermissionDenied) as caught:
            table.get(session.session_id, token)
        assert caught.value.field == "token", f"the error should name 'token': {caught.value.field}"
        with pytest.raises(PermissionDenied):
            table.close(session.session_id, token)
    assert len(table) == 1, "a close with a wrong token must not close the session"
    other = table.open()
    with pytest.raises(PermissionDenied):
        table.get(session.session_id, other.token)  # another session's token


def test_unknown_or_missing_session():
    table = SessionTable()
    with pytest.raises(NotFound) as caught:
        table.get("sess-0123456789abcdef", "token")
    assert caught.value.kind == "session", f"NotFound should be about a session: {caught.value}"
    with pytest.raises(NotFound):
        table.close("sess-0123456789abcdef", "token")
    with pytest.raises(InvalidArgument) as missing:
        table.get("", "token")
    assert missing.value.field == "session_id", f"should name session_id: {missing.value.field}"


def test_max_sessions_is_failed_precondition():
    table = SessionTable(max_sessions=2)
    first = table.open()
    table.open()
    with pytest.raises(FailedPrecondition) as caught:
        table.open()
    assert caught.value.reason == "TOO_MANY_SESSIONS", f"reason: {caught.value.reason}"
    assert len(table) == 2, "a refused open must not add a session"
    table.close(first.session_id, first.token)
    table.open()  # room again
    assert len(table) == 2, "closing one should make room for one more"


def test_long_system_prompt_or_template_is_invalid_argument():
    table = SessionTable()
    with pytest.raises(InvalidArgument) as caught:
        table.open(system_prompt="x" * (MAX_SYSTEM_PROMPT_CHARS + 1))
    assert caught.value.field == "system_prompt", f"should name system_prompt: {caught.value.field}"
    with pytest.raises(InvalidArgument) as caught:
        table.open(chat_template="x" * (MAX_TEMPLATE_CHARS + 1))
    assert caught.value.field == "chat_template", f"should name chat_template: {caught.value.field}"
    assert len(table) == 0, "refused opens must not add sessions"
    table.open(chat_template="x" * MAX_TEMPLATE_CHARS, system_prompt="x" * MAX_SYSTEM_PROMPT_CHARS)
    assert len(table) == 1, "prompt and template at their limits should be accepted"
