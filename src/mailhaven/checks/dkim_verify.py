"""DKIM verification (RFC 6376, RFC 8463 Ed25519) of every signature of a message, with dkimpy.

In: the message as received (header and body bytes), a `Lookup` (our cached async resolver).
Out: one `DKIMResult` per DKIM-Signature field, top first, at most `MAX_SIGNATURES` of them;
results are values (RFC 8601 §2.7.1: pass, fail, neutral, temperror, permerror), never
exceptions.

How it avoids blocking: dkimpy's own DNS is synchronous (or, in its async variant, a new aiodns
resolver per lookup), so we never let it near the network. The signatures are parsed first, the
keys they name (`s._domainkey.d`) are fetched concurrently through `Lookup` (cached, shared by
concurrent messages), and only then does dkimpy check hashes and signatures, reading the keys
from a dict. That CPU step (`verify_with_keys`) runs inline for small messages, where a thread
hop would cost more than the work; in the `VERIFY_THREADS` executor above `OFFLOAD_ABOVE`; and
above `PROCESS_ABOVE` in a worker process, because dkimpy canonicalises a body in regular-
expression calls that hold the GIL from start to end (`run_cpu`; the longest event-loop stalls
measured for each tier are in docs/benchmarks.md).

Limits: `MAX_SIGNATURES` (OpenDKIM's MaximumSignaturesToVerify is 3; we allow a few more, since
lists, ESPs and ARC sealers add their own): signatures past it are not looked at, so hundreds of
signatures cost no more than eight. Keys shorter than `MIN_RSA_BITS` fail (RFC 8301 §3.2).

RSA: dkimpy's RSASSA-PKCS1-v1_5 verification is pure Python (big-integer conversions in
loops), two thirds of a small message's verification time; `rsa_verify` does the same check
with the `cryptography` package (OpenSSL) and is installed as dkimpy's primitive when this
module is imported (`_use_openssl_rsa`), together with `load_key`, which keeps dkimpy's parse of
each key record (pure-Python ASN.1, the next largest cost) for reuse. Nothing else changes:
canonicalisation, hashing and tag checks stay dkimpy's; signing is not touched. The RFC 8463 vector and OpenDKIM-signed
messages verify through it in the tests.

SECURITY: everything here is attacker-controlled: tag lists, `h=`, `l=`, keys. dkimpy is the
field's parser; any exception it raises on hostile input is caught and becomes a result.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import logging
import multiprocessing
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim.util import parse_tag_value

from mailhaven.net.dns import DNSAnswer, DNSError, Records

Result = Literal["none", "pass", "fail", "neutral", "temperror", "permerror", "policy"]

#: Signatures verified per message (more are ignored).
MAX_SIGNATURES = 8
#: RFC 8301 §3.2: verifiers MUST NOT accept RSA keys shorter than 1024 bits.
MIN_RSA_BITS = 1024
#: Messages above this size are verified in a worker thread, not on the event loop.
OFFLOAD_ABOVE = 64 * 1024
#: Messages above this size are verified in a worker process: dkimpy canonicalises a body with
#: single regular-expression calls that hold the GIL for their whole length, so a thread would
#: still stall the loop for hundreds of milliseconds on a message of a few MiB.
PROCESS_ABOVE = 1024 * 1024
#: Worker threads for the verification arithmetic of large messages (the machine has few cores
#: and CPython's GIL: more threads would only queue behind each other).
VERIFY_THREADS = 2
#: Worker processes for the largest messages (started on first use).
VERIFY_PROCESSES = 2
#: Where the header block must end (a longer one is read this far).
HEADER_SCAN = 256 * 1024
#: How much of `b=` goes into `header.b` (RFC 6008 §4: at least 8 characters).
HEADER_B_LENGTH = 12

_EXECUTOR = concurrent.futures.ThreadPoolExecutor(
    max_workers=VERIFY_THREADS, thread_name_prefix="auth-verify"
)
_PROCESSES: concurrent.futures.ProcessPoolExecutor | None = None
#: dkimpy logs every failure at error level; those are results here, not errors.
QUIET_LOGGER = logging.getLogger("mailhaven.checks.dkimpy")
QUIET_LOGGER.propagate = False
QUIET_LOGGER.addHandler(logging.NullHandler())

T = TypeVar("T")

#: The digests DKIM signs with (RFC 6376 §3.3; rsa-sha1 is still verified, RFC 8301 §3.1).
_DIGESTS: dict[str, hashes.HashAlgorithm] = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}


@functools.lru_cache(maxsize=256)
def _rsa_key(modulus: int, exponent: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def rsa_verify(digest: Any, signature: bytes, public_key: Mapping[str, int]) -> bool:
    """dkimpy's `RSASSA_PKCS1_v1_5_verify(hash, signature, public_key)`, in OpenSSL: is
    `signature` the RFC 8017 §8.2.2 signature of `digest` (a hash object) under the key?"""
    try:
        key = _rsa_key(public_key["modulus"], public_key["publicExponent"])
        algorithm = _DIGESTS[digest.name]
        key.verify(bytes(signature), digest.digest(), padding.PKCS1v15(),
                   utils.Prehashed(algorithm))  # fmt: skip
    except (InvalidSignature, ValueError, KeyError, TypeError):
        return False
    return True


@functools.lru_cache(maxsize=256)
def evaluate_key(text: bytes) -> tuple[Any, int, bytes, bool]:
    """dkimpy's parse of a key record (its ASN.1 decoder is pure Python), once per record text;
    a record that does not parse raises each time (exceptions are not cached)."""
    return tuple(dkim.evaluate_pk(b"key", text))


def load_key(name: bytes, dnsfunc: Callable[..., bytes | str | None], timeout: int = 5) -> Any:
    """dkimpy's `load_pk_from_dns`, with the parse cached (`evaluate_key`)."""
    text = dnsfunc(name, timeout=timeout)
    if not text:
        raise dkim.KeyFormatError(f"missing public key: {name!r}")
    # dkimpy accepts a dnsfunc that answers str (ASCII) as well as bytes
    return evaluate_key(text.encode("ascii") if isinstance(text, str) else bytes(text))


def _use_openssl_rsa() -> None:
    dkim.RSASSA_PKCS1_v1_5_verify = rsa_verify
    dkim.load_pk_from_dns = load_key


_use_openssl_rsa()


class Lookup(Protocol):
    async def lookup(self, name: str, rdtype: str) -> DNSAnswer: ...


@dataclass(frozen=True, slots=True)
class DKIMResult:
    result: Result
    domain: str = ""  # d=
    selector: str = ""  # s=
    identity: str = ""  # i=
    algorithm: str = ""  # a=
    b: str = ""  # the start of b=, to tell signatures apart (RFC 6008)
    reason: str = ""


def _processes() -> concurrent.futures.ProcessPoolExecutor:
    global _PROCESSES
    if _PROCESSES is None:
        # spawn, not fork: the daemon has threads and an event loop a fork would copy
        context = multiprocessing.get_context("spawn")
        _PROCESSES = concurrent.futures.ProcessPoolExecutor(VERIFY_PROCESSES, context)
        atexit.register(_PROCESSES.shutdown, cancel_futures=True)  # before modules unload
    return _PROCESSES


async def run_cpu(work: Callable[..., T], *args: Any, size: int) -> T:
    """`work(*args)` where it stalls no one: inline for a message of `size` octets up to
    `OFFLOAD_ABOVE`, in a thread up to `PROCESS_ABOVE`, else in a worker process (`work`
    must then be a module-level function and its arguments picklable)."""
    if size <= OFFLOAD_ABOVE:
        return work(*args)
    loop = asyncio.get_running_loop()
    if size > PROCESS_ABOVE:
        try:
            return await loop.run_in_executor(_processes(), work, *args)
        except concurrent.futures.BrokenExecutor:
            pass  # a worker died (killed, out of memory): this once, use a thread
    return await loop.run_in_executor(_EXECUTOR, functools.partial(work, *args))


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace")


def key_name(selector: bytes, domain: bytes) -> str | None:
    """`selector._domainkey.domain` (RFC 6376 §3.6.2.1), or None when not a DNS name."""
    try:
        name = f"{selector.decode('ascii')}._domainkey.{domain.decode('ascii')}".rstrip(".")
    except UnicodeDecodeError:
        return None
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,253}", name) or ".." in name:
        return None
    return name


@dataclass(slots=True)
class _Signature:
    tags: dict[bytes, bytes] | None
    key: str | None
    problem: str = ""


def parse_signatures(
    headers: Sequence[tuple[bytes, bytes]], field: bytes, limit: int = MAX_SIGNATURES
) -> list[_Signature]:
    """The tags and key names of the first `limit` `field` header fields (DKIM-Signature,
    ARC-Seal, ARC-Message-Signature); a field whose tag list does not parse has `tags` None."""
    found: list[_Signature] = []
    for name, value in headers:
        if name.lower() != field:
            continue
        if len(found) == limit:
            break
        try:
            tags = parse_tag_value(value)
        except Exception as err:  # hostile tag lists: any dkimpy error is a syntax error
            found.append(_Signature(None, None, f"bad tag list: {type(err).__name__}"))
            continue
        key = key_name(tags.get(b"s", b""), tags.get(b"d", b""))
        found.append(_Signature(tags, key, "" if key else "no usable s= and d="))
    return found


async def fetch_keys(names: Sequence[str | None], lookup: Lookup) -> dict[str, DNSAnswer]:
    """The TXT answers for the key names, looked up at once (each name once)."""
    unique = sorted({n for n in names if n})
    answers = await asyncio.gather(*(lookup.lookup(n, "TXT") for n in unique))
    return dict(zip(unique, answers, strict=True))


def dnsfunc_for(keys: Mapping[str, DNSAnswer]) -> Callable[..., bytes | None]:
    """dkimpy's `dnsfunc`, answering from the prefetched keys (never from the network)."""

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        answer = keys.get(text.lower().rstrip("."))
        if isinstance(answer, Records) and answer.values:
            return answer.values[0].encode("latin-1")
        return None

    return dnsfunc


def header_fields(message: bytes) -> list[tuple[bytes, bytes]]:
    """The header fields of `message` (dkimpy's parser, on the header block only: cheap)."""
    end = -1
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = message.find(sep, 0, HEADER_SCAN)
        if at >= 0 and (end < 0 or at < end):
            end = at + len(sep)
    head = message[:end] if end >= 0 else message[:HEADER_SCAN]
    try:
        headers, _ = dkim.rfc822_parse(head)
    except Exception:  # not a header block dkimpy can read
        return []
    return list(headers)


async def verify(message: bytes, lookup: Lookup) -> list[DKIMResult]:
    """One result per DKIM-Signature (top first, at most `MAX_SIGNATURES`); [] for none."""
    signatures = parse_signatures(header_fields(message), b"dkim-signature")
    if not signatures:
        return []
    keys = await fetch_keys([s.key for s in signatures], lookup)
    return await run_cpu(verify_with_keys, message, signatures, keys, size=len(message))


def verify_with_keys(
    message: bytes, signatures: list[_Signature], keys: Mapping[str, DNSAnswer]
) -> list[DKIMResult]:
    """The CPU part of `verify`, with the keys already fetched (any thread or process)."""
    try:
        parsed = dkim.DKIM(message, logger=QUIET_LOGGER, minkey=MIN_RSA_BITS)
    except Exception:
        return [DKIMResult("neutral", reason="message cannot be parsed")] * len(signatures)
    dnsfunc = dnsfunc_for(keys)
    return [_verify_one(parsed, i, s, keys, dnsfunc) for i, s in enumerate(signatures)]


def _verify_one(
    parsed: Any, idx: int, sig: _Signature, keys: Mapping[str, DNSAnswer],
    dnsfunc: Callable[..., bytes | None],
) -> DKIMResult:  # fmt: skip
    if sig.tags is None:
        return DKIMResult("neutral", reason=sig.problem)
    tags = sig.tags
    base = DKIMResult(
        "none",
        domain=_text(tags.get(b"d", b"")).lower(),
        selector=_text(tags.get(b"s", b"")),
        identity=_text(tags.get(b"i", b"")),
        algorithm=_text(tags.get(b"a", b"")),
        b=re.sub(r"\s+", "", _text(tags.get(b"b", b"")))[:HEADER_B_LENGTH],
    )

    def result(value: Result, reason: str) -> DKIMResult:
        return DKIMResult(value, base.domain, base.selector, base.identity, base.algorithm,
                          base.b, reason)  # fmt: skip

    if sig.key is None:
        return result("neutral", sig.problem)
    answer = keys.get(sig.key)
    if isinstance(answer, DNSError):
        return result("temperror", f"key lookup: {answer.reason}")
    if not isinstance(answer, Records) or not answer.values:
        return result("permerror", "no key for signature")
    try:
        evaluate_key(answer.values[0].encode("latin-1"))
    except Exception as err:  # not a key: bad base64, bad ASN.1, unknown k=, p= empty
        return result("permerror", f"bad key: {short_reason(err)}")
    try:
        ok = parsed.verify(idx=idx, dnsfunc=dnsfunc)
    except dkim.KeyFormatError as err:
        return result("permerror", f"bad key: {short_reason(err)}")
    except (dkim.MessageFormatError, dkim.ParameterError) as err:
        return result("neutral", f"bad signature: {short_reason(err)}")
    except dkim.ValidationError as err:
        if "body hash mismatch" in str(err):
            return result("fail", "body hash did not verify")
        return result("permerror", short_reason(err))
    except Exception as err:  # anything else dkimpy trips over on hostile input
        return result("permerror", f"cannot verify: {type(err).__name__}")
    if ok:
        return result("pass", "")
    return result("fail", "signature did not verify")


def short_reason(err: BaseException) -> str:
    """An exception's text for a log or a header comment: one line, bounded."""
    return re.sub(r"\s+", " ", str(err))[:120]
