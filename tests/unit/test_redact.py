"""Secrets never leave the process in clear: URL passwords, keyword passwords and registered values are masked."""

from __future__ import annotations

import logging
import traceback

import pytest

from runbook.engine.errors import ConfigError, QueryFailed
from runbook.engine.redact import (
    RedactingFilter,
    mask_exception,
    masked_exceptions,
    redact,
    redact_obj,
    register_secret,
)


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


def test_a_keyword_password_with_an_unquoted_space_is_registered_whole_and_word_by_word() -> None:
    """libpq's parse error quotes the word after the space ("missing '=' after ..."): that word is a secret too."""
    register_secret("host=db user=app password=Head-7788 Tail-9911 dbname=x")
    assert redact('missing "=" after "Tail-9911" in connection info string') == (
        'missing "=" after "***" in connection info string')
    assert "Head-7788" not in redact("token Head-7788")


def test_mask_exception_keeps_the_type_and_masks_args_attributes_and_chain() -> None:
    secret = "Mask-Secret-4242"
    register_secret(secret)
    try:
        try:
            raise ValueError(f"inner {secret}")
        except ValueError as inner:
            raise QueryFailed("db", f"refused {secret}", "28P01") from inner  # (the source line shows no secret)
    except QueryFailed as exc:
        clean = mask_exception(exc)
    assert isinstance(clean, QueryFailed) and clean.sqlstate == "28P01"
    assert str(clean) == "refused ***" and clean.reason == "refused ***"
    assert clean.__cause__ is None and clean.__suppress_context__
    assert secret not in "".join(traceback.format_exception(clean))
    plain = ValueError("nothing secret here")
    assert mask_exception(plain) is plain


def test_masked_exceptions_reraises_masked_and_leaves_clean_ones_alone() -> None:
    register_secret("Mask-Secret-5353")
    with pytest.raises(KeyError) as caught, masked_exceptions():
        raise KeyError("no Mask-Secret-5353 here")
    assert "Mask-Secret-5353" not in repr(caught.value)
    original = ConfigError("file: key: wrong")
    with pytest.raises(ConfigError) as same, masked_exceptions():
        raise original
    assert same.value is original


def test_log_filter_masks_the_traceback_too(caplog: pytest.LogCaptureFixture) -> None:
    register_secret("Trace-Secret-6464")
    logger = logging.getLogger("test.redact.tb")
    caplog.handler.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO, logger="test.redact.tb"):
        try:
            raise RuntimeError("connect with Trace-Secret-6464 failed")
        except RuntimeError:
            logger.exception("it failed")
    assert "it failed" in caplog.text and "RuntimeError: connect with *** failed" in caplog.text
    assert "Trace-Secret-6464" not in caplog.text
