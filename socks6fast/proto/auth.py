"""Username/password secrets: salted scrypt hashes and a user store (RFC 1929, draft-11 section
"Username/Password Authentication").

Strategy: secrets are never stored in clear. A configured secret is a self-describing string
``scrypt$n=16384,r=8,p=1$<salt>$<hash>`` (salt and hash in unpadded standard base64), so
parameters can be raised later without breaking old entries. Verifying one password costs
~50 ms of CPU and 16 MiB of memory on purpose (that is what makes a stolen config file
expensive to attack), which is 250 times the proxy's per-connection CPU budget (200 us). With
0-RTT authentication every request carries the credentials again (draft-11 section
"Authentication Data options"), so `UserStore` caches *successful* verifications under an
HMAC of (user, password) keyed with a per-process random key; see `UserStore` for why that
is safe.

`FailedAuthLimiter` bounds the scrypt work password guessing can cause (hardening issue 12
defect 5, AUTH-05): failures per client address and per user name, and checks per second in
all; `FailedAuthLimiter.admit` answers one check with an `AuthAdmission`.

Pure: no I/O, no clock (time enters as ``now``); the standard library only (``hashlib.scrypt``,
which OpenSSL provides; until issue 14 the scrypt of ``cryptography``, which gives the same
bytes, so existing hashes keep verifying).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from ..constants import MAX_USERPASS_LENGTH

__all__ = [
    "AuthAdmission",
    "DEFAULT_SCRYPT_N",
    "DEFAULT_SCRYPT_P",
    "DEFAULT_SCRYPT_R",
    "FailedAuthLimiter",
    "ScryptHash",
    "UserStore",
    "hash_password",
    "new_hash",
    "parse_hash",
    "verify_password",
]

#: scrypt CPU/memory cost (2^14: the parameter set RFC 7914 section 2 suggests for interactive logins).
DEFAULT_SCRYPT_N = 2**14
#: scrypt block size.
DEFAULT_SCRYPT_R = 8
#: scrypt parallelisation.
DEFAULT_SCRYPT_P = 1
#: Bytes of random salt in a new hash.
SALT_LENGTH = 16
#: Bytes of derived key in a new hash.
HASH_LENGTH = 32

_SCHEME = "scrypt"
# Bounds on what a config file may ask for: a typo such as n=2**30 must not freeze the proxy
# (or exhaust memory) on the first login.
_MIN_SALT_LENGTH = 8
_MIN_HASH_LENGTH = 16
_MAX_HASH_LENGTH = 64
_MAX_SCRYPT_N = 2**20
_MAX_SCRYPT_R = 32
_MAX_SCRYPT_P = 16
_MAX_SCRYPT_MEMORY = 2**28  # bytes: scrypt needs 128 * n * r of them
_MAX_SCRYPT_WORK = 2**25  # n * r * p; the default is 2**17
#: Successful verifications remembered at most (then the cache starts over).
MAX_CACHE_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class ScryptHash:
    """A parsed ``scrypt$...`` secret."""

    n: int
    """CPU/memory cost, a power of 2."""
    r: int
    """Block size."""
    p: int
    """Parallelisation."""
    salt: bytes
    """Random salt."""
    digest: bytes
    """The derived key to compare with."""

    def encode(self) -> str:
        """Return the self-describing string form (what config files hold)."""
        return f"{_SCHEME}$n={self.n},r={self.r},p={self.p}${_b64encode(self.salt)}${_b64encode(self.digest)}"

    def derive(self, password: bytes) -> bytes:
        """Run scrypt over ``password`` with this hash's salt and parameters."""
        # The standard library's scrypt (OpenSSL's EVP_PBE_scrypt, RFC 7914), so hashing needs
        # no third-party package (issue 14 item 6); it gives the bytes cryptography's Scrypt
        # gave, so hashes made before still verify. OpenSSL refuses more than maxmem bytes
        # (32 MiB by default); parse_hash already bounds 128 * n * r by _MAX_SCRYPT_MEMORY.
        return hashlib.scrypt(
            password,
            salt=self.salt,
            n=self.n,
            r=self.r,
            p=self.p,
            maxmem=_scrypt_maxmem(self.n, self.r, self.p),
            dklen=len(self.digest),
        )


def _scrypt_maxmem(n: int, r: int, p: int) -> int:
    """The ``maxmem`` OpenSSL needs for these parameters: its own estimate (crypto/evp/pbe_scrypt.c:
    128 * r * (n + p + 2) bytes) plus slack, so that no hash parse_hash accepts is refused."""
    return 128 * r * (n + p + 2) + (1 << 20)


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    # Unpadded standard base64 (the PHC string format convention); padding is restored here.
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def parse_hash(stored: str) -> ScryptHash:
    """Parse and validate a stored secret.

    Args:
        stored: a string of the form ``scrypt$n=16384,r=8,p=1$<salt b64>$<hash b64>``.

    Returns:
        The parsed hash.

    Raises:
        ValueError: the string is not a valid scrypt hash; the message says what is wrong
            (and never repeats the string itself, which is secret-ish).
    """
    parts = stored.split("$")
    if len(parts) != 4 or parts[0] != _SCHEME:
        raise ValueError('is not of the form "scrypt$n=N,r=R,p=P$<salt>$<hash>"')
    params: dict[str, int] = {}
    for item in parts[1].split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in ("n", "r", "p") or key in params or not value.isdigit():
            raise ValueError('has scrypt parameters that are not exactly "n=N,r=R,p=P"')
        params[key] = int(value)
    if len(params) != 3:
        raise ValueError('has scrypt parameters that are not exactly "n=N,r=R,p=P"')
    n, r, p = params["n"], params["r"], params["p"]
    if n < 2 or n & (n - 1) or n > _MAX_SCRYPT_N:
        raise ValueError(f"has scrypt n={n}, which is not a power of 2 between 2 and {_MAX_SCRYPT_N}")
    if not 1 <= r <= _MAX_SCRYPT_R or not 1 <= p <= _MAX_SCRYPT_P:
        raise ValueError(f"has scrypt r={r}, p={p} outside r 1-{_MAX_SCRYPT_R}, p 1-{_MAX_SCRYPT_P}")
    if n >= 1 << (16 * r):
        # RFC 7914 section 2: N < 2^(128 * r / 8); OpenSSL (hashlib.scrypt) refuses the rest.
        raise ValueError(f"has scrypt n={n}, which RFC 7914 requires below 2^(16 * r) = {1 << (16 * r)}")
    if 128 * n * r > _MAX_SCRYPT_MEMORY or n * r * p > _MAX_SCRYPT_WORK:
        raise ValueError(f"has scrypt parameters n={n}, r={r}, p={p} too costly to verify per login")
    try:
        salt = _b64decode(parts[2])
        digest = _b64decode(parts[3])
    except (binascii.Error, ValueError):
        raise ValueError("has a salt or hash that is not base64") from None
    if len(salt) < _MIN_SALT_LENGTH:
        raise ValueError(f"has a salt shorter than {_MIN_SALT_LENGTH} bytes")
    if not _MIN_HASH_LENGTH <= len(digest) <= _MAX_HASH_LENGTH:
        raise ValueError(f"has a hash that is not {_MIN_HASH_LENGTH}-{_MAX_HASH_LENGTH} bytes long")
    return ScryptHash(n=n, r=r, p=p, salt=salt, digest=digest)


def new_hash(
    password: str | bytes,
    *,
    n: int = DEFAULT_SCRYPT_N,
    r: int = DEFAULT_SCRYPT_R,
    p: int = DEFAULT_SCRYPT_P,
) -> ScryptHash:
    """Hash a password with a fresh random salt (`hash_password` gives its string form).

    Args:
        password: the password; text is encoded as UTF-8.
        n: scrypt cost (power of 2). Lower it only in tests.
        r: scrypt block size.
        p: scrypt parallelisation.

    Raises:
        ValueError: the parameters are outside what `parse_hash` accepts.
    """
    if isinstance(password, str):
        password = password.encode("utf-8")
    placeholder = ScryptHash(n=n, r=r, p=p, salt=secrets.token_bytes(SALT_LENGTH), digest=bytes(HASH_LENGTH))
    parse_hash(placeholder.encode())  # same parameter bounds as verification
    return ScryptHash(n=n, r=r, p=p, salt=placeholder.salt, digest=placeholder.derive(password))


def hash_password(
    password: str | bytes,
    *,
    n: int = DEFAULT_SCRYPT_N,
    r: int = DEFAULT_SCRYPT_R,
    p: int = DEFAULT_SCRYPT_P,
) -> str:
    """Hash a password with a fresh random salt.

    Returns:
        The self-describing string ``scrypt$n=...,r=...,p=...$<salt>$<hash>`` (see `new_hash`
        for the arguments).

    Raises:
        ValueError: the parameters are outside what `parse_hash` accepts.
    """
    return new_hash(password, n=n, r=r, p=p).encode()


def verify_password(stored: str | ScryptHash, password: bytes) -> bool:
    """Check a password against a stored hash in constant time.

    Args:
        stored: the stored secret (string or parsed form).
        password: the password as received.

    Returns:
        True when the password matches.

    Raises:
        ValueError: ``stored`` is not a valid hash.
    """
    parsed = parse_hash(stored) if isinstance(stored, str) else stored
    return hmac.compare_digest(parsed.derive(password), parsed.digest)  # constant time


class UserStore:
    """The configured users (name -> scrypt hash) and the authentication check.

    Cache safety: after a successful scrypt verification the store remembers
    ``HMAC-SHA256(k, len(user) || user || password)`` where ``k`` is 32 random bytes drawn
    when the store is created and never leaves this process's memory. That value reveals
    nothing usable: without ``k`` it cannot be brute-forced offline (unlike a fast unsalted
    hash), it is never written anywhere, and the clear password is not kept at all. A hit
    proves the caller knows a password that scrypt accepted before, so it grants exactly
    what a fresh verification would. Each entry also remembers the hash string it was
    checked against and is only honoured while the user still has that exact hash, and
    `reload` drops the whole cache, so a changed or removed user is never let in from the
    cache. Failures are never cached (a cache must not turn into a password-guessing
    oracle), and the size is bounded.

    Timing: an unknown user name (or one that is not valid UTF-8) is verified against a
    random dummy hash with default parameters, so "no such user" costs the same scrypt
    work as "wrong password" and the timing does not reveal which user names exist.
    """

    __slots__ = ("_cache", "_cache_key", "_dummy", "_users")

    def __init__(self, users: Mapping[str, str | ScryptHash] | None = None) -> None:
        """Create a store.

        Args:
            users: user name -> ``scrypt$...`` hash string, or the hash already parsed
                (`socks6fast.config` parses each once, when the file is read).

        Raises:
            ValueError: a hash is malformed (the message names the user).
        """
        self._users: dict[str, ScryptHash] = {}
        self._cache: dict[bytes, tuple[str, ScryptHash]] = {}
        self._cache_key = secrets.token_bytes(32)
        # Random salt and digest: no password matches it, and building it costs no scrypt run.
        self._dummy = ScryptHash(
            n=DEFAULT_SCRYPT_N,
            r=DEFAULT_SCRYPT_R,
            p=DEFAULT_SCRYPT_P,
            salt=secrets.token_bytes(SALT_LENGTH),
            digest=secrets.token_bytes(HASH_LENGTH),
        )
        self.reload(users or {})

    def reload(self, users: Mapping[str, str | ScryptHash]) -> None:
        """Replace every user and drop the verification cache.

        Args:
            users: user name -> ``scrypt$...`` hash string, or the hash already parsed.

        Raises:
            ValueError: a hash is malformed; the store is left unchanged.
        """
        parsed: dict[str, ScryptHash] = {}
        for name, stored in users.items():
            if isinstance(stored, ScryptHash):
                parsed[name] = stored
                continue
            try:
                parsed[name] = parse_hash(stored)
            except ValueError as exc:
                raise ValueError(f"user {name!r}: the secret {exc}") from None
        self._users = parsed
        self._cache = {}
        self._cache_key = secrets.token_bytes(32)

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, name: object) -> bool:
        return name in self._users

    @property
    def required(self) -> bool:
        """True when authentication is required: at least one user is configured."""
        return bool(self._users)

    def authenticate_cached(self, username: bytes, password: bytes) -> str | None:
        """The user name when these exact credentials were verified before and the user is
        unchanged; None otherwise (then call `authenticate`). Never runs scrypt, so a
        server can call it on its event loop and send only cache misses to a thread: with
        0-RTT authentication every request carries the credentials (draft-11,
        "Authentication Data options"), and a thread hop costs more than the lookup."""
        return self._lookup(self._cache_entry(username, password))

    def check_key(self, username: bytes, password: bytes) -> bytes:
        """A keyed hash naming these exact credentials (not reversible, not comparable across
        stores): what an adapter uses to run one scrypt check for identical concurrent logins."""
        return self._cache_entry(username, password)

    def _cache_entry(self, username: bytes, password: bytes) -> bytes:
        # hmac.digest: the one-shot C path (a few times faster than hmac.new().digest()).
        return hmac.digest(self._cache_key, len(username).to_bytes(2, "big") + username + password, "sha256")

    def _lookup(self, key: bytes) -> str | None:
        cached = self._cache.get(key)
        if cached is None:
            return None
        name, verified = cached
        if self._users.get(name) is verified:
            return name
        del self._cache[key]  # the user was changed or removed by a reload
        return None

    def authenticate(self, username: bytes, password: bytes) -> str | None:
        """Check RFC 1929 credentials.

        Args:
            username: UNAME as received (1-255 bytes, UTF-8 expected).
            password: PASSWD as received.

        Returns:
            The user name on success, None otherwise.
        """
        key = self._cache_entry(username, password)
        name = self._lookup(key)
        if name is not None:
            return name
        try:
            name = username.decode("utf-8")
        except UnicodeDecodeError:
            name = ""
        stored = self._users.get(name)
        if stored is None or not 1 <= len(password) <= MAX_USERPASS_LENGTH:
            # Same work as a real check: no timing oracle for which user names exist.
            verify_password(self._dummy, password)
            return None
        if not verify_password(stored, password):
            return None
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache.clear()
        self._cache[key] = (name, stored)
        return name


class _Buckets:
    """Token buckets by key: at most ``burst`` tokens each, one regained every ``interval``
    seconds. Full buckets are forgotten; at ``max_keys`` the full ones go first, then the
    oldest, so memory stays bounded whatever the number of keys."""

    __slots__ = ("_buckets", "burst", "interval", "max_keys")

    def __init__(self, burst: int, interval: float, max_keys: int) -> None:
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, time of last update]

    def available(self, key: str, now: float) -> bool:
        """True when ``key`` has a token (always, with a burst of 0: no limit)."""
        if self.burst <= 0:
            return True
        bucket = self._buckets.get(key)
        if bucket is None:
            return True
        bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) / self.interval)
        bucket[1] = now
        return bucket[0] >= 1.0

    def take(self, key: str, now: float) -> None:
        """Spend a token of ``key`` (after `available` said there is one)."""
        if self.burst <= 0:
            return
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._prune(now)
            bucket = self._buckets[key] = [float(self.burst), now]
        bucket[0] -= 1.0

    def give(self, key: str) -> None:
        """Give a token back (a check that succeeded)."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket[0] += 1.0
            if bucket[0] >= self.burst:
                del self._buckets[key]  # full again: nothing to remember

    def _prune(self, now: float) -> None:
        burst, interval = float(self.burst), self.interval
        for key, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) / interval >= burst:
                del self._buckets[key]
        while len(self._buckets) >= self.max_keys:
            del self._buckets[next(iter(self._buckets))]  # the oldest entry

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True, slots=True)
class AuthAdmission:
    """`FailedAuthLimiter.admit`'s answer for one password check."""

    refused: str | None
    """Why the check is not run (the login then fails at once, without scrypt); None: run it."""
    delay: float = 0.0
    """Seconds to wait for a check slot before running it."""
    address: str | None = None
    """The address bucket the check took a token from (None: its budget was spent)."""
    user: str | None = None
    """The user-name bucket it took a token from."""


class FailedAuthLimiter:
    """Limits on password checks (scrypt costs ~35-50 ms of CPU each; hardening issue 12
    defect 5): failures per client address, failures per user name, and checks per second
    in all.

    * Per user name: ``user_burst`` failures, then one more per ``user_interval`` seconds;
      past that a login for the name fails at once. This is what stops a guesser spread
      over many addresses (NAT pools, botnets) from trying one account at full speed.
    * Per client address (IPv6: per /64, the block one host usually controls; IPv4-mapped
      as IPv4): ``burst`` failures, then one per ``interval`` seconds. An address whose
      budget is spent is not refused outright (a user behind the same NAT as a guesser
      must still get in): its checks still run, but only when a check slot is free at
      once (no waiting), so a guesser cannot crowd out other clients.
    * In all: ``checks_per_second`` (a burst of one second's worth). A check from an
      address in good standing waits up to ``max_wait`` seconds for a slot; when none is
      free by then the login fails ("busy").

    Every check takes its tokens before scrypt runs (parallel guesses cannot overdraw);
    a successful one gives back the user and address tokens it took: only failures count.
    Successful credentials cached by `UserStore.authenticate_cached` never reach the
    limiter (they cost no scrypt run), so a user who logged in before keeps working
    while an attacker has spent the budget of their name. A budget of 0 (or a rate of 0)
    disables that limit.
    """

    __slots__ = ("_addresses", "_tat", "_users", "checks_per_second", "max_wait")

    def __init__(
        self,
        burst: int,
        interval: float,
        *,
        user_burst: int = 0,
        user_interval: float = 10.0,
        checks_per_second: float = 0.0,
        max_wait: float = 2.0,
        max_clients: int = 65536,
    ) -> None:
        self._addresses = _Buckets(burst, interval, max_clients)
        self._users = _Buckets(user_burst, user_interval, max_clients)
        self.checks_per_second = checks_per_second
        self.max_wait = max_wait
        self._tat = float("-inf")  # GCRA: theoretical arrival time of the next check

    def configure(
        self, burst: int, interval: float, user_burst: int, user_interval: float, checks_per_second: float
    ) -> None:
        """Change the limits (configuration reload); the buckets are kept."""
        self._addresses.burst, self._addresses.interval = burst, interval
        self._users.burst, self._users.interval = user_burst, user_interval
        self.checks_per_second = checks_per_second

    @staticmethod
    def address_key(client_ip: str) -> str:
        """The bucket of a client address: IPv4 as is, IPv4-mapped as IPv4, IPv6 per /64."""
        if ":" not in client_ip:
            return client_ip
        try:
            address = ipaddress.IPv6Address(client_ip.split("%", 1)[0])
        except ValueError:
            return client_ip
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))

    def admit(self, client_ip: str, user: str, now: float) -> AuthAdmission:
        """Decide about one password check of ``user`` from ``client_ip`` at time ``now``."""
        if not self._users.available(user, now):
            return AuthAdmission("too many failed logins for this user name")
        address = self.address_key(client_ip)
        good_standing = self._addresses.available(address, now)
        delay = self._schedule(now, patient=good_standing)
        if delay is None:
            if good_standing:
                return AuthAdmission("password checks busy (server.auth_checks_per_second)")
            return AuthAdmission("too many failed logins from this address")
        self._users.take(user, now)
        if good_standing:
            self._addresses.take(address, now)
        return AuthAdmission(
            None,
            delay,
            address if good_standing and self._addresses.burst > 0 else None,
            user if self._users.burst > 0 else None,
        )

    def _schedule(self, now: float, *, patient: bool) -> float | None:
        """A slot under checks_per_second (GCRA, a burst of one second's worth): the
        seconds to wait for it, or None when there is none soon enough. An impatient check
        (its address spent its budget) takes only a slot free now: it uses idle capacity,
        and once checks in good standing queue, it gets none."""
        rate = self.checks_per_second
        if rate <= 0:
            return 0.0
        spacing = 1.0 / rate
        tolerance = (max(1.0, rate) - 1.0) * spacing
        tat = max(self._tat, now)
        delay = max(0.0, tat - tolerance - now)
        if delay > (self.max_wait if patient else 0.0):
            return None
        self._tat = tat + spacing
        return delay

    def refund(self, admission: AuthAdmission) -> None:
        """The check succeeded: give back the tokens it took (only failures count)."""
        if admission.address is not None:
            self._addresses.give(admission.address)
        if admission.user is not None:
            self._users.give(admission.user)

    def __len__(self) -> int:
        """Buckets remembered (addresses and user names)."""
        return len(self._addresses) + len(self._users)
