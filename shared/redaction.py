"""Keeping connection secrets out of everything pgcg prints or logs.

A DSN is redacted by parsing it the way libpq does (psycopg's conninfo), not by pattern:
patterns miss `postgresql://:pw@host`, `password = pw`, `password='p w'` and more. Two
traps libpq sets on top:
- an unencoded `@` or `/` in a URL's password: libpq ends the user info at the first `@`
  (or sees none before a `/`) and reads the rest of the password as the host, port or
  database, which then show up in its own error messages. Such a URL is not shown at all,
  and every piece of what could be its password (up to the last `@`) counts as secret.
- libpq quotes pieces of a connection string it cannot parse in its error messages
  (`missing "=" after "pw"`), and those pieces can be parts of a password.
A DSN that does not parse is never echoed; an error about it keeps only the quoted words
that are libpq option names.

Log records are free text, so the log formatters mask the passwords of every DSN this
process connected with (`remember`), plus anything shaped like a DSN password.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

MASK = "***"
UNPARSEABLE = "(a connection string that does not parse; not shown)"
MISREAD = (
    "(a connection URL whose user info has an unencoded @ or /, which libpq misreads; not shown)"
)

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


def _suspect_pieces(url: str) -> set[str]:
    """Everything that could be the URL's password, read conservatively: the user info up
    to the last `@`, its password whole and split where libpq might have split it."""
    userinfo, at, _ = url.partition("://")[2].rpartition("@")
    password = userinfo.partition(":")[2] if at else ""
    pieces = {password, unquote(password), *re.split(r"[@:/?#]", password)}
    return {p for p in pieces if p}


def _mask_userinfo(url: str) -> str:
    """The URL with its password masked where libpq reads it: the user info ends at the
    first `@`, and there is none if a `/` comes first."""
    scheme, _, rest = url.partition("://")
    end = next((i for i, c in enumerate(rest) if c in "@/"), None)
    if end is None or rest[end] != "@":
        return url
    user, colon, _ = rest[:end].partition(":")
    return f"{scheme}://{user}{':' + MASK if colon else ''}{rest[end:]}"


def _mask_query(url: str) -> str:
    base, question, query = url.partition("?")
    if not question:
        return url
    pairs = []
    for pair in query.split("&"):
        name, equals, _ = pair.partition("=")
        pairs.append(f"{name}={MASK}" if equals and unquote(name) in SECRET_OPTIONS else pair)
    return f"{base}?{'&'.join(pairs)}"


def _misread(params: dict[str, str]) -> bool:
    """Whether libpq's reading of a URL took part of its user info for something else:
    the rest of a password cut at an @ lands in the host, one cut at a / in the database
    (with the @ that ended the user info)."""
    return any("@" in params.get(k, "") for k in ("host", "hostaddr", "port", "dbname"))


def parse(dsn: str) -> tuple[dict[str, str] | None, set[str]]:
    """(libpq's reading of the DSN, or None if it does not parse; every secret in it)."""
    hidden = _suspect_pieces(dsn) if _is_url(dsn) else set()
    try:
        params = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except psycopg.Error:
        return None, hidden
    hidden |= {v for k, v in params.items() if k in SECRET_OPTIONS and v}
    return params, hidden


def redact(dsn: str) -> str:
    """The DSN with every secret masked, in the form it was given: safe to print."""
    params, _ = parse(dsn)
    if params is None:
        return UNPARSEABLE
    if _is_url(dsn):
        return MISREAD if _misread(params) else _mask_query(_mask_userinfo(dsn))
    if not any(k in SECRET_OPTIONS for k in params):
        return dsn
    return make_conninfo("", **{k: MASK if k in SECRET_OPTIONS else v for k, v in params.items()})


def misread_url(dsn: str) -> bool:
    """Whether libpq reads part of this URL's user info as its host, port or database."""
    params, _ = parse(dsn)
    return _is_url(dsn) and params is not None and _misread(params)


def secrets_of(dsn: str) -> set[str]:
    """Every secret value the DSN holds, including fragments libpq may quote in errors."""
    return parse(dsn)[1]


def remember(dsn: str) -> None:
    """Mask this DSN's secrets in every log line from now on (see `scrub`)."""
    global _known_longest_first
    fresh = {s for s in secrets_of(dsn) if len(s) >= _MIN_FREE_TEXT_SECRET} - _known
    if fresh:
        _known.update(fresh)
        _known_longest_first = _longest_first(_known)


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
# Each with the text it needs to match at all: most log lines have neither, and a
# substring test costs far less than a scan for the pattern.
_SECRET_NAMES = "|".join(sorted(SECRET_OPTIONS))
_TEXT_PATTERNS = (
    ("://", re.compile(r"(postgres(?:ql)?://[^\s:@/]*):\S*@"), rf"\1:{MASK}@"),
    (
        "=",
        re.compile(rf"\b((?:{_SECRET_NAMES})\s*=\s*)('(?:[^'\\]|\\.)*'?|\S+)", re.IGNORECASE),
        rf"\1{MASK}",
    ),
    ("=", re.compile(rf"([?&](?:{_SECRET_NAMES})=)[^&\s]*", re.IGNORECASE), rf"\1{MASK}"),
)


def scrub(text: str, extra: set[str] | None = None) -> str:
    """Free text (a log line, a traceback) with known secrets and DSN passwords masked."""
    secrets = _known_longest_first if not extra else _longest_first(_known | extra)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    for needs, pattern, replacement in _TEXT_PATTERNS:
        if needs in text:
            text = pattern.sub(replacement, text)
    return text


def _longest_first(secrets: set[str]) -> list[str]:
    # Longest first: a secret that contains another is masked whole.
    return sorted((s for s in secrets if len(s) >= _MIN_FREE_TEXT_SECRET), key=len, reverse=True)


_known_longest_first: list[str] = []
