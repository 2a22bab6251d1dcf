"""Mail over STARTTLS with a login, to an SMTP server that refuses anything else."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from firezone import client_auth
from tests.cli.conftest import free_port
from tests.signin.conftest import (
    Mailbox,
    _Handler,
    check_log,
    email_sign_in,
    mail_code,
    start_portal,
)

pytestmark = pytest.mark.timeout(120)

USER, PASSWORD = "fz-mailer", "smtp-pass-123"


def _self_signed(root: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = root / "smtp.crt", root / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _auth(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and data.login == USER.encode() and data.password == PASSWORD.encode()
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def tls_mailbox(tmp_path: Path) -> Iterator[tuple[Mailbox, int, Path]]:
    cert, key = _self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    box = Mailbox()
    port = free_port()
    ctl = Controller(_Handler(box), hostname="127.0.0.1", port=port, tls_context=ctx, require_starttls=True,
                     auth_required=True, auth_require_tls=True, authenticator=_auth)
    ctl.start()
    try:
        yield box, port, cert
    finally:
        ctl.stop()


def test_code_mail_goes_over_starttls_with_login(tmp_path: Path, tls_mailbox: tuple[Mailbox, int, Path]) -> None:
    box, port, cert = tls_mailbox
    p = start_portal(tmp_path / "portal", (box, port), FIREZONE_PORTAL_SMTP_STARTTLS="true",
                     FIREZONE_PORTAL_SMTP_USER=USER, FIREZONE_PORTAL_SMTP_PASSWORD=PASSWORD,
                     SSL_CERT_FILE=str(cert))
    try:
        email = p.user()
        b, page, state, _n = email_sign_in(p, email)
        done = b.submit(page, "code-form", code=mail_code(box.wait_for(email)))
        assert client_auth.parse_callback(done.callback).state == state
        assert PASSWORD not in p.log_text()
    finally:
        p.stop()
    check_log(p)


def test_wrong_smtp_password_is_logged_not_shown(tmp_path: Path, tls_mailbox: tuple[Mailbox, int, Path]) -> None:
    box, port, cert = tls_mailbox
    p = start_portal(tmp_path / "portal", (box, port), FIREZONE_PORTAL_SMTP_STARTTLS="true",
                     FIREZONE_PORTAL_SMTP_USER=USER, FIREZONE_PORTAL_SMTP_PASSWORD="wrong-password",
                     SSL_CERT_FILE=str(cert))
    try:
        email = p.user()
        _b, page, _s, _n = email_sign_in(p, email)
        assert page.status == 200 and "Check your email" in page.text
        import time

        deadline = time.monotonic() + 10
        while "sending a sign-in mail failed" not in p.log_text():
            assert time.monotonic() < deadline, p.log_text()
            time.sleep(0.1)
        assert "SMTPAuthenticationError" in p.log_text()
        assert box.to(email) == []
    finally:
        p.stop()
    text = p.log_text()
    assert "Traceback" not in text and "wrong-password" not in text
