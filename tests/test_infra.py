"""
Tests of the test infrastructure itself: the throwaway PKI, the PostgreSQL
clusters and their roles, and the suite's own guards.

If these fail, every integration test's result is meaningless, so they check
the properties the other tests rely on without saying so: that each
certificate is broken in exactly the intended way, and that each role
authenticates with exactly the intended method.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

import pgtls_twisted.testing
from pgtls_twisted.testing import cluster as pgcluster
from pgtls_twisted.testing.cluster import PostgresCluster, find_pg_bindir
from pgtls_twisted.testing.pki import (
    CA_NAMES,
    CLIENT_NAMES,
    PKI,
    SERVER_NAMES,
    make_pki,
    write_leaf,
)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_all(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def san(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [f"DNS:{n}" for n in ext.get_values_for_type(x509.DNSName)] + [
        f"IP:{a}" for a in ext.get_values_for_type(x509.IPAddress)
    ]


def cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, connect_timeout=10, autocommit=True)


def scalar(conn: psycopg.Connection[Any], sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


# -- where the code under test comes from -----------------------------------


def test_package_location() -> None:
    """
    C{make test} sets PGTLS_EXPECT_INSTALLED: the suite must then test the
    installed package, not the source tree shadowing it on sys.path, or a
    packaging mistake (a module missing from the wheel) would go unnoticed.
    """
    location = Path(pgtls_twisted.testing.__file__).resolve().parent
    print(f"pgtls_twisted.testing imported from {location}")
    if os.environ.get("PGTLS_EXPECT_INSTALLED"):
        assert "site-packages" in location.parts, location


# -- the PKI ----------------------------------------------------------------


def test_make_pki_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    make_pki(tmp_path)
    assert time.perf_counter() - start < 1.0


def test_pki_files_and_key_modes(pki: PKI) -> None:
    for name in CA_NAMES + SERVER_NAMES + CLIENT_NAMES:
        assert len(load_all(pki.cert(name))) == 1, name
        mode = stat.S_IMODE(pki.key(name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
        key = pki.key(name).read_text()
        assert key.startswith("-----BEGIN PRIVATE KEY-----"), name  # PKCS#8, unencrypted
    chain = load_all(pki.server_chain)
    assert [c.subject for c in chain] == [load(pki.server_cert).subject, load(pki.ca_cert).subject]
    both = load_all(pki.ca_bundle_both)
    assert [cn(c) for c in both] == [cn(load(pki.ca_cert)), cn(load(pki.other_ca_cert))]
    with pytest.raises(FileNotFoundError, match="known certificates"):
        pki.cert("no_such_cert")


def test_pki_extensions(pki: PKI) -> None:
    assert cn(load(pki.ca_cert)) == "pgtls test root CA"
    assert cn(load(pki.client_ca_cert)) == "pgtls test client CA"
    for name in CA_NAMES:
        ca = load(pki.cert(name))
        assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.key_cert_sign and usage.crl_sign
    for name in SERVER_NAMES + CLIENT_NAMES:
        leaf = load(pki.cert(name))
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        wanted = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if name.startswith("server")
            else ExtendedKeyUsageOID.CLIENT_AUTH
        )
        assert list(eku) == [wanted], name
        leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_KEY_IDENTIFIER)
        leaf.extensions.get_extension_for_oid(ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert lifetime <= datetime.timedelta(days=366), name


def test_pki_server_variants(pki: PKI) -> None:
    ca = load(pki.ca_cert)
    localhost = ["DNS:localhost", "IP:127.0.0.1", "IP:::1"]

    server = load(pki.server_cert)
    assert cn(server) == "localhost" and san(server) == localhost
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey)
    server.verify_directly_issued_by(ca)

    rsa_leaf = load(pki.cert("server_rsa"))
    rsa_key = rsa_leaf.public_key()
    assert isinstance(rsa_key, rsa.RSAPublicKey) and rsa_key.key_size == 2048
    assert san(rsa_leaf) == localhost

    other = load(pki.cert("server_other_ca"))
    assert other.issuer == load(pki.other_ca_cert).subject and san(other) == localhost

    expired = load(pki.cert("server_expired"))
    assert expired.not_valid_after_utc < now()
    expired.verify_directly_issued_by(ca)

    assert san(load(pki.cert("server_wrong_host"))) == ["DNS:db.example.com", "DNS:db2.example.com"]
    assert san(load(pki.cert("server_wildcard"))) == ["DNS:*.pgtls.test"]
    ip_only = load(pki.cert("server_ip_only"))
    assert san(ip_only) == ["IP:127.0.0.1"] and cn(ip_only) not in ("localhost", "127.0.0.1")

    cn_only = load(pki.cert("server_cn_only"))
    assert cn(cn_only) == "localhost"
    with pytest.raises(x509.ExtensionNotFound):
        cn_only.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_pki_client_variants_and_crl(pki: PKI) -> None:
    client_ca = load(pki.client_ca_cert)
    for name, issuer, user in [
        ("client", client_ca, "cert_user"),
        ("client_other_ca", load(pki.other_ca_cert), "cert_user"),
        ("client_revoked", client_ca, "cert_user"),
        ("client_wrong_user", client_ca, "someone_else"),
        ("proxy_client", load(pki.ca_cert), "pgtls_proxy"),
    ]:
        leaf = load(pki.cert(name))
        assert cn(leaf) == user, name
        leaf.verify_directly_issued_by(issuer)

    crl = x509.load_pem_x509_crl(pki.client_crl.read_bytes())
    client_ca_key = client_ca.public_key()
    assert isinstance(client_ca_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(client_ca_key)
    assert crl.next_update_utc is not None and crl.next_update_utc > now()
    revoked = load(pki.cert("client_revoked")).serial_number
    assert crl.get_revoked_certificate_by_serial_number(revoked) is not None
    assert crl.get_revoked_certificate_by_serial_number(load(pki.client_cert).serial_number) is None


def test_write_leaf(pki: PKI) -> None:
    cert_path, key_path = write_leaf(
        pki,
        "test_infra_extra",
        ["DNS:rotated.pgtls.test", "::1"],
        issuer="other_ca",
        usage="client",
        key_type="rsa",
    )
    assert (cert_path, key_path) == (pki.cert("test_infra_extra"), pki.key("test_infra_extra"))
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    leaf = load(cert_path)
    leaf.verify_directly_issued_by(load(pki.other_ca_cert))
    assert cn(leaf) == "rotated.pgtls.test"
    assert san(leaf) == ["DNS:rotated.pgtls.test", "IP:::1"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    start = now() - datetime.timedelta(days=2)
    cert_path, _ = write_leaf(
        pki, "test_infra_extra", [], not_before=start, not_after=start + datetime.timedelta(1)
    )
    leaf = load(cert_path)  # overwritten in place, as a rotation test needs
    assert cn(leaf) == "test_infra_extra"
    assert leaf.not_valid_after_utc < now()
    with pytest.raises(x509.ExtensionNotFound):
        leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)


# -- the clusters -----------------------------------------------------------


def test_find_pg_bindir() -> None:
    bindir = find_pg_bindir()
    for exe in ("initdb", "postgres", "pg_ctl"):
        assert os.access(bindir / exe, os.X_OK)


def test_dsn_quoting(pg_plain: PostgresCluster) -> None:
    dsn = pg_plain.dsn(user="a b", password="it's", dbname=None, sslmode="disable")
    assert dsn == (
        f"host=127.0.0.1 port={pg_plain.port} user='a b' password='it\\'s' sslmode=disable"
    )


def test_tls_cluster_verify_full(pg_tls: PostgresCluster, pki: PKI) -> None:
    dsn = pg_tls.dsn(
        host="localhost",
        hostaddr="127.0.0.1",
        user=pgcluster.SCRAM_USER,
        password=pgcluster.SCRAM_PASSWORD,
        sslmode="verify-full",
        sslrootcert=str(pki.ca_cert),
    )
    with connect(dsn) as conn:
        assert scalar(conn, "SHOW ssl") == "on"
        assert scalar(conn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
        assert scalar(conn, "SELECT current_user") == "scram_user"
    assert pg_tls.psql("SHOW ssl_min_protocol_version") == "TLSv1.2"


def test_tls_cluster_rejects_untrusting_client(pg_tls: PostgresCluster, pki: PKI) -> None:
    dsn = pg_tls.dsn(
        user=pgcluster.SCRAM_USER,
        password=pgcluster.SCRAM_PASSWORD,
        sslmode="verify-ca",
        sslrootcert=str(pki.other_ca_cert),
    )
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        connect(dsn)


def test_scram_wrong_password(pg_tls: PostgresCluster) -> None:
    dsn = pg_tls.dsn(user=pgcluster.SCRAM_USER, password="wrong", sslmode="require")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(dsn)


def test_password_storage(pg_plain: PostgresCluster) -> None:
    """The md5 role really has an MD5 hash, or "md5 works" would prove nothing."""
    rows = pg_plain.psql(
        "SELECT rolname, CASE WHEN rolpassword IS NULL THEN 'none'"
        " WHEN rolpassword LIKE 'md5%' THEN 'md5'"
        " WHEN rolpassword LIKE 'SCRAM-SHA-256$%' THEN 'scram' ELSE 'other' END"
        " FROM pg_authid WHERE rolname IN"
        " ('scram_user', 'md5_user', 'pool_user', 'trust_user', 'cert_user', 'pgtls_proxy')"
        " ORDER BY 1"
    )
    assert rows.splitlines() == [
        "cert_user|none",
        "md5_user|md5",
        "pgtls_proxy|none",
        "pool_user|scram",
        "scram_user|scram",
        "trust_user|none",
    ]


@pytest.mark.parametrize(
    ("user", "password"),
    [
        (pgcluster.SCRAM_USER, pgcluster.SCRAM_PASSWORD),
        (pgcluster.MD5_USER, pgcluster.MD5_PASSWORD),
        (pgcluster.TRUST_USER, None),
        (pgcluster.POOL_USER, pgcluster.POOL_PASSWORD),
    ],
)
def test_plain_cluster_roles(pg_plain: PostgresCluster, user: str, password: str | None) -> None:
    with connect(pg_plain.dsn(user=user, password=password, sslmode="disable")) as conn:
        assert scalar(conn, "SHOW ssl") == "off"
        assert scalar(conn, "SELECT current_user") == user


def test_md5_and_trust_over_tls(pg_tls: PostgresCluster) -> None:
    for user, password in [
        (pgcluster.MD5_USER, pgcluster.MD5_PASSWORD),
        (pgcluster.TRUST_USER, None),
    ]:
        with connect(pg_tls.dsn(user=user, password=password, sslmode="require")) as conn:
            assert scalar(conn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")


def test_proxy_client_cert_auth(pg_tls: PostgresCluster, pki: PKI) -> None:
    dsn = pg_tls.dsn(
        host="localhost",
        hostaddr="127.0.0.1",
        user=pgcluster.PROXY_USER,
        sslmode="verify-full",
        sslrootcert=str(pki.ca_cert),
        sslcert=str(pki.proxy_client_cert),
        sslkey=str(pki.proxy_client_key),
    )
    with connect(dsn) as conn:
        assert scalar(conn, "SELECT current_user") == "pgtls_proxy"
        dn = scalar(conn, "SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert dn == "/CN=pgtls_proxy"


def test_cert_auth_needs_a_trusted_cert(pg_tls: PostgresCluster, pki: PKI) -> None:
    base: dict[str, Any] = {"sslmode": "require"}
    # No certificate at all.
    with pytest.raises(psycopg.OperationalError, match="requires a valid client certificate"):
        connect(pg_tls.dsn(user=pgcluster.PROXY_USER, **base))
    # cert_user's certificate is from client_ca, which this cluster does not trust.
    with pytest.raises(psycopg.OperationalError):
        connect(
            pg_tls.dsn(
                user=pgcluster.CERT_USER,
                sslcert=str(pki.client_cert),
                sslkey=str(pki.client_key),
                **base,
            )
        )


def test_app_database(pg_plain: PostgresCluster) -> None:
    for user, password in [
        (pgcluster.SCRAM_USER, pgcluster.SCRAM_PASSWORD),
        (pgcluster.POOL_USER, pgcluster.POOL_PASSWORD),
    ]:
        dsn = pg_plain.dsn(user=user, password=password, dbname=pgcluster.APP_DB)
        with connect(dsn) as conn:
            conn.execute(f"CREATE TEMP TABLE t_{user} (x int)")
            conn.execute(f"CREATE TABLE IF NOT EXISTS infra_{user} (x int)")
            conn.execute(f"DROP TABLE infra_{user}")
    assert pg_plain.psql(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app'"
    ) == ("scram_user")


def test_psql_errors_are_raised(pg_plain: PostgresCluster) -> None:
    with pytest.raises(RuntimeError, match="no_such_table"):
        pg_plain.psql("SELECT * FROM no_such_table")


def test_cluster_lifecycle(pg_base_dir: Path) -> None:
    """A private cluster: context manager, extra_conf, restart keeping port and roles."""
    with PostgresCluster(
        pg_base_dir, ssl=False, name="lifecycle", extra_conf={"work_mem": "7MB"}
    ) as cluster:
        port = cluster.port
        assert cluster.running
        assert cluster.psql("SHOW work_mem") == "7MB"
        cluster.restart()
        assert cluster.port == port
        dsn = cluster.dsn(user=pgcluster.SCRAM_USER, password=pgcluster.SCRAM_PASSWORD)
        with connect(dsn) as conn:
            assert scalar(conn, "SELECT 1") == 1
    assert not cluster.running
    cluster.stop()  # idempotent
    assert "database system is shut down" in cluster.log_tail(5)
    with pytest.raises(psycopg.OperationalError):
        connect(dsn)


def test_tls_cluster_needs_pki(pg_base_dir: Path) -> None:
    with pytest.raises(ValueError, match="needs a pki"):
        PostgresCluster(pg_base_dir, ssl=True, name="nopki")


# -- the suite's own guards -------------------------------------------------


@pytest.mark.allow_logged_errors
def test_logged_errors_are_collected(no_logged_errors: list[dict[str, Any]]) -> None:
    from twisted.logger import Logger

    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        Logger().failure("deliberate error for test_logged_errors_are_collected")
    assert len(no_logged_errors) == 1
    assert no_logged_errors[0]["log_failure"].check(ZeroDivisionError)


#: An Emacs file-variables line (the first, or the second after a #!).
_FILE_VARIABLES = re.compile(r"-\*-(.*?)-\*-")


def _test_case_names(path: Path) -> list[str] | None:
    """The test modules C{path}'s C{test-case-name} header names, or None without one."""
    for line in path.read_text(encoding="utf-8").splitlines()[:2]:
        match = _FILE_VARIABLES.search(line)
        if match is None:
            continue
        for variable in match.group(1).split(";"):
            name, _, value = variable.partition(":")
            if name.strip() == "test-case-name":
                return [n.strip() for n in value.split(",")]
    return None


def test_test_case_name_headers_name_existing_test_modules() -> None:
    """
    Every C{test-case-name} header, in the package and in the tests, names
    test modules that exist: a module moved or split, and the headers that
    named it, must move together (trial, and editors, run what they name).
    """
    tests = Path(__file__).resolve().parent
    repo = tests.parent
    headers: dict[str, list[str]] = {}
    for path in sorted([*(repo / "pgtls_twisted").rglob("*.py"), *tests.rglob("*.py")]):
        names = _test_case_names(path)
        if names is not None:
            headers[str(path.relative_to(repo))] = names
    assert len(headers) > 10, f"too few headers found: {headers}"
    missing = {
        where: [
            name
            for name in names
            if not re.fullmatch(r"tests\.\w+", name)
            or not (tests / f"{name.split('.', 1)[1]}.py").is_file()
        ]
        for where, names in headers.items()
    }
    assert {where: names for where, names in missing.items() if names} == {}
