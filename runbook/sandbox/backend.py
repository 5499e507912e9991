"""The sandbox backend (runbook.sandbox.backend_app) as a service of its own, plus the payment-provider stand-in.

The HTTPS stand-in uses a self-signed certificate made here with ``cryptography`` (already installed with paramiko
and Prefect), valid for CERT_DAYS days, for localhost and 127.0.0.1; the generated playbook points the check's
``ca_file`` at it so verification is real, not switched off.
"""

from __future__ import annotations

import ipaddress
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from runbook.engine.daemon import free_ports, http_ok, start_ticks

from . import net, process
from .base import Service, ServiceRecord
from .yaml_style import Flow

START_TIMEOUT_S = 60.0  # its import pulls in Prefect: 15-39 s on a busy 2-core machine
SLOW_MS = 800
SLOW_BUDGET_S = 0.5
ACTIVE_SESSIONS = 3
CERT_DAYS = 30
MODULE = "runbook.sandbox.backend_app"


def write_self_signed(cert_file: Path, key_file: Path, days: int = CERT_DAYS) -> None:
    """A self-signed certificate for localhost / 127.0.0.1 (EC P-256), valid from now for ``days`` days."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "runbook sandbox payment stand-in")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(net.LOOPBACK))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class Backend(Service):
    name = "backend"
    requirements = ()  # the running interpreter and prometheus_client (a Prefect dependency)

    def start(self, state: Path, port: int, peers: dict[str, ServiceRecord] | None = None) -> ServiceRecord:
        d = self.fresh_dir(state)
        log = d / "backend.log"
        cert, key = d / "payments-cert.pem", d / "payments-key.pem"
        write_self_signed(cert, key)
        (tls_port,) = free_ports(1)
        cmd = [sys.executable, "-m", MODULE, "--port", str(port), "--tls-port", str(tls_port),
               "--cert", str(cert), "--key", str(key), "--slow-ms", str(SLOW_MS), "--sessions", str(ACTIVE_SESSIONS)]
        proc = process.spawn(cmd, log, cwd=d)
        record = ServiceRecord(
            name=self.name, pid=proc.pid, port=port, log_file=str(log),
            paths={"dir": str(d), "cert": str(cert), "tls_port": str(tls_port)},
            cmdline_markers=[MODULE, f"--port {port}"],
        )
        process.await_healthy(proc, lambda: self.is_healthy(record), START_TIMEOUT_S,
                              f"backend on 127.0.0.1:{port}", log)
        record.proc_start = start_ticks(proc.pid)
        record.running = True
        return record

    def is_healthy(self, record: ServiceRecord) -> bool:
        # /metrics: health checks must not change the request counts tests rely on
        return http_ok(f"{base_url(record.port)}/metrics")

    def playbook_fragment(self, record: ServiceRecord) -> dict[str, Any]:
        base = base_url(record.port)
        return {"http_checks": {
            "api-health": Flow(url=f"{base}/api/health", expect_status=200, timeout_s=3),
            "api-bookings": Flow(url=f"{base}/api/bookings", expect_status=200, timeout_s=3),
            # the sandbox's standing slow endpoint: SLOW_MS against a 0.5 s budget
            "api-slow": Flow(url=f"{base}/api/slow", expect_status=200, timeout_s=5, slow_s=SLOW_BUDGET_S),
            "payment-provider": Flow(url=f"https://localhost:{record.paths['tls_port']}/v1/charges",
                                     expect_status=401, timeout_s=3, ca_file=record.paths["cert"]),
        }}


def base_url(port: int) -> str:
    return f"http://{net.LOOPBACK}:{port}"


SERVICE = Backend()
