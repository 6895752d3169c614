"""How every Kafka client of driftrec connects: security options once, for all three libraries.

Faust (the worker), aiokafka (the trainers, the replay harness) and kafka-python (the producer,
the admin client) name the same options differently; ``settings.kafka_security`` is read here
and nowhere else, so a TLS/SASL broker is configured by environment alone
(``DRIFTREC_KAFKA_SECURITY__PROTOCOL=SASL_SSL`` and the credentials).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from driftrec.contract.settings import KafkaSecurity, Settings


def _ssl_context(sec: KafkaSecurity) -> ssl.SSLContext | None:
    if "SSL" not in sec.protocol:
        return None
    context = ssl.create_default_context(cafile=str(sec.ssl_cafile) if sec.ssl_cafile else None)
    if sec.ssl_certfile:
        context.load_cert_chain(str(sec.ssl_certfile), str(sec.ssl_keyfile) if sec.ssl_keyfile else None)
    return context


def aiokafka_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for an aiokafka consumer, producer or admin client."""
    sec = settings.kafka_security
    options: dict[str, Any] = {"security_protocol": sec.protocol}
    if (context := _ssl_context(sec)) is not None:
        options["ssl_context"] = context
    if sec.protocol.startswith("SASL"):
        assert sec.sasl_password is not None  # checked by KafkaSecurity
        options |= {
            "sasl_mechanism": sec.sasl_mechanism,
            "sasl_plain_username": sec.sasl_username,
            "sasl_plain_password": sec.sasl_password.get_secret_value(),
        }
    return options


def kafka_python_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for a kafka-python producer or admin client."""
    sec = settings.kafka_security
    options: dict[str, Any] = {"security_protocol": sec.protocol}
    if "SSL" in sec.protocol:
        options["ssl_cafile"] = str(sec.ssl_cafile) if sec.ssl_cafile else None
        if sec.ssl_certfile:
            options["ssl_certfile"] = str(sec.ssl_certfile)
            options["ssl_keyfile"] = str(sec.ssl_keyfile) if sec.ssl_keyfile else None
    if sec.protocol.startswith("SASL"):
        assert sec.sasl_password is not None
        options |= {
            "sasl_mechanism": sec.sasl_mechanism,
            "sasl_plain_username": sec.sasl_username,
            "sasl_plain_password": sec.sasl_password.get_secret_value(),
        }
    return options


def faust_credentials(settings: Settings) -> Any:
    """Faust's ``broker_credentials`` (None: plaintext)."""
    import faust

    sec = settings.kafka_security
    context = _ssl_context(sec)
    if sec.protocol.startswith("SASL"):
        assert sec.sasl_password is not None
        return faust.SASLCredentials(
            username=sec.sasl_username,
            password=sec.sasl_password.get_secret_value(),
            ssl_context=context,  # with a context, Faust speaks SASL_SSL
            mechanism=sec.sasl_mechanism,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether a broker failure may pass by itself (no connection, a timeout, a leader moving)."""
    from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

    if isinstance(exc, KafkaConnectionError | KafkaTimeoutError | asyncio.TimeoutError | ConnectionError):
        return True
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))
