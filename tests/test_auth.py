"""Tests for socks6fast.proto.auth: scrypt secrets and the user store (AUTH-05 proxy side)."""

from __future__ import annotations

import time

import pytest

from socks6fast.proto import auth
from socks6fast.proto.auth import UserStore, hash_password, parse_hash, verify_password

# Cheap parameters keep the suite fast; one test uses the real defaults.
FAST = {"n": 2**8, "r": 8, "p": 1}


def test_hash_format_is_self_describing() -> None:
    stored = hash_password("s3cret", **FAST)
    scheme, params, salt, digest = stored.split("$")
    assert scheme == "scrypt"
    assert params == "n=256,r=8,p=1"
    parsed = parse_hash(stored)
    assert len(parsed.salt) == auth.SALT_LENGTH
    assert len(parsed.digest) == auth.HASH_LENGTH
    assert parsed.encode() == stored
    assert "=" not in salt + digest  # unpadded base64


def test_default_parameters_round_trip() -> None:
    stored = hash_password(b"hunter2")
    assert stored.startswith("scrypt$n=16384,r=8,p=1$")
    assert verify_password(stored, b"hunter2")
    assert not verify_password(stored, b"hunter3")


def test_salt_is_random() -> None:
    assert hash_password("x", **FAST) != hash_password("x", **FAST)


def test_str_password_is_utf8() -> None:
    stored = hash_password("pässword", **FAST)
    assert verify_password(stored, "pässword".encode())
    assert not verify_password(stored, "pässword".encode("latin-1"))


@pytest.mark.parametrize(
    ("stored", "fragment"),
    [
        ("", "is not of the form"),
        ("bcrypt$n=2,r=1,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "is not of the form"),
        ("scrypt$n=256,r=8$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "n=N,r=R,p=P"),
        ("scrypt$n=256,r=8,p=1,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "n=N,r=R,p=P"),
        ("scrypt$n=256,r=8,x=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "n=N,r=R,p=P"),
        ("scrypt$n=-4,r=8,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "n=N,r=R,p=P"),
        ("scrypt$n=255,r=8,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "power of 2"),
        ("scrypt$n=2097152,r=8,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "power of 2"),
        ("scrypt$n=256,r=0,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "outside"),
        ("scrypt$n=1048576,r=32,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "too costly"),
        ("scrypt$n=256,r=8,p=1$!!!$AAAAAAAAAAAAAAAAAAAAAA", "not base64"),
        ("scrypt$n=256,r=8,p=1$AAAA$AAAAAAAAAAAAAAAAAAAAAA", "salt shorter"),
        ("scrypt$n=256,r=8,p=1$AAAAAAAAAAA$AAAA", "hash that is not"),
    ],
)
def test_parse_hash_rejects(stored: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_hash(stored)


def test_hash_password_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="power of 2"):
        hash_password("x", n=1000)


@pytest.mark.conformance("AUTH-05")
def test_store_authenticates_known_user() -> None:
    store = UserStore({"alice": hash_password("wonderland", **FAST)})
    assert store.required
    assert "alice" in store and len(store) == 1
    assert store.authenticate(b"alice", b"wonderland") == "alice"
    assert store.authenticate(b"alice", b"Wonderland") is None
    assert store.authenticate(b"bob", b"wonderland") is None
    assert store.authenticate(b"\xff\xfe", b"wonderland") is None
    assert store.authenticate(b"alice", b"") is None


def test_empty_store_requires_nothing() -> None:
    store = UserStore()
    assert not store.required
    assert store.authenticate(b"alice", b"x") is None


def test_store_rejects_malformed_hash_naming_user() -> None:
    with pytest.raises(ValueError, match="user 'alice': the secret is not of the form"):
        UserStore({"alice": "plaintext"})


@pytest.fixture
def scrypt_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per verify_password call (a scrypt run) made through the auth module."""
    calls: list[int] = []
    real = auth.verify_password

    def counting(stored: str | auth.ScryptHash, password: bytes) -> bool:
        calls.append(1)
        return real(stored, password)

    monkeypatch.setattr(auth, "verify_password", counting)
    return calls


def test_unknown_user_costs_a_scrypt_run(scrypt_runs: list[int]) -> None:
    """An unknown name is verified against the dummy hash: no timing oracle."""
    calls = scrypt_runs
    store = UserStore({"alice": hash_password("pw", **FAST)})
    assert store.authenticate(b"mallory", b"pw") is None
    assert store.authenticate(b"alice", b"wrong") is None
    assert len(calls) == 2
    dummy = store._dummy
    assert (dummy.n, dummy.r, dummy.p) == (
        auth.DEFAULT_SCRYPT_N,
        auth.DEFAULT_SCRYPT_R,
        auth.DEFAULT_SCRYPT_P,
    )


def test_successful_verification_is_cached() -> None:
    store = UserStore({"alice": hash_password("pw")})  # real cost: ~50 ms per scrypt run
    assert store.authenticate(b"alice", b"pw") == "alice"
    start = time.perf_counter()
    for _ in range(100):
        assert store.authenticate(b"alice", b"pw") == "alice"
    per_call = (time.perf_counter() - start) / 100
    assert per_call < 0.001  # far below one scrypt run
    # Only the keyed hash is held, never the password.
    assert all(b"pw" not in key for key in store._cache)


def test_failures_are_not_cached() -> None:
    store = UserStore({"alice": hash_password("pw", **FAST)})
    assert store.authenticate(b"alice", b"nope") is None
    assert store._cache == {}


def test_cache_key_separates_user_and_password() -> None:
    """("ab", "c") and ("a", "bc") must not share a cache entry."""
    store = UserStore({"ab": hash_password("c", **FAST), "a": hash_password("other", **FAST)})
    assert store.authenticate(b"ab", b"c") == "ab"
    assert store.authenticate(b"a", b"bc") is None


def test_reload_invalidates_cache() -> None:
    store = UserStore({"alice": hash_password("old", **FAST)})
    assert store.authenticate(b"alice", b"old") == "alice"
    store.reload({"alice": hash_password("new", **FAST)})
    assert store.authenticate(b"alice", b"old") is None
    assert store.authenticate(b"alice", b"new") == "alice"
    store.reload({})
    assert store.authenticate(b"alice", b"new") is None
    assert not store.required


@pytest.mark.conformance("AUTH-05")
def test_authenticate_cached_never_runs_scrypt(scrypt_runs: list[int]) -> None:
    """AUTH-05: authenticate_cached (the server calls it on its event loop, so a
    0-RTT request with known credentials costs no thread hop) answers only from the
    cache: None before a full verification, after a wrong password and after a reload
    changed the user; the user name once authenticate() has verified these credentials."""
    store = UserStore({"alice": hash_password("pw", **FAST), "bob": hash_password("b", **FAST)})
    calls = scrypt_runs
    assert store.authenticate_cached(b"alice", b"pw") is None
    assert calls == []
    assert store.authenticate(b"alice", b"pw") == "alice"
    assert store.authenticate(b"alice", b"wrong") is None
    assert len(calls) == 2
    assert store.authenticate_cached(b"alice", b"pw") == "alice"
    assert store.authenticate_cached(b"alice", b"wrong") is None
    assert store.authenticate_cached(b"bob", b"b") is None  # never verified
    assert len(calls) == 2
    store.reload({"alice": hash_password("new", **FAST)})
    assert store.authenticate_cached(b"alice", b"pw") is None
    assert len(calls) == 2


def test_reload_with_bad_hash_keeps_old_users() -> None:
    store = UserStore({"alice": hash_password("pw", **FAST)})
    with pytest.raises(ValueError):
        store.reload({"alice": "garbage"})
    assert store.authenticate(b"alice", b"pw") == "alice"


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "MAX_CACHE_ENTRIES", 2)
    store = UserStore({name: hash_password(name, **FAST) for name in ("a", "b", "c")})
    for name in (b"a", b"b", b"c"):
        assert store.authenticate(name, name) == name.decode()
    assert len(store._cache) <= 2


# --- hashlib.scrypt (issue 14 item 6) -------------------------------------------------------


def test_scrypt_matches_the_rfc_7914_test_vector() -> None:
    """The scrypt of `ScryptHash.derive` is RFC 7914's (section 12, third vector)."""
    vector = auth.ScryptHash(n=1024, r=8, p=16, salt=b"NaCl", digest=bytes(64))
    assert vector.derive(b"password").hex() == (
        "fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b373162"
        "2eaf30d92e22a3886ff109279d9830dac727afb94a83ee6d8360cbdfa2cc0640"
    )


def test_hashes_made_with_cryptography_still_verify() -> None:
    """Hashes written before issue 14 (by cryptography's Scrypt) verify unchanged,
    with the default and other parameters, and a wrong password still fails."""
    scrypt_kdf = pytest.importorskip("cryptography.hazmat.primitives.kdf.scrypt")
    for n, r, p in ((2**14, 8, 1), (2**8, 8, 1), (2**10, 4, 2)):
        salt = bytes(range(16))
        digest = scrypt_kdf.Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(b"old secret")
        stored = auth.ScryptHash(n=n, r=r, p=p, salt=salt, digest=digest).encode()
        assert verify_password(stored, b"old secret")
        assert not verify_password(stored, b"old secreT")


def test_auth_hashes_with_the_standard_library_only() -> None:
    """Issue 14 item 6: password hashing goes through hashlib.scrypt; importing the auth
    module (and hashing) loads no part of cryptography."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    code = (
        "import sys\n"
        "from socks6fast.proto.auth import hash_password, verify_password\n"
        "stored = hash_password('x', n=256)\n"
        "assert verify_password(stored, b'x')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_costly_parameters_beyond_rfc_7914_are_refused() -> None:
    """RFC 7914 section 2: N < 2^(16 r); such a hash is refused when the config is read (OpenSSL
    would refuse it at the first login) rather than failing later."""
    salt = "AAAAAAAAAAAAAAAAAAAAAA"
    digest = "A" * 43
    with pytest.raises(ValueError, match="RFC 7914"):
        parse_hash(f"scrypt$n=65536,r=1,p=1${salt}${digest}")
    parse_hash(f"scrypt$n=32768,r=1,p=1${salt}${digest}")
    # The largest accepted cost verifies (hashlib's maxmem is sized for it).
    big = auth.new_hash("pw", n=2**17, r=8, p=1)
    assert verify_password(big, b"pw")
