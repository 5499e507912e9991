"""Secrets never leave the process in clear: URL passwords, keyword passwords and registered values are masked."""

from __future__ import annotations

import logging

import pytest

from runbook.engine.redact import RedactingFilter, redact, redact_obj, register_secret


def test_url_password_is_masked_even_if_never_registered() -> None:
    assert redact("connect postgresql://runbook:s3cr3t-pw@127.0.0.1:5/x failed") == (
        "connect postgresql://runbook:***@127.0.0.1:5/x failed"
    )


def test_keyword_password_is_masked() -> None:
    assert redact("host=db password=abc123 user=x") == "host=db password=*** user=x"


def test_registered_secret_and_its_url_password_are_masked_anywhere() -> None:
    register_secret("postgresql://app:Zq9-unique-pw@db/x")
    assert redact("auth failed for Zq9-unique-pw") == "auth failed for ***"
    assert redact_obj({"a": ["Zq9-unique-pw"], "b": 3}) == {"a": ["***"], "b": 3}


def test_log_filter_masks_formatted_message(caplog: pytest.LogCaptureFixture) -> None:
    register_secret("tok-ABCDEFG-123")
    logger = logging.getLogger("test.redact")
    caplog.handler.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO, logger="test.redact"):
        logger.info("token is %s", "tok-ABCDEFG-123")
    assert "tok-ABCDEFG-123" not in caplog.text
    assert "token is ***" in caplog.text
