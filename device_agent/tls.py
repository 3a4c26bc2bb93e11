"""TLS to the broker: which files a connection uses, and the context that holds them, in which a
renewed client certificate or CA certificate takes the place of the one before for the
connections that follow (``device_agent.client_cert``)."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from device_agent.errors import ConfigError


@dataclass(frozen=True)
class TlsFiles:
    """TLS to the broker: the CA that signed its certificate, and optionally our client certificate."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None


class BrokerTls:
    """What paho's tls_set makes (it verifies the broker's certificate and name), kept so that a
    renewed client certificate can be shown, a renewed CA certificate trusted, or a retired one no
    longer trusted, later. An SSL context cannot forget a CA, so paho is given one (*context*) that
    hands each connection to the context in use, which restart() replaces."""

    def __init__(self, tls: TlsFiles) -> None:
        self._in_use = _context(tls)
        self.context = _Handing(self)

    def present(self, tls: TlsFiles) -> None:
        """Show the broker *tls*'s client certificate from the next connection on (the CAs stay
        those given at the start, and trust()). Raises ConfigError if it cannot be used."""
        _present(self._in_use, tls)

    def trust(self, ca_pem: str) -> None:
        """Also accept a broker certificate signed under the CA certificate *ca_pem* (a renewed one),
        from the next connection on."""
        try:
            self._in_use.load_verify_locations(cadata=ca_pem)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"cannot use the CA certificate: {exc}") from None

    def restart(self, tls: TlsFiles) -> None:
        """From the next connection on, trust exactly the CAs in *tls*'s CA file (one fewer: a retired
        CA) and show its client certificate. Raises ConfigError if they cannot be used."""
        self._in_use = _context(tls)


class _Handing(ssl.SSLContext):
    """The context paho holds: each connection is made by the BrokerTls's context in use."""

    def __new__(cls, owner: BrokerTls):
        self = super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)
        self.owner = owner
        return self

    def __init__(self, owner: BrokerTls) -> None:  # (SSLContext is made in __new__)
        pass

    def wrap_socket(self, *args, **kwargs):
        return self.owner._in_use.wrap_socket(*args, **kwargs)


def _context(tls: TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(str(tls.ca))
    except (OSError, ValueError) as exc:
        raise _unusable(tls, exc) from None
    _present(context, tls)
    return context


def _present(context: ssl.SSLContext, tls: TlsFiles) -> None:
    if tls.cert is not None:
        try:
            context.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
        except (OSError, ValueError) as exc:
            raise _unusable(tls, exc) from None


def _unusable(tls: TlsFiles, exc: Exception) -> ConfigError:
    files = [str(f) for f in (tls.ca, tls.cert, tls.key) if f is not None]
    missing = [f for f in files if not os.path.isfile(f)]
    return ConfigError(f"no TLS file {missing[0]}" if missing else
                       f"cannot use the TLS files {', '.join(files)}: {exc}")
