"""Keeping connection secrets out of everything pgcg prints or logs.

A DSN is redacted by parsing it the way libpq does (psycopg's conninfo), not by pattern:
patterns miss `postgresql://:pw@host`, `password = pw`, `password='p w'` and more. Two
traps libpq sets on top:
- an unencoded `@` in a URL password: libpq ends the password at the first `@` and takes
  the rest for the host name, which then shows up in its own error messages. The URL's
  user info is therefore taken to run up to the last `@`, the conservative reading.
- libpq quotes pieces of a connection string it cannot parse in its error messages
  (`missing "=" after "pw"`), and those pieces can be parts of a password.
A DSN that does not parse is never echoed; an error about it keeps only the quoted words
that are libpq option names.

Log records are free text, so the log formatters mask the passwords of every DSN this
process connected with (`remember`), plus anything shaped like a DSN password.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

MASK = "***"
UNPARSEABLE = "(a connection string that does not parse; not shown)"

# Options whose values are secrets (libpq's, including ones newer than our libpq).
SECRET_OPTIONS = frozenset(
    {"password", "sslpassword", "scram_client_key", "scram_server_key", "oauth_client_secret"}
)
_URL_PREFIXES = ("postgresql://", "postgres://")
# Shorter secrets are masked only where they stand as a DSN's password: replacing every
# "pw" in a log line would make the log unreadable and hide nothing worth hiding.
_MIN_FREE_TEXT_SECRET = 4

_known: set[str] = set()


def _option_names() -> frozenset[str]:
    return frozenset(o.keyword.decode() for o in pq.Conninfo.get_defaults())


_OPTIONS = _option_names() | SECRET_OPTIONS


def _is_url(dsn: str) -> bool:
    return dsn.startswith(_URL_PREFIXES)


def _mask_url(dsn: str) -> tuple[str, set[str]]:
    """The URL with the password of its user info masked, and what was masked.

    The user info runs up to the last `@`: an unencoded `@` in the password must not
    leave the password's tail in what we take for the host.
    """
    scheme, _, rest = dsn.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        return dsn, set()
    user, colon, password = userinfo.partition(":")
    hidden = {password, unquote(password)}
    # What libpq itself takes for the password and host, so its messages can be cleaned.
    hidden |= {piece for piece in re.split(r"[@:/?#]", password) if piece}
    safe_user = quote(unquote(user), safe="")
    masked = f"{scheme}://{safe_user}{':' + MASK if colon else ''}@{hostpart}"
    return masked, {h for h in hidden if h}


def _mask_query(url: str) -> str:
    base, question, query = url.partition("?")
    if not question:
        return url
    pairs = []
    for pair in query.split("&"):
        name, equals, _ = pair.partition("=")
        pairs.append(f"{name}={MASK}" if equals and unquote(name) in SECRET_OPTIONS else pair)
    return f"{base}?{'&'.join(pairs)}"


def parse(dsn: str) -> tuple[dict[str, str] | None, set[str]]:
    """(libpq's reading of the DSN, or None if it does not parse; every secret in it)."""
    hidden = _mask_url(dsn)[1] if _is_url(dsn) else set()
    try:
        params = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except psycopg.Error:
        return None, hidden
    hidden |= {v for k, v in params.items() if k in SECRET_OPTIONS and v}
    return params, hidden


def redact(dsn: str) -> str:
    """The DSN with every secret masked, in the form it was given: safe to print."""
    if _is_url(dsn):
        masked, _ = _mask_url(dsn)
        try:
            conninfo_to_dict(masked)
        except psycopg.Error:
            return UNPARSEABLE
        return _mask_query(masked)
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return UNPARSEABLE
    if not any(k in SECRET_OPTIONS for k in params):
        return dsn
    return make_conninfo("", **{k: MASK if k in SECRET_OPTIONS else v for k, v in params.items()})


def misread_url(dsn: str) -> bool:
    """Whether libpq reads this URL's host out of its password (an unencoded `@`)."""
    params, _ = parse(dsn)
    return _is_url(dsn) and params is not None and "@" in params.get("host", "")


def secrets_of(dsn: str) -> set[str]:
    """Every secret value the DSN holds, including fragments libpq may quote in errors."""
    return parse(dsn)[1]


def remember(dsn: str) -> None:
    """Mask this DSN's secrets in every log line from now on (see `scrub`)."""
    _known.update(s for s in secrets_of(dsn) if len(s) >= _MIN_FREE_TEXT_SECRET)


# libpq quotes in double quotes, psycopg's own host resolution in single ones.
_QUOTED = re.compile(r""""([^"]*)"|'([^']*)'""")


def clean_driver_message(message: str, dsn: str | None) -> str:
    """A libpq error message about `dsn` with any piece of a secret masked.

    libpq puts the pieces it quotes in quotes: for a DSN that parses, a quoted
    piece that overlaps a secret is masked; for one that does not, every quoted piece
    but an option name is (libpq may have split a password anywhere).
    """
    if dsn is None:
        return scrub(message)
    params, hidden = parse(dsn)

    def overlaps(piece: str, secret: str) -> bool:
        # Tiny pieces only count when whole: "p" is in too many words.
        return piece == secret or any(
            len(a) >= 3 and a in b for a, b in ((secret, piece), (piece, secret))
        )

    def mask(match: re.Match[str]) -> str:
        quote_mark, piece = match.group(0)[0], match.group(1) or match.group(2) or ""
        if params is None:
            keep = piece in _OPTIONS or piece == "="
        else:
            keep = not any(overlaps(piece, h) for h in hidden)
        return match.group(0) if keep else f"{quote_mark}{MASK}{quote_mark}"

    return scrub(_QUOTED.sub(mask, message), hidden)


# Free-text fallback for DSNs we never connected with: URL user info (up to the last
# `@` of the word), keyword `password = value` (quoted or not) and `?password=` queries.
_SECRET_NAMES = "|".join(sorted(SECRET_OPTIONS))
_TEXT_PATTERNS = (
    (re.compile(r"(postgres(?:ql)?://[^\s:@/]*):\S*@"), rf"\1:{MASK}@"),
    (
        re.compile(rf"\b((?:{_SECRET_NAMES})\s*=\s*)('(?:[^'\\]|\\.)*'?|\S+)", re.IGNORECASE),
        rf"\1{MASK}",
    ),
    (re.compile(rf"([?&](?:{_SECRET_NAMES})=)[^&\s]*", re.IGNORECASE), rf"\1{MASK}"),
)


def scrub(text: str, extra: set[str] | None = None) -> str:
    """Free text (a log line, a traceback) with known secrets and DSN passwords masked."""
    for secret in sorted(_known | (extra or set()), key=len, reverse=True):
        if len(secret) >= _MIN_FREE_TEXT_SECRET:
            text = text.replace(secret, MASK)
    for pattern, replacement in _TEXT_PATTERNS:
        text = pattern.sub(replacement, text)
    return text
