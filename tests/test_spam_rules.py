"""Each phishing rule on crafted messages: one that makes it fire, one that must not."""

from __future__ import annotations

import io
import zipfile

import pytest

from services.spam import DEFAULT_THRESHOLD, score_message
from services.spam.parse import parse_message
from services.spam.rules import evaluate_rules
from services.spam.verdict import Indicator


def message(
    body: str = "Hello Anna,\n\nthe meeting moved to Thursday at ten.\n\nBen\n",
    *,
    sender: str = "Ben Miller <ben@example.org>",
    subject: str = "Meeting",
    to: str = "anna@example.com",
    content_type: str = "text/plain; charset=utf-8",
    extra: str = "",
    date: str | None = "Tue, 01 Dec 2026 09:00:00 +0000",
    message_id: str | None = "<a1b2c3@example.org>",
) -> bytes:
    head = [f"From: {sender}", f"To: {to}", f"Subject: {subject}"]
    if date is not None:
        head.append(f"Date: {date}")
    if message_id is not None:
        head.append(f"Message-ID: {message_id}")
    head += ["MIME-Version: 1.0", f"Content-Type: {content_type}"]
    if extra:
        head.append(extra)
    return ("\r\n".join(head) + "\r\n\r\n" + body).encode("utf-8")


def html(markup: str, **kw: object) -> bytes:
    return message(f"<html><body>{markup}</body></html>", content_type="text/html; charset=utf-8", **kw)  # type: ignore[arg-type]


def with_attachment(filename: str, payload: bytes, ctype: str = "application/octet-stream") -> bytes:
    import base64

    encoded = base64.encodebytes(payload).decode("ascii")
    body = (
        "--b1\r\nContent-Type: text/plain\r\n\r\nPlease see the attached file.\r\n"
        f'--b1\r\nContent-Type: {ctype}; name="{filename}"\r\nContent-Transfer-Encoding: base64\r\n'
        f'Content-Disposition: attachment; filename="{filename}"\r\n\r\n{encoded}\r\n--b1--\r\n'
    )
    return message(body, content_type='multipart/mixed; boundary="b1"')


def indicators(raw: bytes) -> dict[str, Indicator]:
    return {i.name: i for i in evaluate_rules(parse_message(raw))}


def fired(raw: bytes) -> dict[str, str]:
    return {name: i.detail for name, i in indicators(raw).items()}


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_a_plain_personal_message_fires_no_rule() -> None:
    assert fired(message()) == {}


def test_link_text_mismatch() -> None:
    bad = html('<a href="http://login.evil-host.test/x">https://www.paypal.com/signin</a>')
    assert "paypal.com" in fired(bad)["link_text_mismatch"]
    good = html('<a href="https://www.paypal.com/signin">https://www.paypal.com/signin</a>')
    assert "link_text_mismatch" not in fired(good)
    words = html('<a href="http://tracker.example.net/c/1">Read the report</a>')
    assert "link_text_mismatch" not in fired(words)


@pytest.mark.parametrize(
    "host", ["paypal-secure-login.com", "micros0ft-support.net", "xn--pypal-4ve.com", "app1e-id.info"]
)
def test_lookalike_domain(host: str) -> None:
    assert host in fired(html(f'<a href="https://{host}/a">open</a>'))["lookalike_domain"]


@pytest.mark.parametrize(
    "host", ["www.paypal.com", "s3.amazonaws.com", "chaseforum.example.org", "example.org"]
)
def test_no_lookalike_for_the_brands_own_domains(host: str) -> None:
    assert "lookalike_domain" not in fired(html(f'<a href="https://{host}/a">open</a>'))


def test_display_name_spoofs_brand() -> None:
    spoof = message(sender='"PayPal Service" <service@mailer-77.example.net>')
    assert fired(spoof)["display_name_spoofs_brand"] == '"paypal" sent from mailer-77.example.net'
    real = message(sender='"PayPal" <service@paypal.com>')
    assert "display_name_spoofs_brand" not in fired(real)
    person = message(sender='"Ann Appleby" <ann@example.org>')
    assert "display_name_spoofs_brand" not in fired(person)


def test_a_role_name_from_the_recipients_own_domain_is_no_spoof() -> None:
    ours = message(sender='"IT Support" <helpdesk@example.com>', to='"Anna" <anna@example.com>')
    assert "display_name_spoofs_brand" not in fired(ours)
    theirs = message(sender='"IT Support" <helpdesk@mailer-77.example.net>', to="anna@example.com")
    assert fired(theirs)["display_name_spoofs_brand"] == '"it support" sent from mailer-77.example.net'
    # A brand's name is the brand's wherever the recipient works.
    brand = message(sender='"PayPal" <service@example.com>', to="anna@example.com")
    assert "display_name_spoofs_brand" in fired(brand)


def test_shops_and_parcel_services_from_their_own_country_domains_are_no_spoof() -> None:
    spoof = message(sender='"Lidl Gewinnspiel" <gewinn.lidl@gmail.com>')
    assert fired(spoof)["display_name_spoofs_brand"] == '"lidl" sent from gmail.com'
    assert "display_name_spoofs_brand" in fired(message(sender='"DPD Versand" <info@spreseau.example>'))
    for sender in (
        '"Lidl" <newsletter@mail.lidl.de>',
        '"Leroy Merlin" <news@leroymerlin.es>',
        '"DPD" <noreply@dpd.co.uk>',
        '"SHEIN" <shein@sheinemail.com>',
    ):
        assert "display_name_spoofs_brand" not in fired(message(sender=sender)), sender


def test_credential_request_needs_urgency() -> None:
    urgent = message("Your mailbox is full. Verify your account within 24 hours or it will be suspended.")
    assert "credential_request" in fired(urgent)
    calm = message("I reset the router's password, it is in the usual place.")
    assert "credential_request" not in fired(calm)


def test_payment_request_needs_urgency() -> None:
    assert "payment_request" in fired(message("The invoice is overdue: final notice, pay immediately."))
    assert "payment_request" not in fired(message("I attached the invoice for last month's hosting."))


@pytest.mark.parametrize(
    ("filename", "rule"),
    [
        ("invoice.exe", "executable_attachment"),
        ("scan.js", "executable_attachment"),
        ("salary.xlsm", "macro_attachment"),
        ("statement.html", "html_attachment"),
        ("report.rar", "unreadable_archive"),
    ],
)
def test_risky_attachments(filename: str, rule: str) -> None:
    assert rule in fired(with_attachment(filename, b"MZ\x90\x00" * 100))


def test_safe_attachments_fire_nothing() -> None:
    assert fired(with_attachment("minutes.pdf", b"%PDF-1.4 ..." * 50)) == {}
    assert fired(with_attachment("photos.zip", zip_bytes({"a.jpg": b"\xff\xd8" * 500}))) == {}


def test_archive_with_an_executable_inside() -> None:
    detail = fired(with_attachment("docs.zip", zip_bytes({"docs/invoice.pdf.exe": b"MZ" * 300})))
    assert "invoice.pdf.exe" in detail["executable_attachment"]


def test_password_protected_archive() -> None:
    data = bytearray(zip_bytes({"secret.txt": b"x" * 300}))
    # Set the "encrypted" flag in the central directory entry (the only thing read).
    central = data.find(b"PK\x01\x02")
    data[central + 8] |= 0x01
    assert "encrypted_archive" in fired(with_attachment("secret.zip", bytes(data)))


def test_missing_date_and_message_id() -> None:
    indicators = fired(message(date=None, message_id=None))
    assert "missing_date" in indicators
    assert "missing_message_id" in indicators
    odd = fired(message(date="yesterday at noon", message_id="no-angle-brackets"))
    assert "inconsistent_date" in odd
    assert "malformed_message_id" in odd


def test_hidden_html_text() -> None:
    hidden = html(
        '<p>Your parcel is waiting.</p><div style="display:none">lorem ipsum dolor sit amet consectetur'
        " adipiscing elit sed do eiusmod</div>"
    )
    assert "html_only_hidden_text" in fired(hidden)
    shown = html("<p>Your parcel is waiting.</p><div>lorem ipsum dolor sit amet consectetur</div>")
    assert "html_only_hidden_text" not in fired(shown)


def test_authentication_results_failures() -> None:
    failing = message(
        extra="Authentication-Results: mx.example.com; spf=fail smtp.mailfrom=x.test; dmarc=fail"
    )
    assert fired(failing)["auth_results_fail"] == "dmarc, spf failed"
    passing = message(extra="Authentication-Results: mx.example.com; spf=pass; dkim=pass; dmarc=pass")
    assert "auth_results_fail" not in fired(passing)


def test_password_form_in_the_message() -> None:
    form = html('<form action="https://collect.example.net/p"><input type="password" name="p"></form>')
    assert fired(form)["html_form"] == "a form in the message asks for a password"


def test_obfuscated_sender_name_and_spelt_out_text() -> None:
    assert "obfuscated_text" in fired(message(sender='"Mi\u200bcro\u200bsoft" <it@example.net>'))
    assert "obfuscated_text" in fired(message(" ".join("Greetings I have access to your device")))
    assert "obfuscated_text" not in fired(message("A normal sentence, with normal words in it."))


def test_recipient_address_in_the_subject() -> None:
    raw = message(subject="anna@example.com, your storage is full")
    assert "recipient_in_subject" in fired(raw)
    assert "recipient_in_subject" not in fired(message(subject="Storage"))


def test_malformed_sender() -> None:
    assert "malformed_sender" in fired(message(sender="Support <avisos@006982rctaregular>"))
    assert "malformed_sender" in fired(message(sender="Support <anna@example.com@463719.com>"))
    assert "malformed_sender" not in fired(message())


def test_free_hosting() -> None:
    assert fired(message(sender="Bonus <noreply@promo-1.firebaseapp.com>"))["free_hosting"].startswith(
        "sent from"
    )
    assert "free_hosting" in fired(html('<a href="https://x-login.web.app/">open</a>'))
    assert "free_hosting" not in fired(html('<a href="https://www.example.org/">open</a>'))


def test_lure_terms() -> None:
    assert "lure_terms" in fired(message("Claim your casino bonus today: 200 free spins!"))
    assert "lure_terms" not in fired(message("The bonus round of the quiz was fun."))


def test_ip_address_link() -> None:
    assert fired(html('<a href="http://203.0.113.7/login">Sign in</a>'))["ip_address_link"] == "203.0.113.7"
    assert "ip_address_link" not in fired(html('<a href="https://example.org/">Sign in</a>'))


def test_a_quoting_reply_in_a_thread_counts_for_ham() -> None:
    reply = message(
        "Sounds good.\n\nOn Monday Anna wrote:\n> Shall we meet Thursday?\n> At ten?\n",
        subject="Re: Meeting",
        extra="In-Reply-To: <q1@example.com>\r\nReferences: <q1@example.com>",
    )
    indicator = indicators(reply)["thread_reply"]
    assert indicator.weight < 0
    assert "thread_reply" not in fired(message())


def test_a_phishing_message_scores_as_spam_and_explains_why() -> None:
    raw = html(
        "<p>Dear customer, unusual activity was detected. Verify your account within 24 hours"
        ' or it will be suspended.</p><a href="http://paypal-account-check.example/login">'
        "https://www.paypal.com/verify</a>",
        sender='"PayPal Security" <alert@notify-7.example>',
        subject="Action required: your account is limited",
        message_id=None,
    )
    verdict = score_message(raw)
    names = {i.name for i in verdict.indicators}
    assert verdict.score > 0.95
    assert {
        "display_name_spoofs_brand",
        "credential_request",
        "link_text_mismatch",
        "lookalike_domain",
    } <= names
    assert "statistical_tokens" in names
    assert all(len(i.detail) <= 200 for i in verdict.indicators)
    assert not score_message(message()).is_spam(DEFAULT_THRESHOLD)


def test_words_that_mix_alphabets_are_obfuscation() -> None:
    # A Cyrillic "е" in "Gеt", a Greek "Ν" in "ΝFT": look-alike spellings.
    assert (
        "mixes alphabets"
        in fired(message(subject="G\u0435t A High L\u0435v\u0435l Of Protection"))["obfuscated_text"]
    )
    assert "obfuscated_text" in fired(message(sender='"\u039dFT launch" <news@example.net>'))
    assert "obfuscated_text" in fired(
        message(sender='"C\u034fa\u034fr\u034fr\u034fe\u034ff" <a@example.net>')
    )
    assert "obfuscated_text" in fired(message(sender='"~\u1455.lou-d.\u15e9-lert" <news@example.net>'))
    # Words wholly in one alphabet, even beside Latin ones, are not.
    assert "obfuscated_text" not in fired(message(subject="Встреча в четверг / meeting on Thursday"))
    assert "obfuscated_text" not in fired(message(subject="Σύσκεψη: agenda"))


def test_made_up_sender_mailbox() -> None:
    raw = message(sender='"REI Sweepstakes" <Ouimet_Conrad_1281@promo.example.net>')
    assert fired(raw)["generated_sender"] == "made-up mailbox ouimet_conrad_1281@promo.example.net"
    assert "generated_sender" not in fired(message(sender="Anna Smith <anna_smith@example.com>"))
    assert "generated_sender" not in fired(message(sender="Build Bot <ci_build_2024@example.org>"))


def test_advance_fee_needs_millions_and_a_fund() -> None:
    scam = message("I am the barrister of the deceased. The inheritance of US$15,800,000.00 awaits you.")
    assert fired(scam)["advance_fee"].startswith('"us$15,800,000"')
    assert "advance_fee" in fired(message("A donation of 2.5 million dollars was set aside for you."))
    assert "advance_fee" not in fired(message("The company raised $12,000,000 in its last round."))
    assert "advance_fee" not in fired(message("Thank you for your donation of $20 to the project."))


def test_random_string_in_the_subject_or_sender_name() -> None:
    raw = message(subject="Crédito IR Liberado - maHSkh0WLRUIp")
    assert fired(raw)["random_string"] == "subject: maHSkh0WLRUIp"
    raw = message(sender="fraudeovw3Z3aahb <alerta@mail.example.net>", subject="Aviso")
    assert fired(raw)["random_string"] == "sender name: fraudeovw3Z3aahb"
    for subject in [
        "ipq40xx: fails to boot on Mikrotik hAP ac2 / RBD52G-5HacD2HnD (WIP)",
        "Your iPhone15 order",
        "PowerPoint deck for MyHeritageDNA",
        "Order 112-3456789-1234567 shipped",
        "Ticket ABC12345 updated",
        "Build x86_64 failed",
        "Invoice INV2026Dec01",
    ]:
        assert "random_string" not in fired(message(subject=subject)), subject


def test_serial_number_in_the_sender_name() -> None:
    raw = message(sender='"(BB - Valores a Receber) - 567213892811406" <plop23203@mail.example.net>')
    assert fired(raw)["serial_sender_name"] == "sender name: (BB - Valores a Receber) - 567213892811406"
    raw = message(sender="Bloqueio por fraude20880091 <alerta@mail.example.net>")
    assert "serial_sender_name" in fired(raw)
    for sender in (
        "Ben Miller <ben@example.org>",
        '"Build 2026" <ci@example.org>',
        '"1234567890" <1234567890@qq.com>',
        '"ann.123456@example.org" <ann.123456@example.org>',
        "Support <support@example.org>",
    ):
        assert "serial_sender_name" not in fired(message(sender=sender)), sender


def test_private_addresses_are_not_ip_links() -> None:
    for host in ("192.168.1.1", "10.35.18.121", "127.0.0.1", "172.20.0.5"):
        assert "ip_address_link" not in fired(html(f'<a href="http://{host}/cgi-bin/luci">LuCI</a>'))


def test_link_text_naming_a_file_or_cut_short_is_no_mismatch() -> None:
    assert "link_text_mismatch" not in fired(
        html('<a href="https://github.com/open-iscsi/open-iscsi/blob/master/etc/iscsid.conf">iscsid.conf</a>')
    )
    assert "link_text_mismatch" not in fired(html('<a href="https://www.example.com/">www.example</a>'))
    assert "link_text_mismatch" in fired(html('<a href="https://login.example.net/">www.example.com</a>'))


def test_hidden_style_blocks_and_preheaders() -> None:
    # Outlook hides its own <style> block: CSS is not hidden text.
    outlook = html(
        '<style type="text/css" style="display:none;">P {margin-top:0;margin-bottom:0;}</style>'
        "<p>See you on Thursday.</p>"
    )
    assert "html_only_hidden_text" not in fired(outlook)
    preheader = html('<div style="display:none">Your receipt for order 1234 is inside.</div><p>Thanks!</p>')
    stuffed = html(f'<div style="display:none">{"lorem ipsum dolor sit amet " * 20}</div><p>Hi</p>')
    by_name = indicators(preheader)
    assert by_name["html_only_hidden_text"].weight > 0
    heavier = indicators(stuffed)["html_only_hidden_text"]
    assert by_name["html_only_hidden_text"].weight < heavier.weight


def test_a_reply_without_quoting_counts_less_than_one_that_quotes() -> None:
    head = "In-Reply-To: <q1@example.com>\r\nReferences: <q1@example.com>"
    bare = message("Sounds good.\n", subject="Re: Meeting", extra=head)
    quoting = message(
        "Sounds good.\n\n> Shall we meet Thursday?\n> At ten?\n", subject="Re: Meeting", extra=head
    )
    weight = indicators(bare)["thread_reply"].weight
    quoted = indicators(quoting)["thread_reply"].weight
    assert quoted < weight < 0
    # Quoted lines count wherever they are, the first line too, indented or not; one is not two.
    for body, weighs in [
        ("> Shall we meet Thursday?\n  > At ten?\nYes.\n", quoted),
        ("Yes.\n\t> Shall we meet Thursday?\n", weight),
        ("Yes. > not a quote\n> Shall we meet Thursday?\n", weight),
    ]:
        assert indicators(message(body, extra=head))["thread_reply"].weight == weighs, body


def test_urgency_taken_back_or_about_a_links_lifetime_is_no_urgency() -> None:
    # An ordinary note says it is not urgent; a password reset says how long its link works.
    not_urgent = message("Hi Anna, what's the wifi password at the office again? Not urgent.\n\nBen\n")
    assert "credential_request" not in fired(not_urgent)
    invoice = message("Could you send me the invoice for November when you have a minute? Nothing urgent.")
    assert "payment_request" not in fired(invoice)
    reset = message(
        "Someone, hopefully you, asked to reset the password of your account. If it was not you,"
        " ignore this email.\n\nhttps://git.example.org/users/password/edit?token=abc\n\n"
        "This link will expire in 24 hours.\n"
    )
    assert "credential_request" not in fired(reset)
    code = message(
        "Your sign-in code is 482913. The code expires today at midnight; your password stays the same."
    )
    assert "credential_request" not in fired(code)
    # What the rules are for still fires, the taking back read only just before the phrase.
    assert "credential_request" in fired(message("Your password will expire today. Keep it: log in now."))
    assert "credential_request" in fired(message("Urgent: confirm your password or the account is deleted."))
    assert "payment_request" in fired(message("Not a reminder but a final notice: the invoice is overdue."))


def test_a_sender_that_shows_its_own_domain_through_a_click_tracker_is_no_mismatch() -> None:
    newsletter = html(
        "<p>Over the holidays we open from 8 to 14.</p>"
        '<a href="https://bakery.us12.list-manage.com/track/click?u=1a2b&amp;id=3c4d">www.riverside-bakery.com</a>',
        sender="Riverside Bakery <hello@riverside-bakery.com>",
    )
    assert "link_text_mismatch" not in fired(newsletter)
    receipt = html(
        '<p>Thanks for your payment.</p><a href="https://u1234.ct.sendgrid.net/ls/click?upn=aBc">acmecloud.io/billing</a>',
        sender="Acme Cloud <billing@mail.acmecloud.io>",
    )
    assert "link_text_mismatch" not in fired(receipt)
    # Another's domain shown, through the same tracker, is still a mismatch.
    phish = html(
        '<a href="https://u1234.ct.sendgrid.net/ls/click?upn=aBc">www.paypal.com</a>',
        sender="Acme Cloud <billing@mail.acmecloud.io>",
    )
    assert "paypal.com" in fired(phish)["link_text_mismatch"]


def test_preheader_padding_is_not_hidden_text() -> None:
    # Newsletters pad their preheader with invisible characters so the preview ends after it.
    padding = "&#847;&zwnj;&nbsp;" * 90
    padded = html(
        '<div style="display:none;max-height:0;overflow:hidden">'
        f"Fresh layers for cold mornings.{padding}</div>"
        "<p>Our winter collection is here.</p>"
    )
    indicator = indicators(padded)["html_only_hidden_text"]
    assert indicator.detail == "31 hidden characters"
    plain = html(
        '<div style="display:none">Fresh layers for cold mornings.</div><p>Our winter collection.</p>'
    )
    assert indicators(plain)["html_only_hidden_text"] == indicator
    # Padding alone is no hidden text; hidden words in any number still are, at their weight.
    assert "html_only_hidden_text" not in fired(html(f'<div style="display:none">{padding}</div><p>Hi</p>'))
    stuffed = html(f'<div style="display:none">{"lorem ipsum dolor sit amet " * 20}{padding}</div><p>Hi</p>')
    heavier = indicators(stuffed)["html_only_hidden_text"]
    assert heavier.weight > indicator.weight


def test_a_brand_sending_as_one_of_its_products_is_no_spoof() -> None:
    for sender in (
        '"Microsoft OneDrive" <no-reply@onedrive.com>',
        '"Microsoft SharePoint" <no-reply@sharepoint.com>',
        '"Apple iCloud" <noreply@icloud.com>',
    ):
        assert "display_name_spoofs_brand" not in fired(message(sender=sender)), sender
    spoof = message(sender='"Microsoft OneDrive" <no-reply@onedrive-share.example.net>')
    assert fired(spoof)["display_name_spoofs_brand"] == '"microsoft" sent from onedrive-share.example.net'


def test_people_named_like_a_brand_are_no_spoof() -> None:
    for sender in (
        "Chase Miller <chase.miller@gmail.com>",
        "Sarah Norton <s.norton@northwind-consulting.co.uk>",
        '"Pablo Santander" <pablo@example.es>',
    ):
        assert "display_name_spoofs_brand" not in fired(message(sender=sender)), sender
    for sender in (
        '"Chase" <alerts@secure-notice.example>',
        '"Chase Bank" <alerts@secure-notice.example>',
        '"Norton Security ALERT" <alert@nortonalert.example>',
        '"santander" <compras@shop.example>',
    ):
        assert "display_name_spoofs_brand" in fired(message(sender=sender)), sender
