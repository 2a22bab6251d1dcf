"""Outgoing mail for sign-in codes: SMTP (optionally STARTTLS and login), or the portal log.

Sending runs in a worker thread (smtplib blocks) and in the background of the request, so how long
a sign-in request takes never depends on the mail server or on whether a mail was sent at all.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MailSettings:
    host: str | None = None
    port: int = 587
    starttls: bool = True
    user: str | None = None
    password: str | None = None
    sender: str = "fz <no-reply@localhost>"
    print_only: bool = False
    timeout: float = 15.0

    @property
    def configured(self) -> bool:
        return self.print_only or bool(self.host)


def build(settings: MailSettings, to: str, subject: str, body: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = settings.sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain="fz.invalid")
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(body)
    return msg


def _send_sync(settings: MailSettings, msg: EmailMessage) -> None:
    assert settings.host
    with smtplib.SMTP(settings.host, settings.port, timeout=settings.timeout) as smtp:
        smtp.ehlo()
        if settings.starttls:
            smtp.starttls(context=ssl.create_default_context())
            smtp.ehlo()
        if settings.user:
            smtp.login(settings.user, settings.password or "")
        smtp.send_message(msg)


class Mailer:
    """Sends mails in the background; failures are logged, never shown to the person signing in."""

    def __init__(self, settings: MailSettings) -> None:
        self.settings = settings
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0
        self.failed = 0

    def send_later(self, to: str, subject: str, body: str) -> None:
        task = asyncio.get_running_loop().create_task(self.send(to, subject, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def send(self, to: str, subject: str, body: str) -> None:
        msg = build(self.settings, to, subject, body)
        if self.settings.print_only:
            # local-development mode chosen with --smtp-print: the log is the mailbox
            log.warning("sign-in mail (--smtp-print, not sent)\nTo: %s\nSubject: %s\n\n%s", to, subject, body)
            self.sent += 1
            return
        if not self.settings.host:
            log.error("cannot send a sign-in mail: no SMTP server configured (portal.smtp_host or --smtp-print)")
            self.failed += 1
            return
        try:
            await asyncio.to_thread(_send_sync, self.settings, msg)
            self.sent += 1
            log.debug("sign-in mail sent", extra={"smtp_host": self.settings.host})
        except (OSError, smtplib.SMTPException) as e:
            self.failed += 1
            log.error("sending a sign-in mail failed: %s", type(e).__name__)
            log.debug("SMTP failure", extra={"smtp_host": self.settings.host, "error": str(e)})

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
