"""What phishing says: the word lists of the wording rules, and how to look for them fast.

Phrases (with a space) are substrings of the lower-cased subject and text start
(``ParsedMessage.lower_text``); single words are looked up in its set of words
(``ParsedMessage.lower_words``). Both are C-speed operations, where one large regular
expression per list cost more than the rest of scoring. Lists cover English and the
languages phishing most often arrives in here (Portuguese, Spanish, French, German,
Italian). Words common in technical mail ("locked", "limited", "terminated", "expire",
"login") only count inside a phrase that gives them the phishing sense.
"""

from __future__ import annotations

import re
from functools import cache

CREDENTIAL = (
    "password",
    "passcode",
    "sign in to your",
    "log in to your",
    "login to your",
    "verify your account",
    "verify your identity",
    "verify your email",
    "verify your information",
    "confirm your account",
    "confirm your identity",
    "confirm your email",
    "confirm your details",
    "confirm your information",
    "update your account",
    "update your billing",
    "update your payment",
    "update billing",
    "validate your account",
    "validate your mailbox",
    "validate your email",
    "reactivate your",
    "unlock your account",
    "mailbox quota",
    "mailbox storage",
    "mailbox is full",
    "account verification",
    "mailbox verification",
    "account upgrade",
    "mailbox upgrade",
    "senha",
    "contraseña",
    "mot de passe",
    "passwort",
    "kennwort",
    "credenziali",
    "acesse sua conta",
    "inicie sesión",
    "connectez-vous",
    "confirme seus dados",
    "atualize seus dados",
    "verifique sua conta",
    "verifica tu cuenta",
    "confirma tu cuenta",
    "bestätigen sie ihr",
)
URGENCY = (
    "urgent",
    "immediately",
    "within 12 hours",
    "within 24 hours",
    "within 48 hours",
    "within 72 hours",
    "within 24h",
    "within 48h",
    "within 2 days",
    "within 3 days",
    "within 5 days",
    "within 7 days",
    "within twenty",
    "within forty",
    "suspended",
    "suspension",
    "deactivated",
    "deactivation",
    "will be terminated",
    "account locked",
    "has been locked",
    "will be locked",
    "been closed",
    "will be closed",
    "been disabled",
    "will be disabled",
    "been restricted",
    "account restricted",
    "account limited",
    "limited access",
    "will expire",
    "has expired",
    "expires today",
    "expire today",
    "unusual activity",
    "unusual sign",
    "suspicious activity",
    "suspicious login",
    "suspicious sign",
    "final notice",
    "final warning",
    "final reminder",
    "action required",
    "last chance",
    "last warning",
    "last notice",
    "failure to",
    "as soon as possible",
    "permanently deleted",
    "permanently disabled",
    "urgente",
    "bloquead",
    "suspensão",
    "suspendid",
    "suspendu",
    "gesperrt",
    "dringend",
    "immédiatement",
    "último aviso",
    "ultimo aviso",
    "vencid",
    "expirad",
    "bloccat",
    "scadut",
    "regularizar",
    "inadimpl",
)
PAYMENT_WORDS = frozenset(
    ["invoice", "payment", "billing", "refund", "bitcoin", "btc", "overdue", "giftcard"]
)
PAYMENT_PHRASES = (
    "wire transfer",
    "bank details",
    "bank account",
    "credit card",
    "gift card",
    "outstanding balance",
)
LURE_WORDS = frozenset(
    [
        "casino",
        "jackpot",
        "airdrop",
        "giveaway",
        "winnings",
        "prize",
        "sweepstakes",
        "lottery",
        "reward",
        "rewards",
        "bonus",
        "usdt",
        "nft",
        "inheritance",
        "beneficiary",
        "betting",
    ]
)
LURE_PHRASES = (
    "free spins",
    "you have won",
    "you've won",
    "claim your",
    "claim now",
    "crypto wallet",
    "million dollars",
    "million usd",
    "investment opportunit",
    "no deposit",
)


# Urgency a message takes back ("nothing urgent", "not urgent at all", "non-urgent") is no
# pressure on the reader; nor is the lifetime of a link or a code ("this link will expire in 24
# hours"), which every password reset and sign-in code states.
_TAKEN_BACK = re.compile(
    r"(?:\bnot|\bnothing|\bno|\bnon|n't|\bnever)(?:[ -]+(?:so|that|too|very|really|at all))?[ -]+$"
)
_EXPIRY = frozenset(["will expire", "has expired", "expires today", "expire today"])
_SHORT_LIVED = re.compile(r"\b(?:link|links|code|codes|token|invitation|invite)[ ]+$")


def urgency(text: str, words: frozenset[str] | None = None) -> str | None:
    """The first of :data:`URGENCY` that ``text`` says and means: an occurrence the text takes
    back, or one about a link's or code's lifetime, does not count."""
    for phrase, head in _with_first_words(URGENCY):
        if head is not None and words is not None and head not in words:
            continue
        start = text.find(phrase)
        while start >= 0:
            before = text[max(0, start - 24) : start]
            if not _TAKEN_BACK.search(before) and not (phrase in _EXPIRY and _SHORT_LIVED.search(before)):
                return phrase
            start = text.find(phrase, start + len(phrase))
    return None


def first_phrase(text: str, phrases: tuple[str, ...], words: frozenset[str] | None = None) -> str | None:
    """The first of ``phrases`` found in ``text``. With ``words`` (the text's word set), a
    phrase of several words is only searched for when its first word is among them."""
    for phrase, head in _with_first_words(phrases):
        if head is not None and words is not None and head not in words:
            continue
        if phrase in text:
            return phrase
    return None


@cache
def _with_first_words(phrases: tuple[str, ...]) -> tuple[tuple[str, str | None], ...]:
    """Each of ``phrases`` with its first word (None for a single word), split once per list."""
    return tuple((p, p.partition(" ")[0] if " " in p else None) for p in phrases)


def first_word(words: frozenset[str], vocabulary: frozenset[str]) -> str | None:
    hits = words & vocabulary
    return min(hits) if hits else None
