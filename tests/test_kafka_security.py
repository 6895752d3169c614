"""One security section configures every Kafka client the same way."""

from __future__ import annotations

import ssl

import pytest
from pydantic import ValidationError

from driftrec.contract.settings import Settings
from driftrec.streams.kafka_client import aiokafka_options, faust_credentials, kafka_python_options


def test_plaintext_by_default() -> None:
    s = Settings()
    assert aiokafka_options(s) == {"security_protocol": "PLAINTEXT"}
    assert kafka_python_options(s) == {"security_protocol": "PLAINTEXT"}
    assert faust_credentials(s) is None


def test_sasl_ssl_reaches_all_three_libraries() -> None:
    s = Settings(
        kafka_security={
            "protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "svc",
            "sasl_password": "pw",
        }
    )
    aio = aiokafka_options(s)
    assert aio["security_protocol"] == "SASL_SSL" and isinstance(aio["ssl_context"], ssl.SSLContext)
    assert (aio["sasl_mechanism"], aio["sasl_plain_username"], aio["sasl_plain_password"]) == (
        "SCRAM-SHA-512",
        "svc",
        "pw",
    )
    kp = kafka_python_options(s)
    assert (kp["security_protocol"], kp["sasl_mechanism"], kp["sasl_plain_password"]) == (
        "SASL_SSL",
        "SCRAM-SHA-512",
        "pw",
    )
    creds = faust_credentials(s)
    assert creds.username == "svc" and str(creds.protocol.value) == "SASL_SSL"
    assert "pw" not in repr(s.kafka_security)  # the password is a secret in logs and dumps


def test_sasl_without_credentials_is_refused() -> None:
    with pytest.raises(ValidationError, match="needs sasl_username and sasl_password"):
        Settings(kafka_security={"protocol": "SASL_PLAINTEXT"})
